"""Chunked SSD scan (Mamba-2), pure torch reference.

Within a chunk of Q tokens the scan is a masked (Q x Q) matrix product; across chunks the
(headdim x d_state) states are carried by a recurrence over chunks. No loop over time steps.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def segsum(a: Tensor) -> Tensor:
    """out[..., i, j] = sum(a[..., j+1 : i+1]) for j <= i, -inf above the diagonal (stable: no exp-diff)."""
    q = a.shape[-1]
    a = a[..., None].expand(*a.shape, q)  # [..., i, j] = a[..., i]
    below = torch.tril(torch.ones(q, q, dtype=torch.bool, device=a.device), diagonal=-1)
    a = a.masked_fill(~below, 0)
    out = torch.cumsum(a, dim=-2)
    keep = torch.tril(torch.ones(q, q, dtype=torch.bool, device=a.device))
    return out.masked_fill(~keep, float("-inf"))


def ssd_scan_torch(
    x: Tensor,  # (b, l, h, p)
    dt: Tensor,  # (b, l, h), already softplus'd and clamped
    A: Tensor,  # (h,), negative
    B: Tensor,  # (b, l, g, n)
    C: Tensor,  # (b, l, g, n)
    chunk_size: int,
    D: Optional[Tensor] = None,  # (h,)
    initial_state: Optional[Tensor] = None,  # (b, h, p, n)
) -> tuple[Tensor, Tensor]:
    """Returns y (b, l, h, p) and the final state (b, h, p, n).

    Recurrence: h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T,  y_t = C_t h_t + D x_t.
    Computed in at least fp32. Any length works: the tail is padded with dt = 0, which neither decays
    nor writes the state, so the final state is exact.
    """
    in_dtype = x.dtype
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    q = min(chunk_size, l)
    pad = (-l) % q
    cdt = torch.promote_types(in_dtype, torch.float32)
    x, dt, B, C = (t.to(cdt) for t in (x, dt, B, C))
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    c = (l + pad) // q
    # Layout (b, c, h, q, .) so every contraction below is one batched matmul over (b, c, h).
    # Heads h share group h // (h/g), as in mamba_ssm.
    B = B.reshape(b, c, q, g, n).permute(0, 1, 3, 2, 4).repeat_interleave(h // g, dim=2)  # (b, c, h, q, n)
    C = C.reshape(b, c, q, g, n).permute(0, 1, 3, 2, 4).repeat_interleave(h // g, dim=2)
    X = (x * dt[..., None]).reshape(b, c, q, h, p).permute(0, 1, 3, 2, 4)  # (b, c, h, q, p)
    a = (dt * A.to(cdt)).reshape(b, c, q, h).transpose(2, 3)  # (b, c, h, q): log-decay per step
    a_cum = torch.cumsum(a, dim=-1)

    # 1. within-chunk outputs (the quadratic, attention-like part): (C B^T * decay mask) X
    y = ((C @ B.transpose(-1, -2)) * torch.exp(segsum(a))) @ X  # (b, c, h, q, p)

    # 2. each chunk's own contribution to the state at its end: X^T (B * decay-to-end)
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (b, c, h, q)
    chunk_states = X.transpose(-1, -2) @ (B * decay_to_end[..., None])  # (b, c, h, p, n)

    # 3. carry states across chunks (a short loop over chunks, not tokens)
    chunk_decay = torch.exp(a_cum[..., -1])[..., None, None]  # (b, c, h, 1, 1)
    state = x.new_zeros(b, h, p, n) if initial_state is None else initial_state.to(cdt)
    states_in = []
    for i in range(c):
        states_in.append(state)
        state = chunk_decay[:, i] * state + chunk_states[:, i]
    states_in = torch.stack(states_in, dim=1)  # (b, c, h, p, n): the state entering each chunk

    # 4. contribution of the incoming state to each position: (C * decay-from-start) state^T
    y = y + (C * torch.exp(a_cum)[..., None]) @ states_in.transpose(-1, -2)
    y = y.permute(0, 1, 3, 2, 4).reshape(b, c * q, h, p)[:, :l]
    if D is not None:
        y = y + x[:, :l] * D.to(cdt)[:, None]
    return y.to(in_dtype), state
