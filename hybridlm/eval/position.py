"""Loss by position on sequences many times the training length, streamed, reported in log-spaced buckets.

Position p (0-based) is the prediction of token p+1 from tokens 0..p, i.e. with p+1 tokens of context, so a
sequence of L tokens has L-1 positions. Buckets: [0,1), [1,2), [2,4), [4,8), ..., the last one cut at L-1.
Summary (the paper's "does it length-generalize" number): mean loss in the last bucket divided by the mean loss
over positions [T/2, T) of the training length T; about 1 means no degradation beyond T, >> 1 means failure.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridlm.eval.streaming import chunks, model_device


@torch.no_grad()
def per_position_loss(model, sequences: Tensor, chunk_len: int, batch_size: int = 8) -> Tensor:
    """sequences (n, L) -> mean next-token loss at each position (L-1,) float64, averaged over the n sequences.
    Streamed chunk by chunk with the state passed along."""
    n, L = sequences.shape
    if L < 2:
        raise ValueError(f"loss_by_position needs sequences of >= 2 tokens, got {L}")
    device = model_device(model)
    total = torch.zeros(L - 1, dtype=torch.float64)
    for rows in sequences.split(batch_size):
        rows = rows.to(device)
        state = None
        for s, piece in chunks(rows[:, :-1], chunk_len):  # inputs: tokens 0..L-2
            logits, state = model(piece, state)  # (b, c, V)
            targets = rows[:, s + 1:s + 1 + piece.shape[1]]  # (b, c): the next tokens
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32, fp64 stays
            loss = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (b, c)
            total[s:s + piece.shape[1]] += loss.double().sum(0).cpu()
    return total / n


def log_bucket_edges(n_positions: int) -> list[int]:
    """[0, 1, 2, 4, 8, ..., n_positions]: bucket k is [edges[k], edges[k+1])."""
    edges, e = [0], 1
    while e < n_positions:
        edges.append(e)
        e *= 2
    edges.append(n_positions)
    return edges


@dataclass
class LossByPosition:
    per_position: Tensor  # (L-1,) float64
    edges: list[int]  # bucket edges, len = buckets + 1
    bucket_loss: list[float]  # mean loss per bucket
    train_len: int
    summary: float  # mean loss in the last bucket / mean loss over positions [T/2, T)
    loss_within_train_len: float  # mean over positions [0, T)
    loss_beyond_train_len: float  # mean over positions [T, L-1) (nan if none)

    def rows(self) -> list[list]:
        return [[a, b, loss] for a, b, loss in zip(self.edges[:-1], self.edges[1:], self.bucket_loss)]


def summarize(per_position: Tensor, train_len: int) -> LossByPosition:
    n = per_position.shape[0]
    if not 2 <= train_len <= n:
        raise ValueError(f"loss_by_position: training length T={train_len} must be in [2, positions={n}] "
                         "(evaluate on sequences longer than T)")
    edges = log_bucket_edges(n)
    buckets = [per_position[a:b].mean().item() for a, b in zip(edges[:-1], edges[1:])]
    reference = per_position[train_len // 2:train_len].mean().item()
    beyond = per_position[train_len:]
    return LossByPosition(per_position=per_position, edges=edges, bucket_loss=buckets, train_len=train_len,
                          summary=buckets[-1] / reference,
                          loss_within_train_len=per_position[:train_len].mean().item(),
                          loss_beyond_train_len=beyond.mean().item() if beyond.numel() else float("nan"))


def loss_by_position(model, sequences: Tensor, chunk_len: int, train_len: int, batch_size: int = 8) -> LossByPosition:
    return summarize(per_position_loss(model, sequences, chunk_len, batch_size), train_len)
