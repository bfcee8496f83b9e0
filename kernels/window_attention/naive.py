"""Sliding-window causal attention by an explicit (Lq x Lk) masked softmax: the reference for the kernels.

k/v hold Lk >= Lq positions and the last Lq belong to the queries (query i sits at key index i + Lk - Lq).
Query at index qi sees key j iff j <= qi and (window is None or j > qi - window).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def window_mask(lq: int, lk: int, window: Optional[int], device=None) -> Tensor:
    qi = torch.arange(lk - lq, lk, device=device)[:, None]
    kj = torch.arange(lk, device=device)[None, :]
    allowed = kj <= qi
    if window is not None:
        allowed &= kj > qi - window
    return allowed  # (lq, lk)


def masked_attention_naive(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor,
                           softmax_scale: Optional[float] = None) -> Tensor:
    """q (b, h, lq, d), k/v (b, hkv, lk, d), allowed broadcastable to (b, h, lq, lk) -> o (b, h, lq, d)."""
    h, hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(h // hkv, dim=1).float()
    v = v.repeat_interleave(h // hkv, dim=1).float()
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s = torch.einsum("bhid,bhjd->bhij", q.float(), k) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhij,bhjd->bhid", torch.softmax(s, dim=-1), v).to(q.dtype)


def window_attention_naive(q: Tensor, k: Tensor, v: Tensor, window: Optional[int] = None,
                           softmax_scale: Optional[float] = None) -> Tensor:
    return masked_attention_naive(q, k, v, window_mask(q.shape[2], k.shape[2], window, q.device), softmax_scale)
