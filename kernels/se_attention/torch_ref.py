"""SE-Attn in PyTorch: select (no gradient) the top-k past memory blocks of each query chunk, then attend.

Semantics (geometry in scorers.py): query t of chunk i attends, in one softmax, to the keys/values of the blocks
selected for (b, head, chunk i) followed by its own chunk's keys/values up to itself (causal); nothing else, in
particular no window across the chunk boundary. q (b, h, L, d); k, v (b, hkv, L, d) with h a multiple of hkv.

Selection: `block_scores` (a scorer from scorers.SCORERS; -inf on blocks not wholly before the chunk), summed
over heads when `shared`, then `top_blocks` keeps the min(top_k, #eligible) best blocks of each row. A selection
is a LongTensor (b, h or 1 when shared, T, top_k) of block indices by decreasing score, -1 in empty slots (chunks
with fewer than top_k eligible blocks). Everything is computed under no_grad: gradients reach q, k, v through
the attention only, never through which blocks were chosen.

Memory: scores are scored per chunk (scorers.py); the attention is one fused SDPA call over (b, h, T) chunks of M
queries against top_k*S + M keys each, O(L (k S + M)) work rather than O(L^2).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridlm.kernels.se_attention.scorers import SCORERS, n_chunks


def check_args(q: Tensor, k: Tensor, v: Tensor, chunk_size: int, block_size: int, top_k: int, scorer: str) -> None:
    """Refuses arguments the op cannot run, naming the argument."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"q must be (b, h, L, d) and k, v (b, hkv, L, d); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k/v must match q in batch, length and head dim; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"the number of query heads ({q.shape[1]}) must be a multiple of the kv heads ({k.shape[1]})")
    for name, val, least in (("chunk_size", chunk_size, 1), ("block_size", block_size, 1), ("top_k", top_k, 0)):
        if not isinstance(val, int) or isinstance(val, bool) or val < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {val!r}")
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; known: {sorted(SCORERS)}")


@torch.no_grad()
def block_scores(q: Tensor, k: Tensor, v: Tensor, *, chunk_size: int, block_size: int, scorer: str = "paper",
                 scale: float | None = None) -> Tensor:
    """(b, h, T, U) relevance of each complete block to each chunk, per query head, in float32 or wider; -inf where
    the block is not wholly before the chunk."""
    dt = torch.promote_types(q.dtype, torch.float32)
    return SCORERS[scorer](q.detach().to(dt), k.detach().to(dt), v.detach().to(dt), chunk_size=chunk_size,
                           block_size=block_size, scale=scale)


@torch.no_grad()
def top_blocks(scores: Tensor, top_k: int, shared: bool = False) -> Tensor:
    """scores (b, h, T, U) -> selection (b, h or 1, T, top_k): the best eligible (finite-score) blocks of each row
    by decreasing score, -1 after them. shared: one row for all heads, ranked by the sum of the heads' scores."""
    if shared:
        scores = scores.sum(dim=1, keepdim=True)  # -inf stays -inf: eligibility does not depend on the head
    b, hs, t, u = scores.shape
    sel = torch.full((b, hs, t, top_k), -1, dtype=torch.long, device=scores.device)
    kk = min(top_k, u)
    if kk > 0:
        val, idx = scores.topk(kk, dim=-1)
        sel[..., :kk] = idx.masked_fill(val == float("-inf"), -1)
    return sel


def select_blocks(q: Tensor, k: Tensor, v: Tensor, *, chunk_size: int, block_size: int, top_k: int,
                  scorer: str = "paper", shared: bool = False, scale: float | None = None) -> Tensor:
    """The selection SE-Attn uses: top_blocks(block_scores(...)) -> (b, h or 1, T, top_k) LongTensor."""
    check_args(q, k, v, chunk_size, block_size, top_k, scorer)
    b, h, length, _ = q.shape
    if top_k == 0 or length // block_size == 0:
        return torch.full((b, 1 if shared else h, n_chunks(length, chunk_size), top_k), -1, dtype=torch.long,
                          device=q.device)
    scores = block_scores(q, k, v, chunk_size=chunk_size, block_size=block_size, scorer=scorer, scale=scale)
    return top_blocks(scores, top_k, shared)


