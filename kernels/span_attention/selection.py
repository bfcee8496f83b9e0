"""SE-Attn block selection (no gradient): for each query chunk, score the candidate memory blocks with a
swappable scorer (`SCORERS`) and keep the top-k -> `selected` LongTensor (b, hkv, n_chunks, top_k), the input of
the span_attention op. Coordinates as in torch_ref.py.

Causal scoring (a deliberate deviation): the paper scores a chunk with the mean of *the chunk's* queries, but a
later query of the chunk would then decide which blocks an earlier query sees, i.e. an output would depend on
future tokens, and token-by-token decoding could not reproduce a one-pass forward. Here chunk n is scored with
the C queries that END at its first query (query indices n*C-C+1 .. n*C; earlier ones come from `q_prev`, those
before the sequence start are skipped), so selection only uses the past and the chunk's first query.

Known gap (follows from the candidate rule of docs/design.md §4): a block is a candidate only if it ends before
the window of the chunk's *first* query, but later queries' windows have moved on, so up to C + M - 2 keys between
the last candidate block and a query's window are visible to neither. Only M = C = 1 closes it.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# Upper bound on the score elements materialised per step; above it, chunks are processed in bounded groups.
_MAX_SCORES = 1 << 22

# A scorer maps (q (b, hkv, n, G, d) scoring queries of each chunk incl. the grouped query heads,
# valid (n, G) bool: which of them exist, summaries (b, hkv, nb, d) mean key of each block) to
# scores (b, hkv, n, nb); higher = more relevant. Only the ranking matters.
Scorer = Callable[[Tensor, Tensor, Tensor], Tensor]
SCORERS: dict[str, Scorer] = {}


def register_scorer(name: str) -> Callable[[Scorer], Scorer]:
    def deco(fn: Scorer) -> Scorer:
        SCORERS[name] = fn
        return fn
    return deco


@register_scorer("mean_dot")
def mean_dot(q: Tensor, valid: Tensor, summaries: Tensor) -> Tensor:
    """<mean of the chunk's scoring queries (and of the query heads sharing the kv head), mean block key>."""
    w = valid.to(q.dtype) / valid.sum(-1, keepdim=True).clamp(min=1)  # (n, G)
    q_mean = torch.einsum("bhngd,ng->bhnd", q, w)
    return torch.einsum("bhnd,bhjd->bhnj", q_mean, summaries)


@register_scorer("max_dot")
def max_dot(q: Tensor, valid: Tensor, summaries: Tensor) -> Tensor:
    """max over the chunk's scoring queries of <query, mean block key>: one very relevant query suffices."""
    s = torch.einsum("bhngd,bhjd->bhngj", q, summaries)
    return s.masked_fill(~valid[None, None, :, :, None], float("-inf")).amax(dim=3)


@register_scorer("mean_dot_shared")
def mean_dot_shared(q: Tensor, valid: Tensor, summaries: Tensor) -> Tensor:
    """mean_dot summed over kv heads: every head retrieves the same blocks."""
    return mean_dot(q, valid, summaries).sum(1, keepdim=True).expand(-1, q.shape[1], -1, -1)


def block_summaries(k: Tensor, block_size: int) -> Tensor:
    """k (b, hkv, Lk, d) -> mean key of every complete block (b, hkv, Lk // block_size, d), float32."""
    b, hkv, lk, d = k.shape
    nb = lk // block_size
    return k[:, :, : nb * block_size].float().view(b, hkv, nb, block_size, d).mean(dim=3)


def candidate_mask(n_chunks: int, n_blocks: int, offset: int, window: int, block_size: int, query_chunk: int,
                   max_memory_blocks: int | None, device: torch.device) -> Tensor:
    """(n_chunks, n_blocks) bool: block j is a candidate for chunk n iff it ends before the window of the chunk's
    first query (key index f = n*C + offset), i.e. (j+1)*M <= f - W + 1, and, with a bound B on the memory bank,
    it is one of the B most recent such blocks."""
    first = torch.arange(n_chunks, device=device) * query_chunk + offset  # (n,)
    n_before = torch.div(first - window + 1, block_size, rounding_mode="floor")  # blocks wholly before the window
    j = torch.arange(n_blocks, device=device)
    cand = j[None, :] < n_before[:, None]
    if max_memory_blocks is not None:
        cand = cand & (j[None, :] >= n_before[:, None] - max_memory_blocks)
    return cand


