"""`make repro-sespan`: the Expansion Span experiment (Nunez et al. 2024) end to end on CPU.

1. pretrain  `python -m hybridlm.train +experiment=sespan/pretrain`: a small Mamba-2 + sliding-window-attention
             hybrid at T = 128 on standard-library text mixed with passkey rows.
2. adapt     `python -m hybridlm.train +experiment=sespan/adapt init_from=<pretrained> model/attention=<kind>
             adapter=<recipe>` at 8T = 1024 for every kind x recipe, one subprocess per job.
3. evaluate  `python -m hybridlm.evaluate -m +experiment=sespan/eval ckpt_path=...`: the passkey grid and loss by
             position of every adapted checkpoint, and of the pretrained one without adaptation (with its own
             sliding window and, switched at evaluation only, other attention kinds).
Attention "kinds" are the variants of VARIANTS below: the four kinds of the issue, and SE-Attn with a shorter
query chunk (why: the comment there).
4. collect   results/sespan/{table.md, results.json, figure.png}.

Measurements:
- passkey accuracy beyond the window: exact-match accuracy over the grid cells whose whole key ends before the
  sliding window of the query that predicts the first answer token (computed from the prompt geometry of
  `passkey_prompt` and the pretrained window W); "within" cells have the whole key inside that window.
- time per step: median over training steps of (tokens per step) / train/tokens_per_s from the job's CSV log
  (logged every step), i.e. wall time between consecutive step ends, data loading included.
- peak memory: each job runs in its own process and the parent reads that process's peak resident set size
  (ru_maxrss from os.wait4). It is process-wide: interpreter, torch, the corpus and the model (the same for
  every job) plus the largest training step's activations, gradients and optimizer state. Validation at the end
  of training is included; evaluation runs in other processes and is not.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# Attention variants: name -> model overrides on top of the pretrained checkpoint (all compatible with its weights).
VARIANTS = {
    "swa": ["model/attention=swa"],
    "full": ["model/attention=full"],
    "s2": ["model/attention=s2"],
    "se_attn": ["model/attention=se_attn"],
    # SE-Attn scores a query chunk with the C queries *before* it (causal scoring,
    # kernels/span_attention/selection.py). With C = 64 the chunk holding a training row's answer (positions
    # 1018-1023) is scored with filler queries (897-960), never with the 37-token question; with C = 16 it is
    # scored with queries inside the question.
    "se_attn_c16": ["model/attention=se_attn", "model.attn.query_chunk=16"],
}
ADAPTERS = ("lora_plus", "hylora")
ZERO_SHOT = ("swa", "full", "se_attn", "se_attn_c16")  # the pretrained model evaluated with each, no training
PRETRAINED = "none (pretrained)"  # the adapter column of the rows without adaptation
COLORS = {"swa": "tab:blue", "full": "tab:green", "s2": "tab:orange", "se_attn": "tab:red", "se_attn_c16": "tab:purple"}


@dataclass
class Job:
    name: str
    argv: list[str]  # hydra overrides after `python -m <module>`
    module: str  # hybridlm.train | hybridlm.evaluate
    out_dir: Path  # hydra.run.dir (or hydra.sweep.dir for a multirun)
    log: Path
    seconds: float = math.nan
    max_rss_mb: float = math.nan
    returncode: int | None = None


def run_jobs(jobs: list[Job], parallel: int, threads: int) -> None:
    """Run the jobs as subprocesses, at most `parallel` at a time; fill seconds, max_rss_mb and returncode.
    os.wait4 returns the resource usage of exactly the child it reaped, so each job's peak RSS is its own."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    pending, running = list(jobs), {}
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            job.log.parent.mkdir(parents=True, exist_ok=True)
            with open(job.log, "w") as log:
                proc = subprocess.Popen([sys.executable, "-m", job.module, *job.argv], stdout=log,
                                        stderr=subprocess.STDOUT, env=env, cwd=REPO)
            running[proc.pid] = (job, proc, time.perf_counter())
            print(f"[repro-sespan] start {job.name} (log {job.log})", flush=True)
        pid, status, usage = os.wait4(-1, 0)
        job, proc, start = running.pop(pid)
        proc.returncode = job.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        job.seconds = time.perf_counter() - start
        job.max_rss_mb = usage.ru_maxrss / 1024  # Linux reports kilobytes
        state = "ok" if job.returncode == 0 else f"FAILED (exit {job.returncode}, see {job.log})"
        print(f"[repro-sespan] {job.name}: {state} in {job.seconds:.0f}s, peak RSS {job.max_rss_mb:.0f} MB",
              flush=True)


