"""The table and figure of `make repro-sespan` (Expansion Span, Nunez et al. 2024) from its runs: the stages of
conf/experiment/sespan/repro/, found under one folder by the experiment each job ran (`+experiment=...`):

- pretrain:  one run; its wall time, peak RSS and time per step are quoted for scale;
- adapt:     one job per attention variant x adapter; peak RSS and wall time from its result.json, time per step
             from its CSV log;
- eval:      the passkey grid and loss by position of every adapted checkpoint (matched by ckpt_path);
- zero_shot: the same evaluation of the pretrained checkpoint, attention switched at evaluation only;
- timing:    each adaptation job's configuration run alone for a few steps: its fastest step.

Writes {out}/table.md, results.json and figure.png.

Measurements:
- passkey accuracy beyond the window: exact-match accuracy over the grid cells whose whole key ends before the
  sliding window of the query that predicts the first answer token (computed from the prompt geometry of
  `passkey_prompt` and the pretrained window W); "within" cells have the whole key inside that window.
- time per step: median over training steps of (tokens per step) / train/tokens_per_s from the job's CSV log
  (logged every step), i.e. wall time between consecutive step ends, data loading included.
- peak memory: the job's own peak resident set (hybridlm.usage): interpreter, torch, the corpus and the model (the
  same for every job) plus the largest training step's activations, gradients and optimizer state. Validation at
  the end of training is included; the evaluation runs in other jobs and is not.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import yaml

from hybridlm.results import Job, last_finished, read_jobs, wall_span_seconds

# Attention variants: name -> the model overrides of its jobs (all compatible with the pretrained weights).
VARIANTS = {
    "swa": ["model/attention=swa"],
    "full": ["model/attention=full"],
    "s2": ["model/attention=s2"],
    "se_attn": ["model/attention=se_attn"],
    # SE-Attn scores a query chunk with the C queries *before* it (causal scoring, ops/span_attention.py). With
    # C = 64 the chunk holding a training row's answer (positions 1018-1023) is scored with filler queries
    # (897-960), never with the 37-token question; with C = 16 it is scored with queries inside the question.
    "se_attn_c16": ["model/attention=se_attn", "model.attn.query_chunk=16"],
}
ADAPTERS = ("lora_plus", "hylora")
PRETRAINED = "none (pretrained)"  # the adapter column of the rows without adaptation
COLORS = {"swa": "tab:blue", "full": "tab:green", "s2": "tab:orange", "se_attn": "tab:red", "se_attn_c16": "tab:purple"}
STAGES = ("pretrain", "adapt", "eval", "zero_shot", "timing")  # conf/experiment/sespan/repro/<stage>.yaml


def stage(job: Job) -> Optional[str]:
    name = (job.override("experiment") or "").removeprefix("sespan/repro/")
    return name if name in STAGES else None


def variant(job: Job) -> str:
    """The attention variant a job ran with, from its model overrides ("" when it has none)."""
    model = sorted(o for o in job.overrides if o.startswith("model"))
    return next((name for name, ovs in VARIANTS.items() if sorted(ovs) == model), " ".join(model))


def order(name: str) -> int:
    return list(VARIANTS).index(name) if name in VARIANTS else len(VARIANTS)


def checkpoint(job: Job) -> Path:
    return (job.out_dir / "checkpoints" / "last.ckpt").resolve()


# ----- reading the jobs -------------------------------------------------------------------------------------------

def step_seconds(job: Job) -> list[float]:
    """Wall time of every logged training step, from the CSV log's train/tokens_per_s."""
    tokens = job.config["data"]["batch_size"] * job.config["data"]["seq_len"]
    with open(job.out_dir / "csv" / "metrics.csv") as f:
        rates = [float(r["train/tokens_per_s"]) for r in csv.DictReader(f) if r.get("train/tokens_per_s")]
    return [tokens / r for r in rates if r > 0]


def trainable_params(job: Job) -> Optional[int]:
    hp = job.out_dir / "csv" / "hparams.yaml"
    return yaml.safe_load(hp.read_text()).get("params/trainable") if hp.exists() else None


