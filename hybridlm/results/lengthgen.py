"""The tables and figure of `make repro-lengthgen` (the length-generalization arms, Buitrago Ruiz & Gu 2025) from
its multirun: every job's result.json (wall time, peak RSS) and the length report it wrote when training ended
(loss by position on 16T-token validation streams with the recall-answer loss as a second column, SSM state norms,
EffRem). Writes {out}/table.md, results.json, figure.png and logs/<arm>.log (each job's Hydra log).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Optional

from hybridlm.results import Job, read_jobs, wall_span_seconds

# intervention -> (arm: its file in conf/experiment/lengthgen/, label in the table)
ARMS = {"none": ("baseline", "none"), "random_noise": ("random_noise", "random noise"),
        "fitted_noise": ("fitted_noise", "fitted noise"), "state_passing": ("state_passing", "state passing"),
        "tbtt": ("tbtt", "TBTT")}


def latest_report(run_dir: Path) -> Optional[Path]:
    steps = sorted((run_dir / "length_eval").glob("step*"))
    return steps[-1] if steps else None


def collect(job: Job) -> dict:
    intervention = job.config["intervention"]["name"]
    arm, label = ARMS.get(intervention, (intervention, intervention))
    row = {"arm": arm, "label": label, "dir": str(job.out_dir), "log": str(job.log), "overrides": job.overrides,
           "seed": job.config["seed"], "status": job.status, "seconds": job.wall_seconds,
           "peak_rss_mb": job.peak_rss_mb, "threads": job.resources.get("threads")}
    report = latest_report(job.out_dir)
    if not job.ok or report is None or not (report / "loss_by_position.json").exists():
        row["error"] = f"no length report ({job.error or 'no length_eval/ in ' + str(job.out_dir)}); see {job.log}"
        return row
    lbp = json.loads((report / "loss_by_position.json").read_text())
    cols = lbp["columns"]
    row["buckets"] = [[r[0], r[1]] for r in lbp["rows"]]
    row["all_loss"] = [r[cols.index("mean_loss")] for r in lbp["rows"]]
    row["recall_loss"] = [r[cols.index("target_mean_loss")] for r in lbp["rows"]]
    row["scalars"] = lbp["scalars"]
    row["train_len"] = lbp["meta"]["train_len"]
    row["eval_len"] = lbp["meta"]["eval_len"]
    row["n_sequences"] = lbp["meta"]["n_sequences"]
    row["target_id_range"] = lbp["meta"]["target_id_range"]
    if (report / "state_norms.json").exists():
        norms = json.loads((report / "state_norms.json").read_text())
        last = {}
        for layer, pos, norm in norms["rows"]:  # rows are ordered by position within each layer
            last[layer] = (pos, norm)
        row["final_state_norm"] = {f"layer{layer}": norm for layer, (pos, norm) in sorted(last.items())}
        row["final_state_norm_position"] = max(pos for pos, _ in last.values())
    if (report / "effrem.json").exists():
        row["effrem_at_half_T"] = json.loads((report / "effrem.json").read_text())["scalars"]["at_half_T"]
    row["val_loss"] = job.metrics.get("val/loss")
    return row


def fmt(x: Optional[float], digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def write_table(rows: list[dict], path: Path, command: str, parallel: int) -> None:
    ok = [r for r in rows if "error" not in r]
    lines = [f"Command: `{command}`", ""]
    if ok:
        T = ok[0]["train_len"]
        lo, hi = ok[0]["target_id_range"]
        threads = ok[0]["threads"]
        lines += [f"Training length T = {T}; evaluation: {ok[0]['n_sequences']} windows of {ok[0]['eval_len']} "
                  f"tokens of validation streams, each from a zero state. Recall loss = loss on the GET answers "
                  f"(target ids [{lo}, {hi})); ratio = mean loss in the last bucket / mean loss over positions "
                  f"[T/2, T). Wall time and peak RSS are each job's own (data generation, training, validation and "
                  f"length report; {parallel} jobs at a time with {threads} thread(s) each, so they compare arms of "
                  "one invocation only).", "",
                  "| intervention | recall ratio | all-token ratio | recall loss [T/2,T) | recall loss last bucket "
                  "| recall loss beyond T | all-token loss beyond T | final SSM state norm (per layer) "
                  "| wall time (s) | peak RSS (MB) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in ok:
            s = r["scalars"]
            ref = r["recall_loss"][-1] / s["target_last_bucket_over_train_half"]
            norm = ", ".join(fmt(v, 2) for v in r.get("final_state_norm", {}).values()) or "n/a"
            lines.append(f"| {r['label']} | {fmt(s['target_last_bucket_over_train_half'], 2)} | "
                         f"{fmt(s['last_bucket_over_train_half'], 3)} | {fmt(ref)} | {fmt(r['recall_loss'][-1])} | "
                         f"{fmt(s['target_loss_beyond_T'])} | {fmt(s['loss_beyond_T'])} | {norm} | "
                         f"{fmt(r['seconds'], 0)} | {fmt(r['peak_rss_mb'], 0)} |")
        lines += ["", "Loss by position bucket, recall / all-token (nats):", "",
                  "| positions | " + " | ".join(r["label"] for r in ok) + " |",
                  "|---|" + "---|" * len(ok)]
        for i, (a, b) in enumerate(ok[0]["buckets"]):
            cells = [f"{fmt(r['recall_loss'][i])} / {fmt(r['all_loss'][i])}" for r in ok]
            lines.append(f"| [{a}, {b}) | " + " | ".join(cells) + " |")
    for r in rows:
        if "error" in r:
            lines += ["", f"{r['label']}: FAILED: {r['error']}"]
    path.write_text("\n".join(lines) + "\n")


def write_figure(rows: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ok = [r for r in rows if "error" not in r]
    fig = Figure(figsize=(11, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, key, title in ((axes[0], "recall_loss", "recall loss (GET answers)"),
                           (axes[1], "all_loss", "all-token loss")):
        for r in ok:
            mids = [((a + 1) * b) ** 0.5 for a, b in r["buckets"]]  # geometric centre of contexts a+1..b
            ax.plot(mids, r[key], "o-", label=r["label"])
        if ok:
            T = ok[0]["train_len"]
            ax.axvline(T, color="gray", linestyle="--", linewidth=1, label=f"T = {T}")
        ax.set_xscale("log")
        ax.set_xlabel("position (tokens of context)")
        ax.set_ylabel("loss (nats)")
        ax.set_title(title)
        if key == "recall_loss":
            ax.set_yscale("log")
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)


def write(runs: Path, out: Path, command: str) -> bool:
    """Read the multirun in `runs`, write the outputs to `out`; False when a job failed or is missing its report."""
    jobs = read_jobs(runs)
    if not jobs:
        raise FileNotFoundError(f"no result.json under {runs}")
    rows = [collect(job) for job in jobs]
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    for job, row in zip(jobs, rows):
        if job.log.is_file():
            shutil.copyfile(job.log, out / "logs" / f"{row['arm']}.log")
    common = [o for o in jobs[0].overrides if all(o in j.overrides for j in jobs)]
    wall = wall_span_seconds(jobs)
    seeds = sorted({r["seed"] for r in rows})
    (out / "results.json").write_text(json.dumps(
        {"command": command, "seed": seeds[0] if len(seeds) == 1 else seeds,
         "wall_seconds": round(wall, 1) if wall is not None else None, "overrides": common, "arms": rows}, indent=1))
    write_table(rows, out / "table.md", command, jobs[0].parallel)
    write_figure(rows, out / "figure.png")
    return all("error" not in r for r in rows)
