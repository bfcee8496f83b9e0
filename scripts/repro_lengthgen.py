"""`make repro-lengthgen`: the length-generalization comparison (Buitrago Ruiz & Gu 2025) on CPU.

Trains the five arms of conf/experiment/lengthgen/ (baseline = no intervention, random_noise, fitted_noise,
state_passing, tbtt), each as `python -m hybridlm.train +experiment=lengthgen/<arm> seed=<seed> logger=csv` in its own
process with OMP_NUM_THREADS=1, `--parallel` at a time. Each run ends with the length report (loss by position on
16T-token validation streams, with the recall-answer loss as a second column; SSM state norms; EffRem). This
script collects those JSON files into results/lengthgen/{table.md, results.json, figure.png}.

Wall time per arm is the subprocess's wall time (data generation, training, final validation and length report),
measured while another arm runs on the other core, so it is comparable between arms of one invocation only.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARMS = ("baseline", "random_noise", "fitted_noise", "state_passing", "tbtt")
LABELS = {"baseline": "none", "random_noise": "random noise", "fitted_noise": "fitted noise",
          "state_passing": "state passing", "tbtt": "TBTT"}


def run_arms(arms: list[str], out: Path, seed: int, parallel: int, extra: list[str]) -> dict[str, dict]:
    """Run every arm as a subprocess, at most `parallel` at once -> {arm: {"dir", "log", "seconds", "returncode"}}."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    pending, running, done = list(arms), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            arm = pending.pop(0)
            run_dir = out / "runs" / arm
            log = out / "logs" / f"{arm}.log"
            shutil.rmtree(run_dir, ignore_errors=True)  # no stale length reports from an earlier invocation
            log.parent.mkdir(parents=True, exist_ok=True)
            # CSV only: the collected table and figure come from each run's files; W&B's start would add to the times
            argv = [sys.executable, "-m", "hybridlm.train", f"+experiment=lengthgen/{arm}", f"seed={seed}",
                    "logger=csv", f"hydra.run.dir={run_dir}", *extra]
            print(f"[repro-lengthgen] start {arm}: {' '.join(argv[1:])}", flush=True)
            f = open(log, "w")
            running[arm] = (subprocess.Popen(argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT), f,
                            time.time(), run_dir, log)
        time.sleep(1.0)
        for arm, (proc, f, start, run_dir, log) in list(running.items()):
            if proc.poll() is None:
                continue
            f.close()
            seconds = time.time() - start
            done[arm] = {"dir": str(run_dir), "log": str(log), "seconds": round(seconds, 1),
                         "returncode": proc.returncode}
            print(f"[repro-lengthgen] {arm} finished in {seconds:.0f}s (exit {proc.returncode})", flush=True)
            del running[arm]
    return done


def latest_report(run_dir: Path) -> Path | None:
    steps = sorted((run_dir / "length_eval").glob("step*"))
    return steps[-1] if steps else None


def collect(arm: str, job: dict) -> dict:
    row = {"arm": arm, "label": LABELS.get(arm, arm), **job}
    report = latest_report(Path(job["dir"]))
    if job["returncode"] != 0 or report is None or not (report / "loss_by_position.json").exists():
        row["error"] = f"no length report (exit {job['returncode']}); see {job['log']}"
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
    result = Path(job["dir"]) / "result.json"
    if result.exists():
        row["val_loss"] = json.loads(result.read_text())["metrics"].get("val/loss")
    return row


def fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def write_table(rows: list[dict], path: Path, command: str) -> None:
    ok = [r for r in rows if "error" not in r]
    lines = [f"Command: `{command}`", ""]
    if ok:
        T = ok[0]["train_len"]
        lo, hi = ok[0]["target_id_range"]
        lines += [f"Training length T = {T}; evaluation: {ok[0]['n_sequences']} windows of {ok[0]['eval_len']} "
                  f"tokens of validation streams, each from a zero state. Recall loss = loss on the GET answers "
                  f"(target ids [{lo}, {hi})); ratio = mean loss in the last bucket / mean loss over positions "
                  "[T/2, T).", "",
                  "| intervention | recall ratio | all-token ratio | recall loss [T/2,T) | recall loss last bucket "
                  "| recall loss beyond T | all-token loss beyond T | final SSM state norm (per layer) "
                  "| wall time (s) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in ok:
            s = r["scalars"]
            ref = r["recall_loss"][-1] / s["target_last_bucket_over_train_half"]
            norm = ", ".join(fmt(v, 2) for v in r.get("final_state_norm", {}).values()) or "n/a"
            lines.append(f"| {r['label']} | {fmt(s['target_last_bucket_over_train_half'], 2)} | "
                         f"{fmt(s['last_bucket_over_train_half'], 3)} | {fmt(ref)} | {fmt(r['recall_loss'][-1])} | "
                         f"{fmt(s['target_loss_beyond_T'])} | {fmt(s['loss_beyond_T'])} | {norm} | "
                         f"{r['seconds']:.0f} |")
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/lengthgen")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every arm, e.g. trainer.max_steps=200")
    args = p.parse_args()
    out = (REPO / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "make repro-lengthgen" + (f" ARGS=\"{' '.join(sys.argv[1:])}\"" if sys.argv[1:] else "")
    start = time.time()
    jobs = run_arms(args.arms, out, args.seed, args.parallel, args.overrides)
    rows = [collect(arm, jobs[arm]) for arm in args.arms]
    wall = time.time() - start
    (out / "results.json").write_text(json.dumps({"command": command, "seed": args.seed, "wall_seconds": round(wall, 1),
                                                  "overrides": args.overrides, "arms": rows}, indent=1))
    write_table(rows, out / "table.md", command)
    write_figure(rows, out / "figure.png")
    print((out / "table.md").read_text())
    print(f"[repro-lengthgen] total wall time {wall:.0f}s; outputs in {out}", flush=True)
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
