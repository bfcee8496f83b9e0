"""The SE-Attn scorer diagnostic (docs/design.md §4): does a block scorer retrieve the blocks that exact attention
needs? On validation sequences run in one pass, the q, k, v of every attention layer are captured and, per layer
and head, `block_recall` (kernels/se_attention/recall.py) measures for each scorer the recall@k of the oracle's
top-k blocks (the blocks full causal attention gives the most mass), the attention mass the scorer's blocks
capture, and the mass on all retrievable blocks (past_mass: the share of the head's attention that retrieval can
serve at all; what a missed block costs is at most this).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from hybridlm.eval.streaming import model_device
from hybridlm.kernels.se_attention.recall import block_recall
from hybridlm.models.hybrid_lm import HybridLM

QKV = tuple[Tensor, Tensor, Tensor]


@contextmanager
def captured_qkv(model: HybridLM) -> Iterator[dict[int, list[QKV]]]:
    """Inside the block, every forward of an attention layer appends the (q (b, h, L, d), k, v (b, hkv, L', d))
    it attends with (projected, convolved, positions applied; k, v after any cached keys) to the list of its layer
    index. Each mixer's `attend` (the one step that receives q, k, v) is wrapped on the instance and restored on
    exit; the layers come from model.attention_layers()."""
    got: dict[int, list[QKV]] = {i: [] for i, _ in model.attention_layers()}

    def recording(i: int, attend):
        def attend_and_record(q: Tensor, k: Tensor, v: Tensor, *args, **kwargs):
            got[i].append((q.detach(), k.detach(), v.detach()))
            return attend(q, k, v, *args, **kwargs)
        return attend_and_record

    layers = model.attention_layers()
    try:
        for i, mixer in layers:
            mixer.attend = recording(i, mixer.attend)  # an instance attribute shadows the class's method
        yield got
    finally:
        for _, mixer in layers:
            mixer.__dict__.pop("attend", None)


@dataclass
class HeadRecall:
    layer: int
    head: int
    past_mass: float  # mean per-query attention mass on the blocks wholly before the query's chunk
    recall: dict[str, float]  # scorer -> mean recall@k of the oracle's top-k blocks
    captured_mass: dict[str, float]  # scorer -> mean per-query attention mass on the scorer's blocks


@torch.no_grad()
def head_recalls(model: HybridLM, sequences: Tensor, *, chunk_size: int, block_size: int, top_k: int,
                 scorers: list[str], shared: bool, batch_size: int) -> list[HeadRecall]:
    """sequences (n, L), run `batch_size` at a time in one pass each -> one HeadRecall per (attention layer, query
    head), in layer then head order; means over sequences and over the chunks that have past blocks. block_recall
    runs one sequence at a time, which bounds its memory (O(h M key_tile) for the oracle's exact mass)."""
    if not model.attention_layers():
        raise ValueError("eval.diagnostics: block_recall measures attention layers, and this model has none "
                         f"(model.layer_pattern={model.cfg.layer_pattern!r})")
    n, length = sequences.shape
    sums: dict[int, dict[str, Tensor]] = {}
    for rows in sequences.split(batch_size):
        with captured_qkv(model) as got:
            model(rows.to(model_device(model)))
        for layer, calls in got.items():
            ((q, k, v),) = calls  # one pass: one call per layer
            if k.shape[2] != length:
                raise ValueError(f"layer {layer} attended over {k.shape[2]} keys for {length} queries; block_recall "
                                 "needs one pass over the whole sequence")
            acc = sums.setdefault(layer, {})
            for b in range(q.shape[0]):
                r = block_recall(q[b:b + 1], k[b:b + 1], v[b:b + 1], chunk_size=chunk_size, block_size=block_size,
                                 top_k=top_k, scorers=tuple(scorers), shared=shared)
                parts = {"past": r.past_mass, **{f"recall/{s}": r.recall[s] for s in scorers},
                         **{f"captured/{s}": r.captured_mass[s] for s in scorers}}
                for key, val in parts.items():
                    acc[key] = acc.get(key, 0) + val.double().cpu()
    out = []
    for layer in sorted(sums):
        mean = {key: (val / n).tolist() for key, val in sums[layer].items()}
        for h in range(len(mean["past"])):
            out.append(HeadRecall(layer, h, mean["past"][h], {s: mean[f"recall/{s}"][h] for s in scorers},
                                  {s: mean[f"captured/{s}"][h] for s in scorers}))
    return out


def recall_rows(heads: list[HeadRecall]) -> list[list]:
    """The table: [layer, head, scorer, recall, captured_mass, past_mass], one row per (layer, head, scorer)."""
    return [[r.layer, r.head, s, r.recall[s], r.captured_mass[s], r.past_mass] for r in heads for s in r.recall]


def recall_summary(heads: list[HeadRecall]) -> dict[str, float]:
    """Per scorer: mean recall over all (layer, head), and its mean weighted by past_mass (the heads that put
    more attention on retrievable blocks count more: what the issue's target reads "on the heads that carry most
    attention mass")."""
    total = sum(r.past_mass for r in heads)
    out = {}
    for s in heads[0].recall:
        out[f"recall_{s}"] = sum(r.recall[s] for r in heads) / len(heads)
        out[f"recall_{s}_mass_weighted"] = (sum(r.recall[s] * r.past_mass for r in heads) / total if total > 0
                                            else float("nan"))
    return out
