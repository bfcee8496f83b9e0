"""How well a scorer finds the blocks exact attention needs: recall@k of the oracle's top-k blocks.

For each (batch, head, chunk) with n > 0 eligible blocks, the oracle's set is the kk = min(top_k, n) eligible
blocks that full causal attention gives the most mass (scorers.block_attention_mass); a scorer's set is its own
top kk (per head, or one set for all heads when shared). recall = |scorer set & oracle set| / kk, averaged over
batch and chunks. Beside it, for context: the attention mass that lands on eligible (past) blocks at all, and the
share of it that each scorer's blocks capture.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from hybridlm.kernels.se_attention.scorers import block_attention_mass, eligible_mask
from hybridlm.kernels.se_attention.torch_ref import block_scores, check_args, top_blocks


class BlockRecall(NamedTuple):
    recall: dict[str, Tensor]  # scorer -> (h,) mean recall@k of the oracle's top-k blocks
    captured_mass: dict[str, Tensor]  # scorer -> (h,) mean per-query attention mass on the scorer's blocks
    past_mass: Tensor  # (h,) mean per-query attention mass on all eligible blocks (the most any selection gets)


def _mass_of(selection: Tensor, mass: Tensor) -> Tensor:
    """selection (b, h or 1, T, k), mass (b, h, T, U) -> (b, h, T) mass of the selected blocks."""
    sel = selection.expand(mass.shape[0], mass.shape[1], -1, -1)
    return mass.gather(-1, sel.clamp(min=0)).masked_fill(sel < 0, 0.0).sum(-1)


@torch.no_grad()
def block_recall(q: Tensor, k: Tensor, v: Tensor, *, chunk_size: int, block_size: int, top_k: int,
                 scorers: tuple[str, ...] = ("paper", "moba", "quest", "nsa", "oracle"), shared: bool = False,
                 scale: float | None = None) -> BlockRecall:
    """Per-head recall@top_k of the oracle's blocks for each scorer, on one layer's q (b, h, L, d), k, v
    (b, hkv, L, d). Chunks without eligible blocks are left out of the means; a head whose every chunk is left
    out gets NaN."""
    for name in scorers:
        check_args(q, k, v, chunk_size, block_size, top_k, name)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1 for a recall, got {top_k}")
    b, h, length, _ = q.shape
    u = length // block_size
    dt = torch.promote_types(q.dtype, torch.float32)
    mass = block_attention_mass(q.to(dt), k.to(dt), chunk_size=chunk_size, block_size=block_size, scale=scale)
    mass = mass[..., :u]  # (b, h, T, U)
    elig = eligible_mask(length, chunk_size, block_size, q.device)  # (T, U)
    oracle = top_blocks(mass.masked_fill(~elig, float("-inf")), top_k)  # (b, h, T, top_k)
    kk = (oracle >= 0).sum(-1)  # (b, h, T) = min(top_k, eligible count)
    used = kk > 0
    queries = torch.tensor([min(chunk_size, length - i * chunk_size) for i in range(elig.shape[0])],
                           dtype=dt, device=q.device)  # queries per chunk

    def mean_over_chunks(x: Tensor) -> Tensor:  # (b, h, T) -> (h,) over the used (b, chunk) entries
        return (x * used).sum(dim=(0, 2)) / used.sum(dim=(0, 2))

    recall, captured = {}, {}
    for name in scorers:
        if name == "oracle" and not shared:
            sel = oracle
        else:
            scores = block_scores(q, k, v, chunk_size=chunk_size, block_size=block_size, scorer=name, scale=scale)
            sel = top_blocks(scores, top_k, shared).expand(b, h, -1, -1)
        hit = (sel[..., :, None] == oracle[..., None, :]) & (oracle >= 0)[..., None, :]
        recall[name] = mean_over_chunks(hit.sum(dim=(-2, -1)).to(dt) / kk.clamp(min=1))
        captured[name] = mean_over_chunks(_mass_of(sel, mass) / queries)
    past = mean_over_chunks(mass.masked_fill(~elig, 0.0).sum(-1) / queries)
    return BlockRecall(recall, captured, past)
