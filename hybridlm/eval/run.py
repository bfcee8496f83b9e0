"""The length report: run the selected diagnostics, write their tables and plots, log them.

`run_length_report` is what `python -m hybridlm.evaluate` and LengthEvalCallback call."""
from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from torch import Tensor

from hybridlm.data.tokenizers import ByteTokenizer, Tokenizer
from hybridlm.eval.attention import attention_label, with_eval_attention
from hybridlm.eval.block_recall import head_recalls, recall_rows, recall_summary
from hybridlm.eval.config import EvalConfig, recall_geometry
from hybridlm.eval.effrem import default_grid, effrem
from hybridlm.eval.position import loss_by_position
from hybridlm.eval.report import Diagnostic, emit
from hybridlm.eval.sequences import eval_sequences
from hybridlm.eval.state_norms import state_norms
from hybridlm.eval.tasks import copy_accuracy, passkey_grid

log = logging.getLogger(__name__)
SEQUENCE_DIAGNOSTICS = {"loss_by_position", "effrem", "state_norms", "block_recall"}  # these read evaluation sequences


def _mark_train_len(ax, T: int) -> None:
    ax.axvline(T, color="gray", linestyle="--", linewidth=1, label=f"training length T={T}")


def loss_by_position_diagnostic(model, seqs: Tensor, T: int, chunk_len: int, batch_size: int,
                                target_range: tuple[int, int] | None = None) -> Diagnostic:
    r = loss_by_position(model, seqs, chunk_len, T, batch_size, target_range)
    per_pos = r.per_position.tolist()
    # bucket [a, b) of positions = contexts a+1..b tokens; plotted at the geometric centre of that range
    mids = [((a + 1) * b) ** 0.5 for a, b in zip(r.edges[:-1], r.edges[1:])]
    tg = r.target

    def plot(ax):
        ax.plot(range(1, len(per_pos) + 1), per_pos, color="tab:blue", alpha=0.25, linewidth=0.5,
                label="per position")
        ax.plot(mids, r.bucket_loss, "o-", color="tab:blue", label="log bucket mean")
        if tg is not None:
            ax.plot(mids, tg.bucket_loss, "s-", color="tab:orange",
                    label=f"log bucket mean, targets in [{tg.id_range[0]}, {tg.id_range[1]})")
        _mark_train_len(ax, T)
        ax.set_xscale("log")
        ax.set_xlabel("position (tokens of context)")
        ax.set_ylabel("loss (nats)")
        ax.legend()

    columns = ["bucket_start", "bucket_end", "mean_loss"] + (["target_mean_loss"] if tg is not None else [])
    scalars = {"last_bucket_over_train_half": r.summary, "loss_within_T": r.loss_within_train_len,
               "loss_beyond_T": r.loss_beyond_train_len}
    meta = {"train_len": T, "eval_len": seqs.shape[1], "n_sequences": seqs.shape[0], "chunk_len": chunk_len,
            "per_position": per_pos,
            "summary": "mean loss in the last bucket / mean loss over positions [T/2, T)"}
    if tg is not None:
        scalars.update({"target_last_bucket_over_train_half": tg.summary, "target_loss_within_T":
                        tg.loss_within_train_len, "target_loss_beyond_T": tg.loss_beyond_train_len})
        meta.update({"target_id_range": list(tg.id_range), "per_position_target": tg.per_position.tolist(),
                     "per_position_target_count": tg.count.tolist()})
    return Diagnostic("loss_by_position", columns, r.rows(), plot, scalars=scalars, meta=meta)


