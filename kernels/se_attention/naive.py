"""SE-Attn written out with plain Python loops over batch, heads, chunks, blocks and queries: slow, for tiny test
shapes, and sharing no code with torch_ref.py / scorers.py. Same semantics (see those files' docstrings); every
quantity follows its definition token by token.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def _softmax(xs: list[float]) -> list[float]:
    top = max(xs)
    es = [math.exp(x - top) for x in xs]
    tot = sum(es)
    return [e / tot for e in es]


def _dot(a: Tensor, b: Tensor) -> float:
    return float((a * b).sum())


def block_scores_naive(q: Tensor, k: Tensor, v: Tensor, *, chunk_size: int, block_size: int, scorer: str,
                       scale: float | None = None) -> Tensor:
    """(b, h, T, U) float64 scores; -inf for blocks j not wholly before chunk i ((j+1)*S > i*M)."""
    b_, h_, length, d = q.shape
    g = h_ // k.shape[1]
    M, S = chunk_size, block_size
    sc = scale if scale is not None else 1.0 / math.sqrt(d)
    T, U = -(-length // M), length // S
    out = torch.full((b_, h_, T, U), float("-inf"), dtype=torch.float64)
    for b in range(b_):
        for h in range(h_):
            kh, vh, qh = k[b, h // g].double(), v[b, h // g].double(), q[b, h].double()
            for i in range(T):
                queries = range(i * M, min((i + 1) * M, length))
                eligible = [j for j in range(U) if (j + 1) * S <= i * M]
                for j in eligible:
                    rows = range(j * S, (j + 1) * S)
                    kbar = sum(kh[s] for s in rows) / S
                    if scorer == "paper":
                        c = torch.zeros(d, dtype=torch.float64)
                        for r in rows:  # non-causal attention inside the block, one output row at a time
                            w = _softmax([sc * _dot(qh[r], kh[s]) for s in rows])
                            c += sum(w[n] * vh[s] for n, s in enumerate(rows)) / S
                        out[b, h, i, j] = sum(_dot(qh[t], c) for t in queries)
                    elif scorer == "moba":
                        out[b, h, i, j] = max(_dot(qh[t], kbar) for t in queries)
                    elif scorer == "quest":
                        kmax = [max(float(kh[s, c]) for s in rows) for c in range(d)]
                        kmin = [min(float(kh[s, c]) for s in rows) for c in range(d)]
                        out[b, h, i, j] = max(
                            sum(max(float(qh[t, c]) * kmax[c], float(qh[t, c]) * kmin[c]) for c in range(d))
                            for t in queries)
                    elif scorer == "nsa":
                        tot = 0.0
                        for t in queries:
                            means = [sum(kh[s] for s in range(jj * S, (jj + 1) * S)) / S for jj in eligible]
                            w = _softmax([sc * _dot(qh[t], m) for m in means])
                            tot += w[eligible.index(j)]
                        out[b, h, i, j] = tot
                    elif scorer == "oracle":
                        tot = 0.0
                        for t in queries:
                            w = _softmax([sc * _dot(qh[t], kh[s]) for s in range(t + 1)])
                            tot += sum(w[s] for s in rows)
                        out[b, h, i, j] = tot
                    else:
                        raise ValueError(f"unknown scorer {scorer!r}")
    return out


def select_naive(scores: Tensor, top_k: int, shared: bool = False) -> Tensor:
    """(b, h, T, U) -> (b, h or 1, T, top_k): eligible blocks sorted by decreasing score, -1 padded."""
    b_, h_, T, U = scores.shape
    hs = 1 if shared else h_
    sel = torch.full((b_, hs, T, top_k), -1, dtype=torch.long)
    for b in range(b_):
        for h in range(hs):
            for i in range(T):
                heads = range(h_) if shared else [h]
                row = [sum(float(scores[b, hh, i, j]) for hh in heads) for j in range(U)]
                ranked = sorted((j for j in range(U) if row[j] != float("-inf")), key=lambda j: -row[j])
                for slot, j in enumerate(ranked[:top_k]):
                    sel[b, h, i, slot] = j
    return sel


def attend_selected_naive(q: Tensor, k: Tensor, v: Tensor, selection: Tensor, *, chunk_size: int, block_size: int,
                          scale: float | None = None) -> Tensor:
    """Each query t of chunk i: one softmax over [keys of the selected blocks ; keys i*M .. t]. float64."""
    b_, h_, length, d = q.shape
    g = h_ // k.shape[1]
    sc = scale if scale is not None else 1.0 / math.sqrt(d)
    out = torch.zeros(b_, h_, length, d, dtype=torch.float64)
    for b in range(b_):
        for h in range(h_):
            hs = h if selection.shape[1] > 1 else 0
            kh, vh, qh = k[b, h // g].double(), v[b, h // g].double(), q[b, h].double()
            for t in range(length):
                i = t // chunk_size
                keys = [s for j in selection[b, hs, i].tolist() if j >= 0
                        for s in range(j * block_size, (j + 1) * block_size)]
                keys += list(range(i * chunk_size, t + 1))
                w = _softmax([sc * _dot(qh[t], kh[s]) for s in keys])
                out[b, h, t] = sum(w[n] * vh[s] for n, s in enumerate(keys))
    return out


def se_attention_naive(q: Tensor, k: Tensor, v: Tensor, *, chunk_size: int, block_size: int, top_k: int,
                       scorer: str = "paper", shared: bool = False, scale: float | None = None
                       ) -> tuple[Tensor, Tensor]:
    """-> (output (b, h, L, d) float64, selection (b, h or 1, T, top_k))."""
    scores = block_scores_naive(q, k, v, chunk_size=chunk_size, block_size=block_size, scorer=scorer, scale=scale)
    sel = select_naive(scores, top_k, shared)
    out = attend_selected_naive(q, k, v, sel, chunk_size=chunk_size, block_size=block_size, scale=scale)
    return out, sel
