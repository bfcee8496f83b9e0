"""Depthwise causal conv1d as an explicit per-timestep loop over a sliding window: the reference for the kernel.

Output t sees the k inputs t-k+1 .. t of [conv_state, x] (zeros before the state when it is None); tap k-1 of
weight multiplies the current input. The returned state is the window's last k-1 inputs after the final step.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def causal_conv1d_naive(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                        conv_state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """x (b, l, d), weight (d, 1, k), bias (d,), conv_state (b, k-1, d) -> y (b, l, d), new state (b, k-1, d)."""
    b, l, d = x.shape
    k = weight.shape[-1]
    w = weight[:, 0, :].float()  # (d, k)
    window = x.new_zeros(b, k - 1, d, dtype=torch.float32) if conv_state is None else conv_state.float()
    ys = []
    for t in range(l):
        taps = torch.cat([window, x[:, t:t + 1].float()], dim=1)  # (b, k, d): inputs t-k+1 .. t
        y_t = torch.einsum("bkd,dk->bd", taps, w)
        if bias is not None:
            y_t = y_t + bias.float()
        ys.append(y_t)
        window = taps[:, 1:]
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, d, dtype=torch.float32)
    return y.to(x.dtype), window.to(x.dtype)