def effrem_diagnostic(model, seqs: Tensor, T: int, grid: list[int], chunk_len: int, batch_size: int) -> Diagnostic:
    values = effrem(model, seqs, T, grid, chunk_len, batch_size).tolist()

    def plot(ax):
        ax.plot(grid, values, "o-")
        ax.set_xlabel("t (first t tokens dropped)")
        ax.set_ylabel(f"EffRem_T(t), T={T}")
        ax.set_ylim(0, 1)

    half = [v for t, v in zip(grid, values) if t <= T // 2]
    return Diagnostic("effrem", ["t", "effrem"], [[t, v] for t, v in zip(grid, values)], plot,
                      scalars={"at_half_T": half[-1] if half else float("nan")},
                      meta={"T": T, "n_sequences": seqs.shape[0], "definition": "TV(p(.|x[0:T]), p(.|x[t:T]))"})


def state_norms_diagnostic(model, seqs: Tensor, T: int, every: int, batch_size: int) -> Diagnostic:
    r = state_norms(model, seqs, every, batch_size)

    def plot(ax):
        for i, layer in enumerate(r.layers):
            ax.plot(r.positions, r.norms[i].tolist(), label=f"layer {layer}")
        _mark_train_len(ax, T)
        ax.set_xscale("log")
        ax.set_xlabel("position (tokens)")
        ax.set_ylabel("SSM state Frobenius norm")
        ax.legend(fontsize="small")

    final = r.norms[:, -1]
    at_T = min(range(len(r.positions)), key=lambda j: abs(r.positions[j] - T))
    return Diagnostic("state_norms", ["layer", "position", "norm"], r.rows(), plot,
                      scalars={"final_over_at_T": (final / r.norms[:, at_T]).max().item()},
                      meta={"every": every, "n_sequences": seqs.shape[0], "layers": r.layers})


def passkey_diagnostic(model, tokenizer: Tokenizer, cfg: EvalConfig, chunk_len: int,
                       haystacks: Tensor | None = None) -> Diagnostic:
    """haystacks: (m, L) token windows, one per sample, for eval.passkey_haystack=text; None for neutral."""
    acc = passkey_grid(model, tokenizer, cfg.passkey_lengths, cfg.passkey_depths, cfg.passkey_samples, chunk_len,
                       seed=cfg.seed, digits=cfg.passkey_digits,
                       fillers=None if haystacks is None else haystacks.tolist())

    def plot(ax):
        im = ax.imshow(acc.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(cfg.passkey_depths)), [f"{d:g}" for d in cfg.passkey_depths])
        ax.set_yticks(range(len(cfg.passkey_lengths)), [str(n) for n in cfg.passkey_lengths])
        ax.set_xlabel("needle depth")
        ax.set_ylabel("context length (tokens)")
        for i in range(acc.shape[0]):
            for j in range(acc.shape[1]):
                ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", color="w", fontsize="small")
        ax.figure.colorbar(im, ax=ax, label="accuracy")

    rows = [[n, d, acc[i, j].item()]
            for i, n in enumerate(cfg.passkey_lengths) for j, d in enumerate(cfg.passkey_depths)]
    return Diagnostic("passkey", ["context_len", "depth", "accuracy"], rows, plot,
                      scalars={"mean_accuracy": acc.mean().item(), "longest_accuracy": acc[-1].mean().item()},
                      meta={"samples_per_cell": cfg.passkey_samples, "digits": cfg.passkey_digits,
                            "haystack": cfg.passkey_haystack,
                            "tokenizer": getattr(tokenizer, "name", type(tokenizer).__name__)})


def copy_diagnostic(model, cfg: EvalConfig, vocab_size: int, chunk_len: int, batch_size: int) -> Diagnostic:
    acc = copy_accuracy(model, cfg.copy_lengths, vocab_size, cfg.copy_samples, chunk_len, cfg.copy_mode, cfg.seed,
                        batch_size).tolist()

    def plot(ax):
        ax.plot(cfg.copy_lengths, acc, "o-")
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("tokens to copy")
        ax.set_ylabel(f"token accuracy ({cfg.copy_mode})")

    return Diagnostic("copy", ["copy_len", "accuracy"], [[n, a] for n, a in zip(cfg.copy_lengths, acc)], plot,
                      scalars={"mean_accuracy": sum(acc) / len(acc)},
                      meta={"mode": cfg.copy_mode, "vocab_size": vocab_size, "samples": cfg.copy_samples})


def recall_lengths(cfg: EvalConfig, T: int) -> tuple[int, int]:
    """(sequence length, chunk size) of block_recall, the zeros resolved from the training length T and checked."""
    length, chunk = cfg.recall_seq_len or 8 * T, cfg.recall_chunk_size or T
    recall_geometry(length, chunk, cfg.recall_block_size, cfg.recall_top_k)
    return length, chunk


def block_recall_diagnostic(model, seqs: Tensor, cfg: EvalConfig, chunk_size: int) -> Diagnostic:
    heads = head_recalls(model, seqs, chunk_size=chunk_size, block_size=cfg.recall_block_size, top_k=cfg.recall_top_k,
                         scorers=list(cfg.recall_scorers), shared=cfg.recall_shared, batch_size=cfg.batch_size)
    order = sorted(heads, key=lambda r: -r.past_mass)

    def plot(ax):
        x = range(len(order))
        mass_ax = ax.twinx()
        mass_ax.bar(x, [r.past_mass for r in order], color="lightgray", width=0.8)
        mass_ax.set_ylabel("past_mass: attention on retrievable blocks", color="gray")
        mass_ax.set_ylim(0, 1.02)  # the same scale as the recall axis
        ax.set_zorder(mass_ax.get_zorder() + 1)  # the recall lines over the mass bars
        ax.patch.set_visible(False)
        for s in cfg.recall_scorers:
            ax.plot(x, [r.recall[s] for r in order], "o-", markersize=3, label=s)
        ax.set_xticks(list(x), [f"L{r.layer}h{r.head}" for r in order], rotation=90, fontsize="x-small")
        ax.set_xlabel("(layer, head), by past_mass, decreasing")
        ax.set_ylabel(f"recall@{cfg.recall_top_k} of the oracle's blocks")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize="small")

    return Diagnostic("block_recall", ["layer", "head", "scorer", "recall", "captured_mass", "past_mass"],
                      recall_rows(heads), plot, scalars=recall_summary(heads),
                      meta={"seq_len": seqs.shape[1], "n_sequences": seqs.shape[0], "chunk_size": chunk_size,
                            "block_size": cfg.recall_block_size, "top_k": cfg.recall_top_k,
                            "shared": cfg.recall_shared, "scorers": list(cfg.recall_scorers),
                            "definition": "recall: |scorer's top-k & oracle's top-k| / k per chunk (k = min(top_k, "
                                          "past blocks)), oracle = full causal attention mass per block; masses are "
                                          "per query; means over sequences and chunks with past blocks"})