def key_placement(window: int, digits: int) -> Callable[[int, float], str]:
    """Where the key sits in each (context length, depth) prompt of the grid relative to the window of the query
    predicting the first answer token (the last prompt token, index n-1, sees keys n-W .. n-1): 'beyond' if the
    whole key is before it, 'within' if the whole key is inside it, 'partial' otherwise."""
    from hybridlm.data.synthetic import passkey_prompt
    from hybridlm.data.tokenizers import ByteTokenizer

    tok = ByteTokenizer()

    def where(n: int, depth: float) -> str:
        p = passkey_prompt(tok, n, depth, key=10 ** (digits - 1))
        first, last = p.key_pos, p.key_pos + len(p.answer_ids) - 1
        return "beyond" if last < n - window else "within" if first >= n - window else "partial"

    return where


def summarize_eval(job: Job, where: Callable[[int, float], str]) -> dict:
    if not job.ok:
        return {"error": f"evaluation failed: {job.error}"}
    report = job.out_dir / job.config["eval"]["out_dir"]
    passkey = json.loads((report / "passkey.json").read_text())
    cells = [{"context_len": n, "depth": d, "accuracy": a, "key": where(n, d)} for n, d, a in passkey["rows"]]
    samples = passkey["meta"]["samples_per_cell"]

    def acc(kind: str) -> float:
        sel = [c["accuracy"] for c in cells if c["key"] == kind]
        return sum(sel) / len(sel) if sel else math.nan

    with open(report / "loss_by_position_per_position.csv") as f:
        loss = [float(r["mean_loss"]) for r in csv.DictReader(f)]
    return {"passkey_beyond": acc("beyond"), "passkey_within": acc("within"), "passkey_cells": cells,
            "passkey_samples_per_cell": samples,
            "n_beyond_prompts": samples * sum(c["key"] == "beyond" for c in cells),
            "n_within_prompts": samples * sum(c["key"] == "within" for c in cells),
            "loss_per_position": loss}


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def binned(loss: list[float], bin_len: int) -> tuple[list[float], list[float]]:
    """(bin centres, mean loss per bin of bin_len positions)."""
    starts = range(0, len(loss), bin_len)
    return [(s + min(s + bin_len, len(loss))) / 2 for s in starts], [mean(loss[s:s + bin_len]) for s in starts]


def for_json(row: dict, bin_len: int = 16) -> dict:
    """The row with the per-position losses in bins of bin_len (each run's full curve stays in its
    length_eval/loss_by_position_per_position.csv) and floats rounded to 4 decimals, to keep results.json small."""
    def rounded(x):
        if isinstance(x, float):
            return round(x, 4)
        if isinstance(x, list):
            return [rounded(v) for v in x]
        if isinstance(x, dict):
            return {k: rounded(v) for k, v in x.items()}
        return x

    out = {k: v for k, v in row.items() if k != "loss_per_position"}
    if "loss_per_position" in row:
        out[f"loss_by_position_bins_of_{bin_len}"] = binned(row["loss_per_position"], bin_len)[1]
    return rounded(out)


