"""Span-expanded attention by an explicit (Lq x Lk) mask: the reference for the kernels.

Semantics of span_attention_torch (torch_ref.py): query i (key index t_i = i + Lk - Lq, chunk
n = i // C) sees its causal window {t_i - W < j <= t_i} and the keys j of its chunk's selected blocks
(j // M in selected[b, kv, n], block >= 0) with j <= t_i - W, all in one softmax.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from hybridlm.kernels.window_attention.naive import masked_attention_naive, window_mask


def span_mask(selected: Tensor, lq: int, lk: int, window: int, block_size: int, query_chunk: int) -> Tensor:
    """selected (b, hkv, n_chunks, top_k) -> allowed (b, hkv, lq, lk) bool."""
    b, hkv = selected.shape[:2]
    dev = selected.device
    t = torch.arange(lk - lq, lk, device=dev)  # key index of each query
    j = torch.arange(lk, device=dev)
    chunk_sel = selected[:, :, torch.arange(lq, device=dev) // query_chunk]  # (b, hkv, lq, top_k)
    in_block = ((j // block_size)[None, None, None, :, None] == chunk_sel[:, :, :, None, :]) & (
        chunk_sel[:, :, :, None, :] >= 0)
    retrieved = in_block.any(-1) & (j[None, :] <= t[:, None] - window)  # (b, hkv, lq, lk)
    return retrieved | window_mask(lq, lk, window, dev)


def span_attention_naive(q: Tensor, k: Tensor, v: Tensor, selected: Tensor, window: int, block_size: int,
                         query_chunk: int, softmax_scale: Optional[float] = None) -> Tensor:
    h, hkv = q.shape[1], k.shape[1]
    allowed = span_mask(selected, q.shape[2], k.shape[2], window, block_size, query_chunk)
    return masked_attention_naive(q, k, v, allowed.repeat_interleave(h // hkv, dim=1), softmax_scale)
