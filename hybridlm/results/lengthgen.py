"""The tables and figure of `make repro-lengthgen`: the paper's headline protocol (Buitrago Ruiz & Gu 2025) of
post-training a model that fails past its training length T. Reads, under RUNS,

    pretrain/seed{s}/                       the pretrained baseline per seed (no init_from): the "before" row
    post_train/{intervention}+seed{s}/      that seed's checkpoint post-trained with one intervention (init_from set)

each job's result.json (status, wall time, peak RSS) and .hydra/config.yaml (arm: pretrained when init_from is
empty, else intervention.name; seed), and its latest length report (length_eval/step*/: loss_by_position.json with
the recall-answer loss as target_mean_loss, state_norms.json, effrem.json, progress.json). The arm of a job and its
seed come from the config, so the folder names only matter for ordering.

Writes {out}/table.md (one row per arm: recall ratio at [8T, 16T) and in the last bucket over seeds, how many seeds
fail, losses, final SSM state norms, EffRem, wall time; then the loss by position bucket per arm; failed jobs last),
results.json (per arm: every seed's record and the means), figure.png (recall loss, state norm and EffRem(t) per
arm) and logs/{arm}_seed{s}.log (each job's Hydra log).
"""
from __future__ import annotations

import itertools
import json
import math
import shutil
import statistics
from pathlib import Path
from typing import Any, Optional

from hybridlm.results import Job, finite, fmt, fmt_spread, read_jobs, spread, wall_span_seconds

PRETRAINED = "pretrained"
# arm -> label, in table order; an intervention not listed here comes after these under its own name
ARMS = {PRETRAINED: "pretrained (before post-training)", "none": "none", "random_noise": "random noise",
        "fitted_noise": "fitted noise", "state_passing": "state passing", "tbtt": "TBTT"}
FAILS_AT = 1.3  # issue 13: a model "fails" with recall ratio >= 1.3 at [8T, 16T)


def latest_report(run_dir: Path) -> Optional[Path]:
    steps = sorted((run_dir / "length_eval").glob("step*"))
    return steps[-1] if steps else None


def arm_of(job: Job) -> str:
    return job.config["intervention"]["name"] if job.config.get("init_from") else PRETRAINED


def max_steps(job: Job) -> Optional[int]:
    steps = job.config.get("trainer", {}).get("max_steps")
    return steps if isinstance(steps, int) else None  # an unresolved interpolation says nothing here


def bucket_value(buckets: list[list[float]], values: list[Optional[float]], start: float) -> Optional[float]:
    return next((v for (a, _), v in zip(buckets, values) if a == start), None)


def collect(job: Job) -> dict:
    """One job's record: where it is, its cost, and what its latest length report says (or "error")."""
    arm = arm_of(job)
    rec: dict[str, Any] = {"arm": arm, "seed": job.config["seed"], "dir": str(job.out_dir), "log": str(job.log),
                           "status": job.status, "seconds": job.wall_seconds, "peak_rss_mb": job.peak_rss_mb,
                           "max_steps": max_steps(job), "init_from": job.config.get("init_from")}
    report = latest_report(job.out_dir)
    if not job.ok:
        rec["error"] = job.error or f"status {job.status}"
        return rec
    if report is None or not (report / "loss_by_position.json").exists():
        rec["error"] = f"no length report in {job.out_dir / 'length_eval'}"
        return rec
    lbp = json.loads((report / "loss_by_position.json").read_text())
    cols, meta, scalars = lbp["columns"], lbp["meta"], lbp["scalars"]
    T = meta["train_len"]
    buckets = [[r[0], r[1]] for r in lbp["rows"]]
    recall = [finite(r[cols.index("target_mean_loss")]) for r in lbp["rows"]]
    rec.update(report=str(report), train_len=T, eval_len=meta["eval_len"], n_sequences=meta["n_sequences"],
               target_id_range=meta.get("target_id_range"), buckets=buckets, recall_loss=recall,
               all_loss=[finite(r[cols.index("mean_loss")]) for r in lbp["rows"]],
               scalars={k: finite(v) for k, v in scalars.items()})
    last_ratio = finite(scalars.get("target_last_bucket_over_train_half"))
    # [T/2, T) is one log2 bucket when T is a power of two; otherwise recover it from the last-bucket ratio
    ref = bucket_value(buckets, recall, T / 2)
    if ref is None and last_ratio and recall[-1] is not None:
        ref = recall[-1] / last_ratio
    at_8T = bucket_value(buckets, recall, 8 * T)
    rec["recall_loss_train_half"] = ref
    rec["recall_loss_last_bucket"] = recall[-1]
    rec["ratios"] = {"recall_8T_16T": at_8T / ref if at_8T is not None and ref else None,
                     "recall_last_bucket": last_ratio,
                     "all_last_bucket": finite(scalars.get("last_bucket_over_train_half"))}
    if (report / "state_norms.json").exists():
        by_layer: dict[str, list[list[float]]] = {}
        for layer, pos, norm in json.loads((report / "state_norms.json").read_text())["rows"]:
            by_layer.setdefault(f"layer{layer}", []).append([pos, norm])
        rec["state_norms"] = by_layer
        rec["final_state_norm"] = {k: max(v)[1] for k, v in by_layer.items()}  # at the largest position
    if (report / "effrem.json").exists():
        effrem = json.loads((report / "effrem.json").read_text())
        rec["effrem"] = [[t, finite(v)] for t, v in effrem["rows"]]
        rec["effrem_at_half_T"] = finite(effrem["scalars"].get("at_half_T"))
    if (report / "progress.json").exists():
        rec["progress"] = json.loads((report / "progress.json").read_text())
    return rec