def collect(jobs: list[Job], command: str, loss_bin: int) -> tuple[list[dict], dict]:
    """Rows of the comparison (the pretrained model with each attention kind, then one row per attention variant x
    adapter) and the settings and figures the table quotes."""
    by_stage = {s: [j for j in jobs if stage(j) == s] for s in STAGES}
    if len(by_stage["pretrain"]) != 1:
        raise ValueError(f"expected one pretraining run (+experiment=sespan/repro/pretrain), found "
                         f"{len(by_stage['pretrain'])}")
    pre = by_stage["pretrain"][0]
    adapt = sorted(by_stage["adapt"], key=lambda j: (order(variant(j)), ADAPTERS.index(j.override("adapter"))))
    timing = {(variant(j), j.override("adapter")): j for j in by_stage["timing"]}
    evals = {Path(j.override("ckpt_path")).resolve(): j for j in by_stage["eval"]}
    zero_shot = sorted(by_stage["zero_shot"], key=lambda j: order(variant(j)))
    window = pre.config["model"]["attn"]["window"]
    eval_cfg = next((j.config["eval"] for j in by_stage["eval"] + zero_shot if j.ok), {})
    where = key_placement(window, eval_cfg.get("passkey_digits", 5))

    rows = []
    for job in zero_shot:
        rows.append({"attention": variant(job), "adapter": PRETRAINED, "trainable_params": 0,
                     **summarize_eval(job, where)})
    for job in adapt:
        name, adapter = variant(job), job.override("adapter")
        row = {"attention": name, "adapter": adapter, "peak_rss_mb": job.peak_rss_mb,
               "train_seconds": job.wall_seconds, "log": str(job.log)}
        if not job.ok:
            row["error"] = f"training failed: {job.error}"
        else:
            times = step_seconds(job)
            timed = timing.get((name, adapter))
            alone = step_seconds(timed) if timed is not None and timed.ok else []
            row.update(step_seconds=statistics.median(times) if times else math.nan, step_seconds_all=times,
                       step_seconds_isolated=min(alone) if alone else math.nan, trainable_params=trainable_params(job))
            ev = evals.get(checkpoint(job))
            row.update(summarize_eval(ev, where) if ev is not None else {"error": "no evaluation job"})
        rows.append(row)

    adapt_cfg = next((j.config for j in adapt if j.ok), None)
    T = pre.config["data"]["seq_len"]
    L = adapt_cfg["data"]["seq_len"] if adapt_cfg else 8 * T
    for r in rows:
        loss = r.get("loss_per_position")
        if loss:
            r.update(loss_lt_T=mean(loss[:T]), loss_T_to_adapt=mean(loss[T:L]), loss_beyond_adapt=mean(loss[L:]))
    ok = [r for r in rows if "passkey_cells" in r]
    last = last_finished(jobs)
    wall = wall_span_seconds(jobs)
    timed_steps = [len(step_seconds(j)) for j in by_stage["timing"] if j.ok]
    meta = {"command": command, "wall_minutes": wall / 60 if wall is not None else math.nan,
            "cpus": last.resources["cpus"] if last else None,
            "load_average": " / ".join(f"{x:.1f}" for x in last.resources["load_average"]) if last else "?",
            "parallel": adapt[0].parallel if adapt else None,
            "threads": adapt[0].resources.get("threads") if adapt else None,
            "timing_steps": min(timed_steps) if timed_steps else 0,
            "timing_run_steps": by_stage["timing"][0].config["trainer"]["max_steps"] if by_stage["timing"] else 0,
            "pretrain_len": T, "window": window, "adapt_len": L, "eval_len": eval_cfg.get("max_len"),
            "pretrain_steps": pre.config["trainer"]["max_steps"], "pretrain_batch": pre.config["data"]["batch_size"],
            "pretrain_mix_prob": pre.config["data"]["mix_prob"],
            "adapt_steps": adapt_cfg["trainer"]["max_steps"] if adapt_cfg else None,
            "adapt_batch": adapt_cfg["data"]["batch_size"] if adapt_cfg else None,
            "adapt_lr": adapt_cfg["optim"]["lr"] if adapt_cfg else None,
            "samples_per_cell": eval_cfg.get("passkey_samples"), "passkey_lengths": eval_cfg.get("passkey_lengths"),
            "passkey_depths": eval_cfg.get("passkey_depths"), "loss_sequences": eval_cfg.get("n_sequences"),
            "n_beyond": ok[0]["n_beyond_prompts"] if ok else 0, "n_within": ok[0]["n_within_prompts"] if ok else 0,
            "loss_bin": loss_bin,
            "pretrain": {"seconds": pre.wall_seconds, "peak_rss_mb": pre.peak_rss_mb,
                         "step_seconds_median": statistics.median(step_seconds(pre) or [math.nan])},
            "eval_seconds": {**{f"pretrained {variant(j)}": j.wall_seconds for j in zero_shot},
                             **{f"{variant(a)}+{a.override('adapter')}": evals[checkpoint(a)].wall_seconds
                                for a in adapt if checkpoint(a) in evals}}}
    return rows, meta