# ----- jobs ----------------------------------------------------------------------------------------------------

def pretrain_job(work: Path, steps: int | None) -> Job:
    out = work / "pretrain"
    # CSV only in every training job: the table reads the CSV logs, and W&B's process would blur times and RSS.
    argv = ["+experiment=sespan/pretrain", "logger=csv", f"hydra.run.dir={out}", "trainer.enable_progress_bar=false"]
    if steps:
        argv.append(f"trainer.max_steps={steps}")
    return Job("pretrain", argv, "hybridlm.train", out, work / "logs" / "pretrain.log")


def adapt_job(work: Path, ckpt: Path, variant: str, adapter: str, steps: int | None) -> Job:
    name = f"{variant}+{adapter}"
    out = work / "adapt" / name
    argv = ["+experiment=sespan/adapt", f"init_from={ckpt}", *VARIANTS[variant], f"adapter={adapter}", "logger=csv",
            "eval.at_fit_end=false",  # evaluated in a separate process, so the peak RSS is training's
            f"hydra.run.dir={out}", "trainer.enable_progress_bar=false"]
    if steps:
        argv += [f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}"]
    return Job(name, argv, "hybridlm.train", out, work / "logs" / f"adapt_{name}.log")


def eval_job(work: Path, name: str, ckpts: list[Path], extra: list[str] = ()) -> Job:
    """One `hybridlm.evaluate -m` process over several checkpoints (one interpreter start for all of them)."""
    out = work / "eval" / name
    argv = ["-m", "+experiment=sespan/eval", "ckpt_path=" + ",".join(str(c) for c in ckpts), *extra,
            f"hydra.sweep.dir={out}", "trainer.enable_progress_bar=false"]
    return Job(f"eval {name}", argv, "hybridlm.evaluate", out, work / "logs" / f"eval_{name}.log")


def isolated_step_seconds(ckpt: Path, names: list[str], repeats: int, threads: int) -> dict[str, float]:
    """Wall time of one training step (forward, backward, AdamW) of each adaptation job's model, measured in this
    process with nothing else of ours running: the job times share the machine with the other job of their pair
    and with whatever else runs. The model is built by the training code from the job's own overrides, on a random
    batch of the adaptation shape; configurations are interleaved and the best of `repeats` is kept, so a burst
    of outside load hits them alike and mostly drops out."""
    import torch
    from hydra import compose, initialize_config_dir

    from hybridlm.config import register_configs
    from hybridlm.lit import lm_loss
    from hybridlm.runner import build_model, explicit_model_keys, typed_config

    torch.set_num_threads(threads)
    register_configs()
    steps = {}
    for name in names:
        variant, adapter = name.split("+")
        overrides = ["+experiment=sespan/adapt", f"init_from={ckpt}", *VARIANTS[variant], f"adapter={adapter}"]
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = typed_config(compose("train", overrides=overrides))
        model = build_model(cfg, explicit_model_keys(overrides)).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr)
        ids = torch.randint(0, 256, (cfg.data.batch_size, cfg.data.seq_len + 1))
        batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

        def step(model=model, opt=opt, batch=batch) -> float:
            start = time.perf_counter()
            logits, _ = model(batch["input_ids"])
            lm_loss(logits, batch["labels"]).backward()
            opt.step()
            opt.zero_grad()
            return time.perf_counter() - start

        step()  # warm-up (allocations, first-call dispatch)
        steps[name] = step
    best = {name: math.inf for name in names}
    for _ in range(repeats):
        for name, step in steps.items():
            best[name] = min(best[name], step())
    return best


# ----- reading the runs ---------------------------------------------------------------------------------------

def run_config(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())


