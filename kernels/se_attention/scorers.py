"""Block relevance scorers for SE-Attn: which past memory blocks each query chunk should retrieve.

Geometry (shared by every file of this op): a sequence of L tokens is split into query chunks i = 0 .. T-1 of
M = chunk_size tokens, [i*M, min((i+1)*M, L)), T = ceil(L / M), and into memory blocks j of S = block_size tokens,
[j*S, (j+1)*S). Block j is a candidate ("eligible") for chunk i iff it lies wholly before the chunk's first token:
(j+1)*S <= i*M. Only the U = L // S complete blocks can ever be eligible (a trailing partial block ends at L, after
every chunk's start), so scores cover those U blocks.

A scorer maps q (b, h, L, d), k and v (b, hkv, L, d) (h a multiple of hkv: grouped KV) to scores (b, h, T, U),
higher = more relevant, -inf for blocks that are not eligible. Only the ranking inside one (b, h, chunk) row
matters for per-head selection; with shared selection the rows of all heads are summed, so each scorer's scale
is part of its definition. Every scorer works one query chunk at a time, so memory stays O(b h M U) (the oracle:
O(b h M key_tile)) instead of O(L^2).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Scorer = Callable[..., Tensor]
SCORERS: dict[str, Scorer] = {}


def register_scorer(name: str) -> Callable[[Scorer], Scorer]:
    def deco(fn: Scorer) -> Scorer:
        SCORERS[name] = fn
        return fn
    return deco


def n_chunks(length: int, chunk_size: int) -> int:
    return -(-length // chunk_size)


def eligible_counts(length: int, chunk_size: int, block_size: int) -> list[int]:
    """Number of eligible blocks of each chunk: blocks 0 .. n_i - 1 with n_i = (i*M) // S (all complete)."""
    return [(i * chunk_size) // block_size for i in range(n_chunks(length, chunk_size))]


def eligible_mask(length: int, chunk_size: int, block_size: int, device: torch.device | None = None) -> Tensor:
    """(T, U) bool: block j wholly before chunk i, i.e. (j+1)*S <= i*M."""
    i = torch.arange(n_chunks(length, chunk_size), device=device)
    j = torch.arange(length // block_size, device=device)
    return (j[None, :] + 1) * block_size <= i[:, None] * chunk_size


def _grouped(q: Tensor, hkv: int) -> Tensor:
    """(b, h, L, d) -> (b, hkv, g, L, d): the g query heads that share each kv head."""
    b, h, length, d = q.shape
    return q.view(b, hkv, h // hkv, length, d)


def _blocks(x: Tensor, block_size: int) -> Tensor:
    """(..., L, d) -> (..., U, S, d) over the complete blocks."""
    n = x.shape[-2] // block_size
    return x[..., : n * block_size, :].unflatten(-2, (n, block_size))


def _per_chunk(q: Tensor, hkv: int, chunk_size: int, block_size: int, score: Callable[[Tensor, int], Tensor]) -> Tensor:
    """Runs score(q_chunk (b, hkv, g, m, d), n) -> (b, hkv, g, n) on each chunk with n > 0 eligible blocks and
    assembles (b, h, T, U) with -inf on the blocks that are not eligible."""
    b, h, length, _ = q.shape
    counts = eligible_counts(length, chunk_size, block_size)
    out = q.new_full((b, h, len(counts), length // block_size), float("-inf"))
    qg = _grouped(q, hkv)
    for i, n in enumerate(counts):
        if n > 0:
            qi = qg[:, :, :, i * chunk_size: (i + 1) * chunk_size]
            out[:, :, i, :n] = score(qi, n).flatten(1, 2)
    return out


def _scale(q: Tensor, scale: float | None) -> float:
    return scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])


def block_summaries(q: Tensor, k: Tensor, v: Tensor, block_size: int, scale: float | None = None) -> Tensor:
    """The paper's compressed block c_j: non-causal attention inside block j, softmax(Q_j K_j^T * scale) V_j,
    averaged over its S output rows. (b, h, L, d), (b, hkv, L, d) x2 -> (b, h, U, d); one per query head, since
    the block's own queries enter it."""
    hkv = k.shape[1]
    qb = _blocks(_grouped(q, hkv), block_size)  # (b, hkv, g, U, S, d)
    kb, vb = _blocks(k, block_size), _blocks(v, block_size)  # (b, hkv, U, S, d)
    p = torch.softmax(torch.einsum("bkgusd,bkutd->bkgust", qb, kb) * _scale(q, scale), dim=-1)
    rows = torch.einsum("bkgust,bkutd->bkgusd", p, vb)
    return rows.mean(dim=-2).flatten(1, 2)


@register_scorer("paper")
def paper_scores(q: Tensor, k: Tensor, v: Tensor, *, chunk_size: int, block_size: int,
                 scale: float | None = None) -> Tensor:
    """R_ij = sum over the chunk's queries of q_t . c_j (Nunez et al. 2025, Sec. 3.3, before Eq. 4). The paper's
    softmax over blocks with 1/sqrt(d_model) (Eq. 4) is monotone within a row, so it does not change the top-k and
    is left out; raw R also makes shared selection (a sum over heads) equal the paper's single-head formula with
    d_model = all heads' channels concatenated."""
    b, h, length, d = q.shape
    t = n_chunks(length, chunk_size)
    c = block_summaries(q, k, v, block_size, scale)  # (b, h, U, d)
    q_sum = F.pad(q, (0, 0, 0, t * chunk_size - length)).view(b, h, t, chunk_size, d).sum(dim=3)
    r = torch.einsum("bhtd,bhud->bhtu", q_sum, c)
    return r.masked_fill(~eligible_mask(length, chunk_size, block_size, q.device), float("-inf"))


def _mean_keys(k: Tensor, block_size: int) -> Tensor:
    return _blocks(k, block_size).mean(dim=-2)  # (b, hkv, U, d)


@register_scorer("moba")
def moba_scores(q: Tensor, k: Tensor, v: Tensor, *, chunk_size: int, block_size: int,
                scale: float | None = None) -> Tensor:
    """MoBA-style (Lu et al. 2025): affinity q_t . mean key of block j, maxed over the chunk's queries, so one query
    that needs a block suffices (MoBA gates per token; SE-Attn retrieves per chunk)."""
    kbar = _mean_keys(k, block_size)

    def score(qi: Tensor, n: int) -> Tensor:
        return torch.einsum("bkgmd,bknd->bkgmn", qi, kbar[:, :, :n]).amax(dim=3)
    return _per_chunk(q, k.shape[1], chunk_size, block_size, score)


@register_scorer("quest")
def quest_scores(q: Tensor, k: Tensor, v: Tensor, *, chunk_size: int, block_size: int,
                 scale: float | None = None) -> Tensor:
    """Quest-style (Tang et al. 2024): per-channel min/max of block j's keys give the upper bound
    sum_c max(q_c kmax_c, q_c kmin_c) >= q . k_s for every key s of the block; maxed over the chunk's queries."""
    kb = _blocks(k, block_size)
    kmax, kmin = kb.amax(dim=-2), kb.amin(dim=-2)  # (b, hkv, U, d)

    def score(qi: Tensor, n: int) -> Tensor:
        ub = torch.einsum("bkgmd,bknd->bkgmn", qi.clamp(min=0), kmax[:, :, :n])
        ub = ub + torch.einsum("bkgmd,bknd->bkgmn", qi.clamp(max=0), kmin[:, :, :n])
        return ub.amax(dim=3)
    return _per_chunk(q, k.shape[1], chunk_size, block_size, score)


@register_scorer("nsa")
def nsa_scores(q: Tensor, k: Tensor, v: Tensor, *, chunk_size: int, block_size: int,
               scale: float | None = None) -> Tensor:
    """NSA-style (Yuan et al. 2025): each query's softmax over the eligible blocks' compressed keys (here the mean
    key; NSA learns the compression), summed over the chunk's queries. The per-query normalisation makes heads
    comparable, so `shared` selection sums these over heads as NSA does for a query group."""
    kbar = _mean_keys(k, block_size)
    sc = _scale(q, scale)

    def score(qi: Tensor, n: int) -> Tensor:
        s = torch.einsum("bkgmd,bknd->bkgmn", qi, kbar[:, :, :n]) * sc
        return torch.softmax(s, dim=-1).sum(dim=3)
    return _per_chunk(q, k.shape[1], chunk_size, block_size, score)


def _causal_logits(qi: Tensor, k: Tensor, q_start: int, a: int, e: int, scale: float) -> Tensor:
    """Queries qi (b, hkv, g, m, d) at positions q_start.. against keys [a, e): (b, hkv, g, m, e - a) logits,
    -inf where the key comes after the query."""
    s = torch.einsum("bkgmd,bknd->bkgmn", qi, k[:, :, a:e]) * scale
    pos = torch.arange(q_start, q_start + qi.shape[3], device=qi.device)
    return s.masked_fill(torch.arange(a, e, device=qi.device)[None, :] > pos[:, None], float("-inf"))


def block_attention_mass(q: Tensor, k: Tensor, *, chunk_size: int, block_size: int, scale: float | None = None,
                         key_tile: int | None = None) -> Tensor:
    """Exact full causal attention mass per block: (b, h, T, ceil(L / S)), entry [i, j] = sum over chunk i's
    queries t of sum over keys s in block j of softmax_{s' <= t}(q_t . k_s' * scale)[s]. Rows sum to the chunk's
    query count. Computed per chunk over key tiles (two passes: log-sum-exp, then mass), so memory is
    O(b h M key_tile); key_tile is rounded to a multiple of S."""
    b, h, length, d = q.shape
    hkv, sc = k.shape[1], _scale(q, scale)
    n_blk = -(-length // block_size)
    tile = max(1, (key_tile or 4096) // block_size) * block_size
    qg = _grouped(q, hkv)
    out = q.new_zeros(b, h, n_chunks(length, chunk_size), n_blk)
    for i in range(out.shape[2]):
        lo, hi = i * chunk_size, min((i + 1) * chunk_size, length)
        qi = qg[:, :, :, lo:hi]
        lse = torch.full(qi.shape[:-1], float("-inf"), dtype=q.dtype, device=q.device)
        for a in range(0, hi, tile):
            lse = torch.logaddexp(lse, torch.logsumexp(_causal_logits(qi, k, lo, a, min(a + tile, hi), sc), dim=-1))
        for a in range(0, hi, tile):
            e = min(a + tile, hi)
            mass = torch.exp(_causal_logits(qi, k, lo, a, e, sc) - lse[..., None]).sum(dim=3)  # (b, hkv, g, e - a)
            mass = F.pad(mass, (0, -(e - a) % block_size)).unflatten(-1, (-1, block_size)).sum(-1)
            out[:, :, i, a // block_size: a // block_size + mass.shape[-1]] = mass.flatten(1, 2)
    return out


@register_scorer("oracle")
def oracle_scores(q: Tensor, k: Tensor, v: Tensor, *, chunk_size: int, block_size: int,
                  scale: float | None = None) -> Tensor:
    """The full-attention mass each eligible block receives from the chunk's queries (block_attention_mass):
    what exact attention would spend there, the target the other scorers are measured against."""
    length = q.shape[2]
    mass = block_attention_mass(q, k, chunk_size=chunk_size, block_size=block_size, scale=scale)
    mass = mass[..., : length // block_size]
    return mass.masked_fill(~eligible_mask(length, chunk_size, block_size, q.device), float("-inf"))
