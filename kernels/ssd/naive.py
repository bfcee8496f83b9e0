"""Sequential (token-by-token) SSD recurrence: the slow, obviously-correct reference for the chunked kernels.

h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,   y_t = h_t C_t + D x_t   (per head; head h reads group h // (H/G))
Computed in fp32 (fp64 for fp64 inputs, so tests can check gradients tightly); y in x's dtype, the state in fp32/fp64.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def ssd_scan_naive(
    x: Tensor,  # (b, l, h, p)
    dt: Tensor,  # (b, l, h)
    A: Tensor,  # (h,)
    B: Tensor,  # (b, l, g, n)
    C: Tensor,  # (b, l, g, n)
    D: Optional[Tensor] = None,  # (h,)
    initial_state: Optional[Tensor] = None,  # (b, h, p, n)
) -> tuple[Tensor, Tensor]:
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    f = torch.promote_types(x.dtype, torch.float32)
    Bh = B.to(f).repeat_interleave(h // g, dim=2)  # (b, l, h, n)
    Ch = C.to(f).repeat_interleave(h // g, dim=2)
    state = x.new_zeros(b, h, p, n, dtype=f) if initial_state is None else initial_state.to(f)
    ys = []
    for t in range(l):
        decay = torch.exp(dt[:, t].to(f) * A.to(f))  # (b, h)
        write = (dt[:, t].to(f)[..., None] * x[:, t].to(f))[..., None] * Bh[:, t, :, None, :]  # (b, h, p, n)
        state = decay[..., None, None] * state + write
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = torch.stack(ys, dim=1)  # (b, l, h, p)
    if D is not None:
        y = y + x.to(f) * D.to(f)[:, None]
    return y.to(x.dtype), state