# ----- outputs ----------------------------------------------------------------------------------------------------

def fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def write_table(rows: list[dict], meta: dict, path: Path) -> None:
    T, W, L = meta["pretrain_len"], meta["window"], meta["adapt_len"]
    E = meta["eval_len"]
    head = ["attention (training)", "adapter", "trainable params", "passkey beyond window", "passkey within window",
            f"loss pos <{T}", f"loss {T}-{L}", f"loss {L}-{E}", "s / step in run", "s / step isolated",
            "peak RSS (MB)"]
    lines = [f"# Expansion Span on CPU: adapting a T={T} hybrid to {L} tokens", "",
             f"`{meta['command']}` — {meta['wall_minutes']:.1f} min wall on {meta['cpus']} CPU cores "
             f"(load average {meta['load_average']}: the machine was shared).", "",
             f"Pretraining: {meta['pretrain_steps']} steps at T={T} (sliding window W={W}), a share "
             f"{meta['pretrain_mix_prob']} of the rows passkey prompts; adaptation: {meta['adapt_steps']} steps at "
             f"{L} tokens, batch {meta['adapt_batch']}, lr {meta['adapt_lr']}. Passkey: exact match, "
             f"{meta['samples_per_cell']} prompts per (length, depth) cell, lengths {meta['passkey_lengths']}, "
             f"depths {meta['passkey_depths']}; {meta['n_beyond']} prompts have the key beyond the W={W} window "
             f"of the answering query, {meta['n_within']} within it. Loss: mean next-token loss (nats) over "
             f"{meta['loss_sequences']} validation windows of {E} tokens, streamed.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["attention"], r["adapter"], fmt(r.get("trainable_params"), ",d"),
                 fmt(r.get("passkey_beyond"), ".2f"), fmt(r.get("passkey_within"), ".2f"),
                 fmt(r.get("loss_lt_T")), fmt(r.get("loss_T_to_adapt")), fmt(r.get("loss_beyond_adapt")),
                 fmt(r.get("step_seconds"), ".2f"), fmt(r.get("step_seconds_isolated"), ".2f"),
                 fmt(r.get("peak_rss_mb"), ".0f")]
        if r.get("error"):
            cells[3] = f"FAILED: {r['error']}"
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Notes:",
              "- s2 trains with LongLoRA's shifted sparse attention and is evaluated with full attention.",
              "- se_attn_c16: SE-Attn with query chunks of 16 tokens instead of 64. A chunk is scored with the "
              "queries before it, so with 64 the chunk holding a training row's answer is scored with filler "
              "queries only, never with the question (see VARIANTS in hybridlm/results/sespan.py).",
              "- `none (pretrained)` rows are the pretrained checkpoint without adaptation; attention kinds other "
              "than swa are switched at evaluation only.",
              "- s / step in run: median wall time between training step ends (data loading included) of that "
              f"job; {meta['parallel']} jobs ran at a time with {meta['threads']} thread(s) each, on a shared "
              "machine, so outside load shows in it.",
              f"- s / step isolated: the fastest of the {meta['timing_steps']} timed steps of a "
              f"{meta['timing_run_steps']}-step run of the same job configuration, after all the others, one job at "
              "a time (data loading included).",
              "- peak RSS: the adaptation job's own peak resident memory (the high-water mark of its process, reset "
              "when the job starts): interpreter, torch, corpus, model (the same for every job) plus the largest "
              "step; from the job's result.json. For scale, the pretraining job "
              f"(steps of {meta['pretrain_batch']} x {T} tokens) peaked at "
              f"{fmt(meta['pretrain']['peak_rss_mb'], '.0f')} MB.", ""]
    path.write_text("\n".join(lines))


