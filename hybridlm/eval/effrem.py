"""Effective Remembrance (Buitrago Ruiz & Gu 2025):

    EffRem_T(t) = TV( p(. | x[0:T]), p(. | x[t:T]) ),   TV(p, q) = 1/2 sum_v |p(v) - q(v)|,

the change in the next-token distribution after x[0:T] when the first t tokens are dropped, averaged over
sequences. t = 0 gives 0; a model that uses its context sensibly rises gradually as t approaches T, while one
that overfits the start of its training sequences jumps already for small t. t ranges over [0, T-1]: x[T:T]
would be an empty context, which the model (no BOS token) cannot condition on.
"""
from __future__ import annotations

import torch
from torch import Tensor

from hybridlm.eval.streaming import prefill


def default_grid(T: int, points: int) -> list[int]:
    """`points` distinct t values evenly spaced over [0, T-1] (fewer if T is small)."""
    return sorted({round(i * (T - 1) / max(points - 1, 1)) for i in range(points)})


@torch.no_grad()
def next_token_probs(model, ids: Tensor, chunk_len: int, batch_size: int) -> Tensor:
    """ids (n, l) -> p(. | ids) at the last position, (n, V) float64."""
    out = [torch.softmax(prefill(model, rows, chunk_len)[0].double(), dim=-1).cpu() for rows in ids.split(batch_size)]
    return torch.cat(out)


@torch.no_grad()
def effrem(model, sequences: Tensor, T: int, grid: list[int], chunk_len: int, batch_size: int = 8) -> Tensor:
    """sequences (n, >= T) -> EffRem_T(t) for each t in grid, (len(grid),) float64, averaged over sequences."""
    if sequences.shape[1] < T:
        raise ValueError(f"effrem: sequences have {sequences.shape[1]} tokens, fewer than T={T}")
    bad = [t for t in grid if not 0 <= t < T]
    if bad:
        raise ValueError(f"eval.effrem_grid: t must be in [0, T-1={T - 1}], got {bad}")
    p = next_token_probs(model, sequences[:, :T], chunk_len, batch_size)  # (n, V)
    values = []
    for t in grid:
        q = p if t == 0 else next_token_probs(model, sequences[:, t:T], chunk_len, batch_size)
        values.append(0.5 * (p - q).abs().sum(-1).mean())
    return torch.stack(values) if values else torch.zeros(0, dtype=torch.float64)