def step_seconds(run_dir: Path) -> list[float]:
    """Wall time of every logged training step, from the CSV log's train/tokens_per_s."""
    cfg = run_config(run_dir)
    tokens = cfg["data"]["batch_size"] * cfg["data"]["seq_len"]
    with open(run_dir / "csv" / "metrics.csv") as f:
        rates = [float(r["train/tokens_per_s"]) for r in csv.DictReader(f) if r.get("train/tokens_per_s")]
    return [tokens / r for r in rates if r > 0]


def trainable_params(run_dir: Path) -> int | None:
    hp = run_dir / "csv" / "hparams.yaml"
    return yaml.safe_load(hp.read_text()).get("params/trainable") if hp.exists() else None


def eval_results(sweep_dir: Path) -> dict[tuple[str, tuple[str, ...]], Path]:
    """{(ckpt_path, sorted model overrides): job dir} of the successful jobs of one evaluate multirun."""
    found = {}
    for result in sweep_dir.glob("*/result.json"):
        r = json.loads(result.read_text())
        if r["status"] != "ok":
            print(f"[repro-sespan] evaluation job {result.parent} failed: {r['error']}", flush=True)
            continue
        ckpt = next(o.split("=", 1)[1] for o in r["overrides"] if o.startswith("ckpt_path="))
        found[(ckpt, tuple(sorted(o for o in r["overrides"] if o.startswith("model"))))] = result.parent
    return found


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


def summarize_eval(job_dir: Path, where: Callable[[int, float], str]) -> dict:
    report = job_dir / "length_eval"
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


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


# ----- outputs --------------------------------------------------------------------------------------------------

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
              "queries only, never with the question (see VARIANTS in scripts/repro_sespan.py).",
              "- `none (pretrained)` rows are the pretrained checkpoint without adaptation; attention kinds other "
              "than swa are switched at evaluation only.",
              "- s / step in run: median wall time between training step ends (data loading included) of that "
              f"job; {meta['parallel']} jobs ran at a time with {meta['threads']} thread(s) each, on a shared "
              "machine, so outside load shows in it.",
              "- s / step isolated: best of "
              f"{meta['timing_repeats']} timings of one step (forward, backward, AdamW) of the same model and "
              "batch shape, measured after all jobs, one configuration at a time, interleaved (no data loading).",
              "- peak RSS: the whole training process (interpreter, torch, corpus, model: the same for every job) "
              "plus the largest step; from os.wait4 of that job's process. For scale, the pretraining process "
              f"(steps of {meta['pretrain_batch']} x {T} tokens) peaked at "
              f"{meta['pretrain']['peak_rss_mb']:.0f} MB.", ""]
    path.write_text("\n".join(lines))


def binned(loss: list[float], bin_len: int) -> tuple[list[float], list[float]]:
    """(bin centres, mean loss per bin of bin_len positions)."""
    starts = range(0, len(loss), bin_len)
    return [(s + min(s + bin_len, len(loss))) / 2 for s in starts], [mean(loss[s:s + bin_len]) for s in starts]


def write_figure(rows: list[dict], meta: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(17, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax_bar, ax_loss, ax_diff = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1.1, 1.1]})
    groups = [PRETRAINED, *ADAPTERS]
    width = 0.8 / len(groups)
    for g, adapter in enumerate(groups):
        for i, kind in enumerate(VARIANTS):
            r = next((r for r in rows if r["attention"] == kind and r["adapter"] == adapter), None)
            if r is None or math.isnan(r.get("passkey_beyond", math.nan)):
                continue
            x = i + (g - (len(groups) - 1) / 2) * width
            ax_bar.bar(x, r["passkey_beyond"], width, color=COLORS[kind], alpha=(0.35, 0.7, 1.0)[g],
                       hatch=("//", "", "")[g], edgecolor="black", linewidth=0.5)
            ax_bar.plot(x, r["passkey_within"], "k_", markersize=10)
            ax_bar.text(x, r["passkey_beyond"] + 0.02, ("pre", "L+", "Hy")[g], ha="center", fontsize=7)
    ax_bar.set_xticks(range(len(VARIANTS)), [v.replace("_c", "\nC=") for v in VARIANTS], fontsize=8)
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
        kw = {"color": COLORS[r["attention"]], "linewidth": 1.2, "label": f"{r['attention']}, {r['adapter']}"}
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