def attend_selected(q: Tensor, k: Tensor, v: Tensor, selection: Tensor, *, chunk_size: int, block_size: int,
                    scale: float | None = None) -> Tensor:
    """The attention part of SE-Attn given a selection (b, h or 1, T, top_k) -> (b, h, L, d); differentiable in
    q, k, v. Computed in float32 or wider and returned in q's dtype."""
    b, h, length, d = q.shape
    hkv = k.shape[1]
    g, m, s = h // hkv, chunk_size, block_size
    t = n_chunks(length, m)
    top_k = selection.shape[-1]
    if tuple(selection.shape) not in ((b, h, t, top_k), (b, 1, t, top_k)):
        raise ValueError(f"selection must be (b, h or 1, T, top_k) = ({b}, {h} or 1, {t}, top_k); "
                         f"got {tuple(selection.shape)}")
    sc = scale if scale is not None else 1.0 / math.sqrt(d)
    dt = torch.promote_types(q.dtype, torch.float32)
    pad = t * m - length  # the ragged last chunk is padded; padded keys come after every real query (causal)
    qc = F.pad(q.to(dt), (0, 0, 0, pad)).view(b, hkv, g, t, m, d)
    kf, vf = k.to(dt), v.to(dt)
    kc = F.pad(kf, (0, 0, 0, pad)).view(b, hkv, 1, t, m, d).expand(b, hkv, g, t, m, d)
    vc = F.pad(vf, (0, 0, 0, pad)).view(b, hkv, 1, t, m, d).expand(b, hkv, g, t, m, d)
    # One fused SDPA call over every (head, chunk): keys [retrieved blocks ; own chunk]. Its mask is the small
    # (M, k*S + M) pattern shared by all chunks (retrieved: visible; own: causal), broadcast: a per-logit mask
    # would cost more than the attention in the CPU kernel. Empty slots are removed through one extra channel
    # instead: queries carry a 1 there, keys a large negative bias on empty slots and 0 elsewhere.
    causal = torch.ones(m, m, dtype=torch.bool, device=q.device).tril()
    if top_k > 0:
        sel = selection.expand(b, h, t, top_k).reshape(b, hkv, g, t, top_k)
        # token indices of the retrieved keys, in slot order: (b, hkv, g, t, top_k * S); an empty slot reads
        # block 0 (clamped into the sequence when L < S) and is masked by the bias
        tok = (sel.clamp(min=0)[..., None] * s + torch.arange(s, device=q.device)).flatten(-2)
        tok = tok.clamp(max=length - 1)
        flat = tok.flatten(2)[..., None].expand(-1, -1, -1, d)  # (b, hkv, g*t*k*S, d)
        kr = kf.gather(2, flat).view(b, hkv, g, t, top_k * s, d)
        vr = vf.gather(2, flat).view(b, hkv, g, t, top_k * s, d)
        empty = (sel < 0).repeat_interleave(s, dim=-1)  # (b, hkv, g, t, k*S)
        bias = torch.zeros(b, hkv, g, t, top_k * s + m, 1, dtype=dt, device=q.device)
        bias[..., : top_k * s, 0] = empty.to(dt) * (-1e9 / sc)
        keys = torch.cat([torch.cat([kr, kc], dim=-2), bias], dim=-1)
        # the fused kernel needs one head dim for q, k and v: v gets a zero channel, dropped from the output
        values = F.pad(torch.cat([vr, vc], dim=-2), (0, 1))
        qx = torch.cat([qc, torch.ones(b, hkv, g, t, m, 1, dtype=dt, device=q.device)], dim=-1)
        mask = torch.cat([torch.ones(m, top_k * s, dtype=torch.bool, device=q.device), causal], dim=-1)
    else:
        keys, values, qx, mask = kc, vc, qc, causal
    # 4-D (b*hkv*g, t, ., .): with chunks as SDPA's heads the CPU kernel takes its fused path (3-D inputs ran ~4x
    # slower in a 2026-12-02 measurement)
    out = F.scaled_dot_product_attention(qx.flatten(0, 2), keys.flatten(0, 2), values.flatten(0, 2),
                                         attn_mask=mask, scale=sc)[..., :d]  # (b*hkv*g, t, m, d)
    return out.reshape(b, h, t * m, d)[:, :, :length].to(q.dtype)


def se_attention_torch(q: Tensor, k: Tensor, v: Tensor, *, chunk_size: int, block_size: int, top_k: int,
                       scorer: str = "paper", shared: bool = False, scale: float | None = None,
                       return_selection: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Span-Expanded Attention (Nunez et al. 2025, Sec. 3.3). q (b, h, L, d), k/v (b, hkv, L, d) with positions
    (e.g. RoPE) already applied -> (b, h, L, d); with return_selection also the selection (b, h or 1, T, top_k)."""
    sel = select_blocks(q, k, v, chunk_size=chunk_size, block_size=block_size, top_k=top_k, scorer=scorer,
                        shared=shared, scale=scale)
    out = attend_selected(q, k, v, sel, chunk_size=chunk_size, block_size=block_size, scale=scale)
    return (out, sel) if return_selection else out
