"""Depthwise causal conv1d with a streaming state, pure torch reference."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def causal_conv1d_torch(
    x: Tensor,  # (b, l, d)
    weight: Tensor,  # (d, 1, k) as stored by nn.Conv1d(groups=d)
    bias: Optional[Tensor],
    conv_state: Optional[Tensor] = None,  # (b, k-1, d): the last k-1 inputs before x
) -> tuple[Tensor, Tensor]:
    """Returns y (b, l, d) (no activation) and the new state (b, k-1, d), both in x's dtype. The taps accumulate in
    fp32 (fp64 for fp64 inputs), as mamba_ssm's kernel does: under bf16 autocast a bf16 running sum would round
    after every tap."""
    b, l, d = x.shape
    k = weight.shape[-1]
    if conv_state is None:
        conv_state = x.new_zeros(b, k - 1, d)
    xs = torch.cat([conv_state.to(x.dtype), x], dim=1)  # (b, k-1+l, d)
    f = torch.promote_types(x.dtype, torch.float32)
    xf = xs.to(f)
    # k shifted multiply-adds: for the small kernels used here (k ~ 4) this is several times faster on CPU
    # than a depthwise F.conv1d, whose backward is slow, and it needs no (b, d, l) transposes.
    w = weight[:, 0, :].to(f)  # (d, k)
    y = xf[:, 0:l] * w[:, 0]
    for i in range(1, k):
        y = y + xf[:, i:i + l] * w[:, i]
    if bias is not None:
        y = y + bias.to(f)
    return y.to(x.dtype), xs[:, xs.shape[1] - (k - 1):]