# ----- main -------------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    """Pretrain, adapt, evaluate; returns (and writes to {work}/jobs.json) what `collect` needs."""
    kinds, adapters = args.kinds.split(","), args.adapters.split(",")
    threads = max(1, (os.cpu_count() or 1) // args.parallel)
    start = time.perf_counter()
    pre = pretrain_job(args.work, args.pretrain_steps)
    run_jobs([pre], 1, os.cpu_count() or 1)  # nothing else to run meanwhile
    ckpt = pre.out_dir / "checkpoints" / "last.ckpt"
    adapt, evals, isolated = [], [], {}
    if pre.returncode == 0 and ckpt.exists():
        # Pairs of jobs with the same attention kind run together, so each kind's time per step is measured next
        # to a job of the same cost.
        adapt = [adapt_job(args.work, ckpt, k, a, args.adapt_steps) for k in kinds for a in adapters]
        run_jobs(adapt, args.parallel, threads)
        ckpts = [j.out_dir / "checkpoints" / "last.ckpt" for j in adapt if j.returncode == 0]
        shares = [ckpts[i::args.parallel] for i in range(args.parallel)]  # one evaluate process per share
        evals = [eval_job(args.work, f"adapted{i}", share) for i, share in enumerate(shares) if share]
        evals += [eval_job(args.work, f"pretrained_{v}", [ckpt], VARIANTS[v]) for v in ZERO_SHOT]
        run_jobs(evals, args.parallel, threads)
        print("[repro-sespan] timing one training step of every adaptation job, in isolation", flush=True)
        isolated = isolated_step_seconds(ckpt, [j.name for j in adapt], args.timing_repeats, threads)
    record = {"pretrain": asdict(pre), "adapt": [asdict(j) for j in adapt], "eval": [asdict(j) for j in evals],
              "wall_minutes": (time.perf_counter() - start) / 60, "cpus": os.cpu_count(),
              "load_average": " / ".join(f"{x:.1f}" for x in os.getloadavg()), "parallel": args.parallel,
              "threads": threads, "timing_repeats": args.timing_repeats,
              "isolated_step_seconds": isolated, "command": args.command}
    path = args.work / "jobs.json"
    path.write_text(json.dumps(record, indent=1, default=str))
    return json.loads(path.read_text())  # paths as strings, exactly what --collect-only reads


def collect(record: dict, loss_bin: int) -> tuple[list[dict], dict]:
    """Rows of the comparison (one per attention kind x adapter, plus the pretrained model) and their settings."""
    pre = record["pretrain"]
    pre_dir = Path(pre["out_dir"])
    ckpt = pre_dir / "checkpoints" / "last.ckpt"
    pre_cfg = run_config(pre_dir)
    window = pre_cfg["model"]["attn"]["window"]
    found = {}
    for ev in record["eval"]:
        if Path(ev["out_dir"]).exists():
            found.update(eval_results(Path(ev["out_dir"])))
    eval_cfg = run_config(next(iter(found.values())))["eval"] if found else {}
    where = key_placement(window, eval_cfg.get("passkey_digits", 5))

    rows = []
    for kind in ZERO_SHOT:
        job_dir = found.get((str(ckpt), tuple(sorted(VARIANTS[kind]))))
        row = {"attention": kind, "adapter": PRETRAINED, "trainable_params": 0}
        row.update(summarize_eval(job_dir, where) if job_dir else {"error": "evaluation failed"})
        rows.append(row)
    for job in record["adapt"]:
        kind, adapter = job["name"].split("+")
        out_dir = Path(job["out_dir"])
        row = {"attention": kind, "adapter": adapter, "peak_rss_mb": job["max_rss_mb"],
               "train_seconds": job["seconds"], "log": job["log"]}
        if job["returncode"] != 0:
            row["error"] = f"training exit {job['returncode']}"
        else:
            times = step_seconds(out_dir)
            row.update(step_seconds=statistics.median(times) if times else math.nan, step_seconds_all=times,
                       step_seconds_isolated=record["isolated_step_seconds"].get(job["name"], math.nan),
                       trainable_params=trainable_params(out_dir))
            job_dir = found.get((str(out_dir / "checkpoints" / "last.ckpt"), ()))
            row.update(summarize_eval(job_dir, where) if job_dir else {"error": "evaluation failed"})
        rows.append(row)

    ok_adapt = [Path(j["out_dir"]) for j in record["adapt"] if j["returncode"] == 0]
    adapt_cfg = run_config(ok_adapt[0]) if ok_adapt else None
    T = pre_cfg["data"]["seq_len"]
    L = adapt_cfg["data"]["seq_len"] if adapt_cfg else 8 * T
    for r in rows:
        loss = r.get("loss_per_position")
        if loss:
            r.update(loss_lt_T=mean(loss[:T]), loss_T_to_adapt=mean(loss[T:L]), loss_beyond_adapt=mean(loss[L:]))
    ok = [r for r in rows if "passkey_cells" in r]
    meta = {k: record[k] for k in ("command", "wall_minutes", "cpus", "load_average", "parallel", "threads",
                                   "timing_repeats")}
    meta.update(pretrain_len=T, window=window, adapt_len=L, eval_len=eval_cfg.get("max_len"),
                pretrain_steps=pre_cfg["trainer"]["max_steps"], pretrain_batch=pre_cfg["data"]["batch_size"],
                pretrain_mix_prob=pre_cfg["data"]["mix_prob"],
                adapt_steps=adapt_cfg["trainer"]["max_steps"] if adapt_cfg else None,
                adapt_batch=adapt_cfg["data"]["batch_size"] if adapt_cfg else None,
                adapt_lr=adapt_cfg["optim"]["lr"] if adapt_cfg else None,
                samples_per_cell=eval_cfg.get("passkey_samples"), passkey_lengths=eval_cfg.get("passkey_lengths"),
                passkey_depths=eval_cfg.get("passkey_depths"), loss_sequences=eval_cfg.get("n_sequences"),
                n_beyond=ok[0]["n_beyond_prompts"] if ok else 0, n_within=ok[0]["n_within_prompts"] if ok else 0,
                loss_bin=loss_bin,
                pretrain={"seconds": pre["seconds"], "peak_rss_mb": pre["max_rss_mb"],
                          "step_seconds_median": statistics.median(step_seconds(pre_dir) or [math.nan])},
                eval_seconds={ev["name"]: ev["seconds"] for ev in record["eval"]})
    return rows, meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "results" / "sespan", help="table, JSON and figure")
    p.add_argument("--work", type=Path, default=REPO / "outputs" / "sespan", help="runs, checkpoints and logs")
    p.add_argument("--pretrain-steps", type=int, default=None, help="override the experiment file's max_steps")
    p.add_argument("--adapt-steps", type=int, default=None, help="override the experiment file's max_steps")
    p.add_argument("--kinds", default=",".join(VARIANTS), help=f"attention variants among {list(VARIANTS)}")
    p.add_argument("--adapters", default=",".join(ADAPTERS))
    p.add_argument("--parallel", type=int, default=2, help="jobs at a time (each gets cpus // parallel threads)")
    p.add_argument("--timing-repeats", type=int, default=5, help="repeats of the isolated step timing (best kept)")
    p.add_argument("--loss-bin", type=int, default=128, help="positions per point of the loss-by-position curves")
    p.add_argument("--collect-only", action="store_true",
                   help="do not run anything: rebuild the outputs from the runs recorded in --work")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    args.command = "make repro-sespan" + (f" ARGS='{' '.join(argv)}'" if argv else "")
    if args.collect_only:
        record = json.loads((args.work / "jobs.json").read_text())
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        record = run(args)
    if record["pretrain"]["returncode"] != 0:
        print(f"[repro-sespan] pretraining failed; see {record['pretrain']['log']}", file=sys.stderr)
        return 1
    rows, meta = collect(record, args.loss_bin)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "runs": [for_json(r) for r in rows]}, indent=1))
    write_table(rows, meta, args.out / "table.md")
    write_figure(rows, meta, args.out / "figure.png")
    print((args.out / "table.md").read_text(), flush=True)
    print(f"[repro-sespan] wrote {args.out}/table.md, results.json and figure.png; the run took "
          f"{meta['wall_minutes']:.1f} min", flush=True)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
