"""Causal (optionally sliding-window) attention over a query block whose keys may be preceded by a cache.

Convention: k/v hold `Lk >= Lq` positions and the last Lq of them belong to the queries, so query i sits at
key index i + (Lk - Lq). A query sees key j iff j <= its own index and (window is None or j > index - window).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# Above this many query x key scores in one block, split queries into blocks so memory stays bounded.
_MAX_SCORES = 1 << 22


def _mask(q_idx: Tensor, k_idx: Tensor, window: Optional[int]) -> Tensor:
    allowed = k_idx[None, :] <= q_idx[:, None]
    if window is not None:
        allowed = allowed & (k_idx[None, :] > q_idx[:, None] - window)
    return allowed


def window_attention_torch(
    q: Tensor,  # (b, h, lq, d)
    k: Tensor,  # (b, hkv, lk, d)
    v: Tensor,  # (b, hkv, lk, d)
    window: Optional[int] = None,
    softmax_scale: Optional[float] = None,
) -> Tensor:
    b, h, lq, d = q.shape
    lk = k.shape[2]
    offset = lk - lq
    gqa = k.shape[1] != h
    if lq == lk and window is None and lq * lk <= _MAX_SCORES:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale, enable_gqa=gqa)
    # Query blocks bound the scores held at once. A sliding-window block sees at most block + window - 1 keys, and
    # its size depends on the window only, so the number of blocks (and the cost) grows linearly with length.
    if window is None:
        block = max(1, min(lq, _MAX_SCORES // lk))
    else:
        block = max(1, min(lq, _MAX_SCORES // (2 * window), math.isqrt(_MAX_SCORES)))
    outs = []
    for s in range(0, lq, block):
        e = min(lq, s + block)
        k_lo = 0 if window is None else max(0, s + offset - window + 1)
        k_hi = e + offset
        q_idx = torch.arange(s + offset, e + offset, device=q.device)
        k_idx = torch.arange(k_lo, k_hi, device=q.device)
        outs.append(F.scaled_dot_product_attention(
            q[:, :, s:e], k[:, :, k_lo:k_hi], v[:, :, k_lo:k_hi],
            attn_mask=_mask(q_idx, k_idx, window), scale=softmax_scale, enable_gqa=gqa))
    return torch.cat(outs, dim=2)