def write_figure(rows: list[dict], meta: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(17, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax_bar, ax_loss, ax_diff = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1.1, 1.1]})
    groups = [PRETRAINED, *ADAPTERS]
    kinds = sorted({r["attention"] for r in rows}, key=lambda k: (order(k), k))
    width = 0.8 / len(groups)
    for g, adapter in enumerate(groups):
        for i, kind in enumerate(kinds):
            r = next((r for r in rows if r["attention"] == kind and r["adapter"] == adapter), None)
            if r is None or math.isnan(r.get("passkey_beyond", math.nan)):
                continue
            x = i + (g - (len(groups) - 1) / 2) * width
            ax_bar.bar(x, r["passkey_beyond"], width, color=COLORS.get(kind, "gray"), alpha=(0.35, 0.7, 1.0)[g],
                       hatch=("//", "", "")[g], edgecolor="black", linewidth=0.5)
            ax_bar.plot(x, r["passkey_within"], "k_", markersize=10)
            ax_bar.text(x, r["passkey_beyond"] + 0.02, ("pre", "L+", "Hy")[g], ha="center", fontsize=7)
    ax_bar.set_xticks(range(len(kinds)), [v.replace("_c", "\nC=") for v in kinds], fontsize=8)
    ax_bar.set_ylim(0, 1.1)
    ax_bar.set_ylabel(f"passkey exact match, key beyond the W={meta['window']} window")
    ax_bar.set_title("bars: key beyond the window; black ticks: key within it\n"
                     "pre = pretrained, no adaptation; L+ = lora_plus; Hy = hylora", fontsize=9)

    # Loss by position: absolute, and minus the pretrained sliding-window model's (the text's own difficulty,
    # which dominates the absolute curves, cancels in the difference).
    bin_len = meta["loss_bin"]
    reference = next((r.get("loss_per_position") for r in rows
                      if r["attention"] == "swa" and r["adapter"] == PRETRAINED), None)
    for r in rows:
        loss = r.get("loss_per_position")
        if not loss:
            continue
        style = {PRETRAINED: ":", "lora_plus": "--", "hylora": "-"}[r["adapter"]]
        kw = {"color": COLORS.get(r["attention"], "gray"), "linewidth": 1.2,
              "label": f"{r['attention']}, {r['adapter']}"}
        ax_loss.plot(*binned(loss, bin_len), style, **kw)
        if reference:
            ax_diff.plot(*binned([a - b for a, b in zip(loss, reference)], bin_len), style, **kw)
    ax_diff.axhline(0, color="black", linewidth=0.6)
    for ax in (ax_loss, ax_diff):
        for x, label in ((meta["pretrain_len"], f"T = W = {meta['pretrain_len']}"), (meta["adapt_len"], "8T")):
            ax.axvline(x, color="gray", linewidth=0.8, linestyle="-.")
            ax.annotate(label, (x, 1), xycoords=("data", "axes fraction"), xytext=(3, -10),
                        textcoords="offset points", fontsize=8, color="gray")
        ax.set_xlabel(f"position (tokens of context; means over bins of {bin_len})")
    ax_loss.set_ylabel("next-token loss (nats)")
    ax_loss.set_title(f"loss by position, {meta['loss_sequences']} validation windows", fontsize=9)
    ax_diff.set_ylabel("loss minus the pretrained swa model's (nats)")
    ax_diff.set_title("loss by position relative to the pretrained model", fontsize=9)
    ax_diff.legend(fontsize=6.5, ncol=2)
    fig.tight_layout()
    fig.savefig(path)


def write(runs: Path, out: Path, command: str, loss_bin: int = 128) -> bool:
    """Read the runs under `runs`, write the outputs to `out`; False when a job failed or a row is incomplete."""
    jobs = read_jobs(runs)
    rows, meta = collect(jobs, command, loss_bin)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "runs": [for_json(r) for r in rows]}, indent=1))
    write_table(rows, meta, out / "table.md")
    write_figure(rows, meta, out / "figure.png")
    failed = [j for j in jobs if stage(j) and not j.ok]
    return not failed and all("error" not in r for r in rows)
