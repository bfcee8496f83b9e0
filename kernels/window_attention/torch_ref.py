"""Causal (optionally sliding-window) attention over a query block whose keys may be preceded by a cache.

Convention: k/v hold `Lk >= Lq` positions and the last Lq of them belong to the queries, so query i sits at
key index i + (Lk - Lq). A query sees key j iff j <= its own index and (window is None or j > index - window).

Two paths, both on torch's SDPA (its fused CPU flash kernel when q/k/v are 4-D):
  * banded (a window shorter than the keys): queries in blocks of `_band_block(W)`; block n attends to the one
    tile of Bq + W - 1 keys its queries can see, through the same (Bq, Bq + W - 1) band mask. All blocks go into
    one SDPA call as batch entries, so the cost is (Bq + W - 1) / W times the useful FLOPs, linear in length.
    The first W - 1 queries (fewer earlier keys than a window) are one small masked call of their own.
  * full (no window, or a window covering every key): SDPA's causal kernel, or query blocks against the key
    prefix when the scores of one call would be too many.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# Above this many query x key scores in one block, split queries into blocks so memory stays bounded (full path).
_MAX_SCORES = 1 << 22


def _mask(q_idx: Tensor, k_idx: Tensor, window: Optional[int]) -> Tensor:
    allowed = k_idx[None, :] <= q_idx[:, None]
    if window is not None:
        allowed = allowed & (k_idx[None, :] > q_idx[:, None] - window)
    return allowed


def _band_block(window: int, lq: int) -> int:
    """Queries per block of the banded path. A block computes bq x (bq + W - 1) scores for bq x W useful ones:
    smaller blocks waste less, but below ~32 rows the fused kernel's per-block overhead dominates. Measured on one
    AVX-512 core (head dim 32, fwd and fwd+bwd): W/2 was best or tied at W = 64-256, and 128 beat W/2 at W = 512."""
    return max(1, min(lq, 128, max(32, window // 2)))


def _full(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], gqa: bool) -> Tensor:
    b, h, lq, d = q.shape
    lk = k.shape[2]
    offset = lk - lq
    if lq == lk and lq * lk <= _MAX_SCORES:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    block = max(1, min(lq, _MAX_SCORES // lk))
    outs = []
    for s in range(0, lq, block):
        e = min(lq, s + block)
        q_idx = torch.arange(s + offset, e + offset, device=q.device)
        k_idx = torch.arange(0, e + offset, device=q.device)
        outs.append(F.scaled_dot_product_attention(
            q[:, :, s:e], k[:, :, : e + offset], v[:, :, : e + offset], attn_mask=_mask(q_idx, k_idx, None),
            scale=scale, enable_gqa=gqa))
    return torch.cat(outs, dim=2)


class KeyTiles(torch.autograd.Function):
    """KeyTiles.apply(x, bq, m): x (b, hkv, (nb + m - 1) * bq, d) -> its overlapping tiles (nb, b * hkv, m * bq, d),
    tile j = rows [j*bq, (j + m)*bq), as a strided view (no copy). The backward adds the m shifted block
    gradients, several times cheaper than autograd's generic unfold backward. Also used by span_attention."""

    @staticmethod
    def forward(ctx, x: Tensor, bq: int, m: int) -> Tensor:
        b, hkv, rows, d = x.shape
        nb = rows // bq - m + 1
        ctx.shape, ctx.bq, ctx.m = x.shape, bq, m
        x = x.contiguous()
        return x.as_strided((nb, b * hkv, m * bq, d), (bq * d, rows * d, d, 1))

    @staticmethod
    def backward(ctx, g: Tensor):
        b, hkv, rows, d = ctx.shape
        bq, m = ctx.bq, ctx.m
        nb = rows // bq - m + 1
        g = g.reshape(nb, b * hkv, m, bq, d)
        out = g.new_zeros(b * hkv, rows // bq, bq, d)
        for i in range(m):
            out[:, i: i + nb] += g[:, :, i].transpose(0, 1)
        return out.view(ctx.shape), None, None


def _banded(q: Tensor, k: Tensor, v: Tensor, window: int, scale: Optional[float], gqa: bool) -> Tensor:
    b, h, lq, d = q.shape
    lk, dv = k.shape[2], v.shape[3]
    W = window
    offset = lk - lq
    bq = _band_block(W, lq)
    # Queries before `head` see fewer than W - 1 earlier keys (their window starts before key 0); they take the
    # full path with the window mask, so the tiles below never reach before key 0 and need no padding mask.
    head = min(lq, max(0, W - 1 - offset))
    o_head = None
    if head:
        q_idx = torch.arange(offset, head + offset, device=q.device)
        k_idx = torch.arange(0, head + offset, device=q.device)
        o_head = F.scaled_dot_product_attention(q[:, :, :head], k[:, :, : head + offset], v[:, :, : head + offset],
                                                attn_mask=_mask(q_idx, k_idx, W), scale=scale, enable_gqa=gqa)
        if head == lq:
            return o_head
    n = lq - head
    nb = -(-n // bq)
    m = -(-(bq + W - 1) // bq)  # key blocks per tile: the tile's bq + W - 1 keys, rounded up to whole blocks
    # Block j holds queries head + j*bq + r (r < bq) at key index t = head + offset + j*bq + r; it sees keys from
    # t - W + 1 on, so tile j is key blocks [j, j + m) of the keys from head + offset - W + 1 (>= 0) on, padded at
    # the back for the last blocks.
    k0 = head + offset - (W - 1)
    back = (nb + m - 1) * bq - (lk - k0)
    kt = KeyTiles.apply(F.pad(k[:, :, k0:], (0, 0, 0, back)), bq, m)  # (nb, b*hkv, m*bq, d)
    vt = KeyTiles.apply(F.pad(v[:, :, k0:], (0, 0, 0, back)), bq, m)
    # Blocks go first and the batch joins the heads: q (nb, b*h, bq, d). GQA stays right: query head i of batch
    # entry e is row e*h + i, its kv head e*hkv + i // (h/hkv) = row // (h/hkv).
    qb = F.pad(q[:, :, head:], (0, 0, 0, nb * bq - n)).reshape(b * h, nb, bq, d).transpose(0, 1)
    # Row r sees tile column c iff its key is not after the query (c <= r + W - 1) and inside the window (c >= r).
    r = torch.arange(bq, device=q.device)[:, None]
    c = torch.arange(m * bq, device=q.device)[None, :]
    band = (c >= r) & (c <= r + W - 1)
    o = F.scaled_dot_product_attention(qb, kt, vt, attn_mask=band, scale=scale, enable_gqa=gqa)  # (nb, b*h, bq, dv)
    o = o.transpose(0, 1).reshape(b, h, nb * bq, dv)[:, :, :n]
    return o if o_head is None else torch.cat([o_head, o], dim=2)


def window_attention_torch(
    q: Tensor,  # (b, h, lq, d)
    k: Tensor,  # (b, hkv, lk, d)
    v: Tensor,  # (b, hkv, lk, d)
    window: Optional[int] = None,
    softmax_scale: Optional[float] = None,
) -> Tensor:
    gqa = k.shape[1] != q.shape[1]
    if window is None or window >= k.shape[2]:  # every key the causal mask allows is inside the window
        return _full(q, k, v, softmax_scale, gqa)
    return _banded(q, k, v, window, softmax_scale, gqa)