@torch.no_grad()
def select_blocks(
    q: Tensor,  # (b, h, Lq, d) queries (same rotary as the keys)
    summaries: Tensor,  # (b, hkv, nb, d) mean key of blocks 0..nb-1 of the key sequence
    n_keys: int,  # Lk of the key sequence the op will see (fixes offset = Lk - Lq)
    window: int,
    block_size: int,
    query_chunk: int,
    top_k: int,
    scorer: str = "mean_dot",
    max_memory_blocks: int | None = None,
    q_prev: Tensor | None = None,  # (b, h, P <= C-1, d) the queries right before q (streaming)
) -> Tensor:
    """Top-k candidate blocks per (batch, kv head, query chunk) -> LongTensor (b, hkv, ceil(Lq/C), top_k).

    Entries are block indices in increasing order, then -1 for empty slots (fewer than top_k candidates).
    Ties are broken by torch.topk. See the module docstring for the scoring queries and candidate rule."""
    b, h, lq, d = q.shape
    hkv, nb = summaries.shape[1], summaries.shape[2]
    C, g = query_chunk, h // hkv
    n_chunks = -(-lq // C)
    out = torch.full((b, hkv, n_chunks, top_k), -1, dtype=torch.long, device=q.device)
    if top_k == 0 or nb == 0 or n_chunks == 0:
        return out
    if scorer not in SCORERS:
        raise ValueError(f"unknown SE-Attn scorer {scorer!r}; use one of {sorted(SCORERS)}")
    fn = SCORERS[scorer]
    dtype = torch.promote_types(q.dtype, torch.float32)  # score in at least float32
    prev = q_prev if q_prev is not None else q.new_zeros(b, h, 0, d)
    p = prev.shape[2]
    if p > C - 1:
        raise ValueError(f"q_prev holds {p} queries; at most query_chunk - 1 = {C - 1} are used")
    # Left-pad to C-1 previous queries; then chunk n's scoring queries are rows [n*C, n*C + C) of qs.
    qs = torch.cat([q.new_zeros(b, h, C - 1 - p, d), prev, q], dim=2)[:, :, : n_chunks * C].to(dtype)
    valid = (torch.arange(n_chunks * C, device=q.device) >= C - 1 - p).view(n_chunks, 1, C)
    # (b, hkv, g, n, C, d) -> (b, hkv, n, g*C, d): the query heads of a kv group score together.
    qs = qs.view(b, hkv, g, n_chunks, C, d).permute(0, 1, 3, 2, 4, 5).reshape(b, hkv, n_chunks, g * C, d)
    valid = valid.expand(n_chunks, g, C).reshape(n_chunks, g * C)
    cand = candidate_mask(n_chunks, nb, n_keys - lq, window, block_size, C, max_memory_blocks, q.device)
    kk = min(top_k, nb)
    step = max(1, _MAX_SCORES // max(1, b * h * C * nb))  # chunks per group: bounds the scorer's memory
    for s in range(0, n_chunks, step):
        e = min(n_chunks, s + step)
        scores = fn(qs[:, :, s:e], valid[s:e], summaries.to(dtype))  # (b, hkv, e-s, nb)
        scores = scores.masked_fill(~cand[None, None, s:e], float("-inf"))
        idx = scores.topk(kk, dim=-1).indices  # (b, hkv, e-s, kk)
        ok = cand[s:e][None, None].expand(b, hkv, -1, -1).gather(-1, idx)
        # Sort kept blocks ascending, empty slots (-1) last: nb sorts after every real index.
        idx = torch.where(ok, idx, nb).sort(dim=-1).values
        out[:, :, s:e, :kk] = torch.where(idx == nb, -1, idx)
    return out
