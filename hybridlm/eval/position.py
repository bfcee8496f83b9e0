"""Loss by position on sequences many times the training length, streamed, reported in log-spaced buckets.

Position p (0-based) is the prediction of token p+1 from tokens 0..p, i.e. with p+1 tokens of context, so a
sequence of L tokens has L-1 positions. Buckets: [0,1), [1,2), [2,4), [4,8), ..., the last one cut at L-1.
Summary (the paper's "does it length-generalize" number): mean loss in the last bucket divided by the mean loss
over positions [T/2, T) of the training length T; about 1 means no degradation beyond T, >> 1 means failure.
With a target id range, the same numbers are also computed over only the positions whose target token is in that
range (e.g. the answers of a recall task, whose loss is what a memory failure raises).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridlm.eval.streaming import chunks, model_device


@torch.no_grad()
def per_position_sums(model, sequences: Tensor, chunk_len: int, batch_size: int = 8,
                      target_range: tuple[int, int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """sequences (n, L) -> per position (L-1,) float64: summed next-token loss over the n sequences, and the summed
    loss and count of the positions whose target id is in [lo, hi) = target_range (zeros when None).
    Streamed chunk by chunk with the state passed along."""
    n, L = sequences.shape
    if L < 2:
        raise ValueError(f"loss_by_position needs sequences of >= 2 tokens, got {L}")
    device = model_device(model)
    # Summed on the model's device and copied to the host once at the end, not once per chunk.
    total = torch.zeros(L - 1, dtype=torch.float64, device=device)
    target_total = torch.zeros(L - 1, dtype=torch.float64, device=device)
    target_count = torch.zeros(L - 1, dtype=torch.float64, device=device)
    for rows in sequences.split(batch_size):
        rows = rows.to(device)
        state = None
        for s, piece in chunks(rows[:, :-1], chunk_len):  # inputs: tokens 0..L-2
            logits, state = model(piece, state)  # (b, c, V)
            targets = rows[:, s + 1:s + 1 + piece.shape[1]]  # (b, c): the next tokens
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32, fp64 stays
            loss = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").double()  # (b, c)
            span = slice(s, s + piece.shape[1])
            total[span] += loss.sum(0)
            if target_range is not None:
                hit = ((targets >= target_range[0]) & (targets < target_range[1])).double()  # (b, c)
                target_total[span] += (loss * hit).sum(0)
                target_count[span] += hit.sum(0)
    return total.cpu(), target_total.cpu(), target_count.cpu()


def per_position_loss(model, sequences: Tensor, chunk_len: int, batch_size: int = 8) -> Tensor:
    """sequences (n, L) -> mean next-token loss at each position (L-1,) float64, averaged over the n sequences."""
    return per_position_sums(model, sequences, chunk_len, batch_size)[0] / sequences.shape[0]


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

    target: TargetLoss | None = None  # the same restricted to positions whose target id is in a range

    def rows(self) -> list[list]:
        if self.target is None:
            return [[a, b, loss] for a, b, loss in zip(self.edges[:-1], self.edges[1:], self.bucket_loss)]
        return [[a, b, loss, t] for a, b, loss, t in
                zip(self.edges[:-1], self.edges[1:], self.bucket_loss, self.target.bucket_loss)]


@dataclass
class TargetLoss:
    """Loss restricted to positions whose target id is in [lo, hi): every mean below is sum(loss) / count over
    those positions only (nan where a span has none)."""

    id_range: tuple[int, int]
    per_position: Tensor  # (L-1,) mean over the sequences whose target there is in range (nan if none)
    count: Tensor  # (L-1,) how many sequences have an in-range target at each position
    bucket_loss: list[float]
    summary: float  # last bucket / positions [T/2, T), as LossByPosition.summary
    loss_within_train_len: float
    loss_beyond_train_len: float


def summarize_target(loss_sum: Tensor, count: Tensor, edges: list[int], train_len: int,
                     id_range: tuple[int, int]) -> TargetLoss:
    def mean(a: int, b: int) -> float:
        c = count[a:b].sum().item()
        return loss_sum[a:b].sum().item() / c if c else float("nan")

    buckets = [mean(a, b) for a, b in zip(edges[:-1], edges[1:])]
    n = loss_sum.shape[0]
    return TargetLoss(id_range=(int(id_range[0]), int(id_range[1])),
                      per_position=torch.where(count > 0, loss_sum / count.clamp(min=1), float("nan")),
                      count=count, bucket_loss=buckets, summary=buckets[-1] / mean(train_len // 2, train_len),
                      loss_within_train_len=mean(0, train_len), loss_beyond_train_len=mean(train_len, n))


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


def loss_by_position(model, sequences: Tensor, chunk_len: int, train_len: int, batch_size: int = 8,
                     target_range: tuple[int, int] | None = None) -> LossByPosition:
    """target_range [lo, hi): also the loss restricted to positions whose target id is in it (result.target)."""
    total, target_total, target_count = per_position_sums(model, sequences, chunk_len, batch_size, target_range)
    r = summarize(total / sequences.shape[0], train_len)
    if target_range is not None:
        r.target = summarize_target(target_total, target_count, r.edges, train_len, target_range)
    return r