def mean(values: list[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def mean_curve(curves: list[list[list[float]]]) -> list[list[float]]:
    """[[x, y], ...] per seed -> [[x, mean y over the seeds that have x], ...]."""
    ys: dict[float, list[Optional[float]]] = {}
    for curve in curves:
        for x, y in curve:
            ys.setdefault(x, []).append(y)
    return [[x, mean(v)] for x, v in sorted(ys.items()) if mean(v) is not None]


def bucket_column(rec: dict, buckets: list[tuple], key: str) -> list[Optional[float]]:
    """rec[key] on the given buckets (None where rec has no such bucket)."""
    values = dict(zip(map(tuple, rec["buckets"]), rec[key]))
    return [values.get(b) for b in buckets]


def aggregate(records: list[dict]) -> dict:
    """The arm's means over its seeds with a report."""
    ok = [r for r in records if "error" not in r]
    ratios = [r["ratios"]["recall_8T_16T"] for r in ok]
    buckets = sorted({tuple(b) for r in ok for b in r["buckets"]})
    recall = [[v for v in col if v is not None] for col in zip(*(bucket_column(r, buckets, "recall_loss") for r in ok))]
    every = [[v for v in col if v is not None] for col in zip(*(bucket_column(r, buckets, "all_loss") for r in ok))]
    layers = sorted({k for r in ok for k in r.get("final_state_norm", {})}, key=lambda k: int(k[5:]))
    # per seed, the norm averaged over layers at each position (panel b of the figure)
    norm_curves = [mean_curve(list(r["state_norms"].values())) for r in ok if r.get("state_norms")]
    return {"n_ok": len(ok), "n_failed": len(records) - len(ok),
            "recall_ratio_8T_16T": spread(ratios),
            "recall_ratio_last_bucket": spread([r["ratios"]["recall_last_bucket"] for r in ok]),
            "all_ratio_last_bucket": spread([r["ratios"]["all_last_bucket"] for r in ok]),
            "fails": sum(v >= FAILS_AT for v in ratios if v is not None),
            "fails_of": sum(v is not None for v in ratios),
            "recall_loss_train_half": mean([r["recall_loss_train_half"] for r in ok]),
            "recall_loss_last_bucket": mean([r["recall_loss_last_bucket"] for r in ok]),
            "final_state_norm": {k: mean([r.get("final_state_norm", {}).get(k) for r in ok]) for k in layers},
            "effrem_at_half_T": mean([r.get("effrem_at_half_T") for r in ok]),
            "seconds": mean([r["seconds"] for r in ok]),
            "peak_rss_mb": mean([r["peak_rss_mb"] for r in ok]),
            "buckets": [list(b) for b in buckets],
            "recall_loss": [mean(c) for c in recall], "all_loss": [mean(c) for c in every],
            "recall_loss_min": [min(c, default=None) for c in recall],
            "recall_loss_max": [max(c, default=None) for c in recall],
            "state_norm_by_position": mean_curve(norm_curves),
            "effrem": mean_curve([r["effrem"] for r in ok if r.get("effrem")])}


def steps_line(arms: list[dict]) -> str:
    pre = {r["max_steps"] for a in arms if a["arm"] == PRETRAINED for r in a["records"]} - {None}
    post = {r["max_steps"] for a in arms if a["arm"] != PRETRAINED for r in a["records"]} - {None}
    if len(pre) != 1 or len(post) != 1:
        return (f"Post-training steps: {', '.join(map(str, sorted(post))) or 'n/a'}; pretraining steps: "
                f"{', '.join(map(str, sorted(pre))) or 'n/a'}.")
    (p,), (q,) = pre, post
    return f"Post-training: {q} steps = {100 * q / p:.3g}% of the pretraining's {p}."


def write_table(arms: list[dict], seeds: list, path: Path, command: str) -> None:
    ok = [r for a in arms for r in a["records"] if "error" not in r]
    lines = [f"Command: `{command}`", ""]
    if ok:
        T, first = ok[0]["train_len"], ok[0]
        lo, hi = first["target_id_range"] or ("?", "?")
        a, b = first["buckets"][-1]
        lines += [f"Training length T = {T}; evaluation: {first['n_sequences']} windows of {first['eval_len']} "
                  f"tokens of validation streams, each from a zero state. Recall loss = loss on the recall answers "
                  f"(target ids [{lo}, {hi})); recall ratio = recall loss in a position bucket / recall loss over "
                  f"[T/2, T), at [8T, 16T) = [{8 * T}, {16 * T}) and in the last bucket [{a}, {b}); a seed fails "
                  f"with ratio >= {FAILS_AT} at [8T, 16T). {len(seeds)} seeds; mean ± population std (min-max) "
                  f"over the seeds with a report. {steps_line(arms)}", "",
                  "| arm | seeds (n ok) | recall ratio 8T-16T | recall ratio last bucket "
                  f"| fails (ratio >= {FAILS_AT} at 8T-16T) | recall loss [T/2,T) | recall loss last bucket "
                  "| final SSM state norm (per layer) | EffRem(T/2) | wall time (s) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for arm in arms:
            m = arm["mean"]
            n = f"{m['n_ok']}" + (f" (+{m['n_failed']} failed)" if m["n_failed"] else "")
            norms = ", ".join(fmt(v, 2) for v in m["final_state_norm"].values()) or "n/a"
            lines.append(f"| {arm['label']} | {n} | {fmt_spread(m['recall_ratio_8T_16T'])} | "
                         f"{fmt_spread(m['recall_ratio_last_bucket'])} | {m['fails']}/{m['fails_of']} seeds | "
                         f"{fmt(m['recall_loss_train_half'])} | {fmt(m['recall_loss_last_bucket'])} | {norms} | "
                         f"{fmt(m['effrem_at_half_T'])} | {fmt(m['seconds'], 0)} |")
        shown = [a for a in arms if a["mean"]["n_ok"]]
        for key, what in (("recall_loss", "Recall loss"), ("all_loss", "All-token loss")):
            lines += ["", f"{what} by position bucket (nats), mean over seeds:", "",
                      "| positions | " + " | ".join(a["label"] for a in shown) + " |", "|---|" + "---|" * len(shown)]
            buckets = sorted({tuple(bk) for a in shown for bk in a["mean"]["buckets"]})
            for bk in buckets:
                cells = [fmt(dict(zip(map(tuple, a["mean"]["buckets"]), a["mean"][key])).get(bk)) for a in shown]
                lines.append(f"| [{bk[0]}, {bk[1]}) | " + " | ".join(cells) + " |")
    failed = [(arm, r) for arm in arms for r in arm["records"] if "error" in r]
    if failed and ok:
        lines.append("")
    lines += [f"{arm['label']} seed {r['seed']}: FAILED: {r['error']}; see {r['log']}" for arm, r in failed]
    path.write_text("\n".join(lines) + "\n")


def write_figure(arms: list[dict], train_len: Optional[int], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.4), dpi=110)
    FigureCanvasAgg(fig)
    ax_loss, ax_norm, ax_eff = fig.subplots(1, 3)
    colors = (f"C{i % 10}" for i in itertools.count())
    for arm in (a for a in arms if a["mean"]["n_ok"]):
        m = arm["mean"]
        style = {"color": "black", "linestyle": "--"} if arm["arm"] == PRETRAINED else {"color": next(colors)}
        kw = {**style, "label": f"{arm['label']} ({m['n_ok']} seed{'s' * (m['n_ok'] != 1)})"}
        nan = float("nan")
        mids = [((a + 1) * b) ** 0.5 for a, b in m["buckets"]]  # geometric centre of contexts a+1..b
        ax_loss.plot(mids, [nan if v is None else v for v in m["recall_loss"]], marker="o", markersize=3, **kw)
        ax_loss.fill_between(mids, [nan if v is None else v for v in m["recall_loss_min"]],
                             [nan if v is None else v for v in m["recall_loss_max"]], color=style["color"],
                             alpha=0.15, linewidth=0)
        if m["state_norm_by_position"]:
            ax_norm.plot(*zip(*m["state_norm_by_position"]), **kw)
        effrem = [(t, v) for t, v in m["effrem"] if train_len is None or t < train_len]
        if effrem:
            ax_eff.plot(*zip(*effrem), marker="o", markersize=3, **kw)
    for ax in (ax_loss, ax_norm):
        if train_len:
            ax.axvline(train_len, color="gray", linestyle=":", linewidth=1, label=f"T = {train_len}")
        ax.set_xscale("log")
    ax_loss.set_yscale("log")
    ax_loss.set(xlabel="position (tokens of context)", ylabel="recall loss (nats)",
                title="(a) recall loss by position (min-max over seeds)")
    ax_norm.set(xlabel="position (tokens)", ylabel="SSM state norm, mean over layers",
                title="(b) SSM state norm")
    ax_eff.set(xlabel="t (first t tokens dropped)", ylabel="EffRem_T(t)", title="(c) EffRem(t), t < T", ylim=(0, 1))
    for ax in (ax_loss, ax_norm, ax_eff):
        if ax.get_legend_handles_labels()[0]:  # none when no job has a report
            ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path)


def plain(x: Any) -> Any:
    """NaN and infinities -> None, so results.json is plain JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


def write(runs: Path, out: Path, command: str) -> bool:
    """Read the pretrain and post-train jobs in `runs`, write the outputs to `out`; False when a job failed or is
    missing its report."""
    jobs = read_jobs(runs)
    if not jobs:
        raise FileNotFoundError(f"no result.json under {runs}")
    records = [collect(job) for job in jobs]
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    for job, rec in zip(jobs, records):
        if job.log.is_file():
            shutil.copyfile(job.log, out / "logs" / f"{rec['arm']}_seed{rec['seed']}.log")
    order = list(ARMS) + [r["arm"] for r in records if r["arm"] not in ARMS]
    arms = []
    for key in dict.fromkeys(order):
        # one record per seed: a later job of the same arm and seed (a rerun) replaces an earlier one
        by_seed = {r["seed"]: r for r in records if r["arm"] == key}
        if by_seed:
            recs = [by_seed[s] for s in sorted(by_seed)]
            arms.append({"arm": key, "label": ARMS.get(key, key), "records": recs, "mean": aggregate(recs)})
    seeds = sorted({r["seed"] for r in records})
    ok = [r for r in records if "error" not in r]
    train_len = ok[0]["train_len"] if ok else None
    wall = wall_span_seconds(jobs)
    (out / "results.json").write_text(json.dumps(plain(
        {"command": command, "seeds": seeds, "wall_seconds": round(wall, 1) if wall is not None else None,
         "train_len": train_len, "eval_len": ok[0]["eval_len"] if ok else None, "fails_at": FAILS_AT,
         "std": "population",
         "arms": [{"arm": a["arm"], "label": a["label"], "seeds": {r["seed"]: r for r in a["records"]},
                   "mean": a["mean"]} for a in arms]}), indent=1, allow_nan=False))
    write_table(arms, seeds, out / "table.md", command)
    write_figure(arms, train_len, out / "figure.png")
    return all("error" not in r for r in records)