def _write_per_position(d: Diagnostic, out_dir: Path) -> None:
    """The unbucketed per-position losses, to disk only (too long for a W&B table at 16x T)."""
    columns, values = ["position", "mean_loss"], [d.meta.pop("per_position")]
    if "per_position_target" in d.meta:
        columns += ["target_mean_loss", "target_count"]
        values += [d.meta.pop("per_position_target"), d.meta.pop("per_position_target_count")]
    with open(out_dir / "loss_by_position_per_position.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows([p, *vals] for p, vals in enumerate(zip(*values)))


def run_length_report(model, datamodule_or_sequences: Any, cfg: EvalConfig, out_dir, loggers: Sequence[Logger] = (),
                      *, train_len: int | None = None, tokenizer: Tokenizer | None = None,
                      step: int = 0) -> dict[str, dict[str, float]]:
    """Run cfg.diagnostics on `model`; write {name}.csv/.json/.png into out_dir; log to `loggers` at `step`.

    datamodule_or_sequences: a HybridDataModule (sequences from its validation split, training length, tokenizer
    and copy vocabulary from its config) or a LongTensor (n, L) of token sequences (then give train_len).
    The model evaluated is `with_eval_attention(model, cfg.attention)`: `model` for eval.attention=same, else one
    of the same weights with the attention kind swapped; each diagnostic's JSON records it under meta "attention".
    Returns {diagnostic: {scalar: value}}."""
    cfg.validate()
    model = with_eval_attention(model, cfg.attention)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dm = None if isinstance(datamodule_or_sequences, Tensor) else datamodule_or_sequences
    T = train_len or (dm.cfg.seq_len if dm is not None else None)
    if T is None:
        raise ValueError("run_length_report: give train_len when passing sequences instead of a data module")
    chunk = cfg.chunk_len or T
    batch = cfg.batch_size
    needs_seqs = SEQUENCE_DIAGNOSTICS & set(cfg.diagnostics)

    def sequences(length: int, key: str = "eval.max_len", exact: bool = False) -> tuple[Tensor, str]:
        """n_sequences of `length` tokens (given ones may be shorter unless exact); `key` asked for the length."""
        if dm is not None:
            return eval_sequences(dm, cfg.n_sequences, length, key)
        given = datamodule_or_sequences
        if exact and given.shape[1] < length:
            raise ValueError(f"{key}: block_recall needs sequences of {length} tokens, the given ones have "
                             f"{given.shape[1]}")
        return given[:cfg.n_sequences, :length], "given sequences"

    recall_len, recall_chunk = recall_lengths(cfg, T) if "block_recall" in cfg.diagnostics else (0, 0)
    seqs, source = sequences(cfg.max_len or 16 * T) if needs_seqs - {"block_recall"} else (None, None)
    tokenizer = tokenizer or getattr(dm, "tokenizer", None) or ByteTokenizer()
    copy_vocab = cfg.copy_vocab_size or (dm.cfg.synthetic.vocab_size if dm is not None else model.cfg.vocab_size)

    was_training = model.training
    model.eval()
    results: dict[str, dict[str, float]] = {}
    try:
        for name in cfg.diagnostics:
            if name == "loss_by_position":
                target = tuple(cfg.target_id_range) if cfg.target_id_range else None
                d = loss_by_position_diagnostic(model, seqs, T, chunk, batch, target)
                _write_per_position(d, out_dir)
            elif name == "effrem":
                ET = cfg.effrem_T or T
                grid = list(cfg.effrem_grid) or default_grid(ET, cfg.effrem_points)
                d = effrem_diagnostic(model, seqs, ET, grid, chunk, batch)
            elif name == "state_norms":
                d = state_norms_diagnostic(model, seqs, T, cfg.state_norm_every or chunk, batch)
            elif name == "passkey":
                haystacks = None
                if cfg.passkey_haystack == "text":
                    haystacks, hay_source = sequences(max(cfg.passkey_lengths), "eval.passkey_lengths")
                d = passkey_diagnostic(model, tokenizer, cfg, chunk, haystacks)
                if haystacks is not None:
                    d.meta["haystack_source"] = hay_source
            elif name == "block_recall":
                recall_seqs, recall_source = sequences(recall_len, "eval.recall_seq_len", exact=True)
                d = block_recall_diagnostic(model, recall_seqs, cfg, recall_chunk)
                d.meta["sequences"] = recall_source
            else:
                d = copy_diagnostic(model, cfg, copy_vocab, chunk, batch)
            if name in needs_seqs - {"block_recall"}:
                d.meta["sequences"] = source
            d.meta["attention"] = attention_label(model)
            emit(d, out_dir, loggers, step)
            results[name] = dict(d.scalars)
            log.info("length eval %s: %s", name, ", ".join(f"{k}={v:.4g}" for k, v in d.scalars.items()))
    finally:
        model.train(was_training)
    for lg in loggers:
        lg.save()
    return results
