"""The failure map (issue 13; conf/experiment/lengthgen/failure_map.yaml): for every run of the sweep, the failure
ratio (mean loss in the last position bucket / mean loss over [T/2, T), on the recall answers when the task has
them, else on every token) of each length report written during training, against the training tokens per
parameter that report's progress.json records. Reads runs that are still going or were stopped as well as finished
ones (a job directory needs only .hydra/config.yaml and length_eval/), so the map can be drawn while a long sweep
runs and again after `resume=auto` has continued it. Writes {out}/table.md, results.json and figure.png.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from hybridlm.results import _natural, fmt, fmt_spread, spread

FAILS_AT = 1.3  # issue 13: a baseline "fails" with ratio >= 1.3 at 8T-16T


def job_dirs(runs: Path) -> list[Path]:
    """Every run directory under `runs` (one holding .hydra/config.yaml), in sweep order."""
    return sorted((p.parent.parent for p in Path(runs).rglob(".hydra/config.yaml")), key=_natural)


def state_entries(model: dict) -> int:
    """SSM state entries per Mamba-2 layer: d_inner x d_state (heads x headdim x d_state)."""
    ssm = model["ssm"]
    d_inner = ssm.get("d_inner") or ssm["expand"] * model["d_model"]
    return int(d_inner) * int(ssm["d_state"])


def read_run(run: Path) -> dict:
    """One run: its setting (task, T, state size, dt init) and one point per length report."""
    cfg = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    hydra_file = run / ".hydra" / "hydra.yaml"
    choices = yaml.safe_load(hydra_file.read_text())["hydra"]["runtime"]["choices"] if hydra_file.exists() else {}
    data, model = cfg["data"], cfg["model"]
    T = int(data["seq_len"])
    row = {"dir": str(run), "task": choices.get("experiment/lengthgen/task")
           or (data["synthetic"]["task"] if data["source"] == "synthetic" else data["source"]),
           "T": T, "d_state": int(model["ssm"]["d_state"]), "dt_max": float(model["ssm"]["dt_max"]),
           "state_entries": state_entries(model), "seed": cfg.get("seed"), "points": []}
    row["state_per_T"] = row["state_entries"] / T
    for report in sorted((run / "length_eval").glob("step*")):
        progress, lbp = report / "progress.json", report / "loss_by_position.json"
        if not (progress.exists() and lbp.exists()):
            continue  # a report from before progress.json existed, or one cut off by a stop
        prog = json.loads(progress.read_text())
        scalars = json.loads(lbp.read_text())["scalars"]
        target = "target_last_bucket_over_train_half" in scalars
        point = {"step": prog["step"], "train_tokens": prog["train_tokens"], "parameters": prog["parameters"],
                 "tokens_per_parameter": prog["train_tokens"] / prog["parameters"],
                 "ratio": scalars["target_last_bucket_over_train_half" if target else "last_bucket_over_train_half"],
                 "loss_within_T": scalars["target_loss_within_T" if target else "loss_within_T"],
                 "loss_beyond_T": scalars["target_loss_beyond_T" if target else "loss_beyond_T"],
                 "on": "recall answers" if target else "all tokens"}
        if (report / "state_norms.json").exists():
            point["state_norm_final_over_at_T"] = json.loads((report / "state_norms.json").read_text())[
                "scalars"].get("final_over_at_T")
        if (report / "effrem.json").exists():
            point["effrem_at_half_T"] = json.loads((report / "effrem.json").read_text())["scalars"].get("at_half_T")
        row["points"].append(point)
    return row


def setting(r: dict) -> str:
    return f"{r['task']} T={r['T']} d_state={r['d_state']} dt_max={r['dt_max']:g}"


def label(r: dict) -> str:
    return setting(r) + (f" seed={r['seed']}" if r.get("seed") is not None else "")


def by_setting(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """The settings with reports from 2 or more seeds, each with its runs, in the order first seen."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["points"]:
            groups.setdefault(setting(r), []).append(r)
    return [(k, v) for k, v in groups.items() if len({r.get("seed") for r in v}) > 1]


def seed_lines(rows: list[dict]) -> list[str]:
    """The over-seeds table: ratio at the end, max ratio, first crossing of FAILS_AT, runs failing at the end."""
    groups = by_setting(rows)
    if not groups:
        return []
    lines = ["Over seeds (mean ± population std (min-max)):", "",
             "| setting | seeds | tokens/param reached | ratio at the end | max ratio | first tokens/param with "
             f"ratio >= {FAILS_AT}, per seed | failing at the end |",
             "|---|---|---|---|---|---|---|"]
    for name, runs in groups:
        ends = [r["points"][-1]["ratio"] for r in runs]
        firsts = [next((f"{p['tokens_per_parameter']:.0f}" for p in r["points"] if p["ratio"] >= FAILS_AT), "never")
                  for r in runs]
        lines.append(f"| {name} | {', '.join(str(r.get('seed')) for r in runs)} | "
                     f"{min(r['points'][-1]['tokens_per_parameter'] for r in runs):.0f} | {fmt_spread(spread(ends))} | "
                     f"{fmt_spread(spread([max(p['ratio'] for p in r['points']) for r in runs]))} | "
                     f"{', '.join(firsts)} | {sum(e >= FAILS_AT for e in ends)}/{len(runs)} |")
    return lines + [""]


def write_table(rows: list[dict], path: Path, command: str) -> None:
    lines = [f"Command: `{command}`", "",
             f"Failure ratio = loss in the last position bucket (8T-16T) / loss over [T/2, T), from a zero state, on "
             f"the recall answers (recall tasks) or every token (text); a run fails when it reaches {FAILS_AT}. "
             "State/T = SSM state entries per layer (d_inner x d_state) / T.", "",
             "| setting | parameters | state/T | reports | tokens reached | tokens/param reached | ratio at the end "
             f"| max ratio (at tokens/param) | first tokens/param with ratio >= {FAILS_AT} |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pts = r["points"]
        if not pts:
            lines.append(f"| {label(r)} | n/a | {r['state_per_T']:.0f} | 0 | 0 | 0 | n/a | n/a | n/a |")
            continue
        worst = max(pts, key=lambda p: p["ratio"])
        first = next((p for p in pts if p["ratio"] >= FAILS_AT), None)
        first_at = "never" if first is None else f"{first['tokens_per_parameter']:.0f}"
        lines.append(f"| {label(r)} | {pts[-1]['parameters']:,} | {r['state_per_T']:.0f} | {len(pts)} | "
                     f"{pts[-1]['train_tokens'] / 1e6:.1f}M | {pts[-1]['tokens_per_parameter']:.0f} | "
                     f"{fmt(pts[-1]['ratio'], 2)} | {fmt(worst['ratio'], 2)} ({worst['tokens_per_parameter']:.0f}) | "
                     f"{first_at} |")
    lines += [""] + seed_lines(rows)
    lines += ["Every report (ratio / loss within T / loss beyond T / final state norm over the norm at T):", ""]
    for r in rows:
        lines += [f"**{label(r)}** (`{r['dir']}`)", "",
                  "| tokens | tokens/param | ratio | loss within T | loss beyond T | state norm 16T/T | EffRem(T/2) |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {p['train_tokens'] / 1e6:.1f}M | {p['tokens_per_parameter']:.0f} | {fmt(p['ratio'], 2)} | "
                  f"{fmt(p['loss_within_T'], 3)} | {fmt(p['loss_beyond_T'], 3)} | "
                  f"{fmt(p.get('state_norm_final_over_at_T'), 2)} | {fmt(p.get('effrem_at_half_T'), 3)} |"
                  for p in r["points"]]
        lines.append("")
    path.write_text("\n".join(lines))


def write_figure(rows: list[dict], path: Path) -> None:
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = sorted({r["task"] for r in rows})
    fig = Figure(figsize=(5.5 * max(1, len(tasks)), 4.2), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(1, len(tasks)), squeeze=False)[0]
    ratios = sorted({r["state_per_T"] for r in rows})
    cmap = colormaps["viridis"]
    for ax, task in zip(axes, tasks):
        for r in (r for r in rows if r["task"] == task and r["points"]):
            shade = cmap(ratios.index(r["state_per_T"]) / max(1, len(ratios) - 1))
            ax.plot([p["tokens_per_parameter"] for p in r["points"]], [p["ratio"] for p in r["points"]],
                    "o-" if r["dt_max"] >= 0.1 else "s--", color=shade, markersize=3,
                    label=f"state/T {r['state_per_T']:.0f} (T={r['T']}, N={r['d_state']}, dt_max={r['dt_max']:g}"
                    + (f", seed {r['seed']})" if r.get("seed") is not None else ")"))
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.axhline(FAILS_AT, color="red", linestyle=":", linewidth=1, label=f"fails ({FAILS_AT})")
        ax.set_xscale("log")
        shown = [p["ratio"] for r in rows if r["task"] == task for p in r["points"] if p["ratio"] and p["ratio"] > 0]
        if shown and max(shown) > 10 * min(shown):  # one run far past the others would flatten them on a linear axis
            ax.set_yscale("log")
        ax.set_xlabel("training tokens per parameter")
        ax.set_ylabel("failure ratio: loss at 8T-16T / loss at [T/2, T)")
        ax.set_title(task)
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path)


def read_source(source: Path) -> list[dict]:
    """The runs of a sweep folder, or those recorded in a results.json this module wrote."""
    if source.is_file():
        return json.loads(source.read_text())["runs"]
    dirs = job_dirs(source)
    if not dirs:
        raise FileNotFoundError(f"no run (.hydra/config.yaml) under {source}")
    return [read_run(d) for d in dirs]


def write(sources: list[Path] | Path, out: Path, command: str) -> bool:
    """Read the runs of every source (sweep folders, earlier results.json files), write the outputs to `out`;
    False when a run has no report yet."""
    rows = [r for src in ([sources] if isinstance(sources, Path) else sources) for r in read_source(Path(src))]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"command": command, "fails_at": FAILS_AT, "runs": rows}, indent=1))
    write_table(rows, out / "table.md", command)
    write_figure(rows, out / "figure.png")
    return all(r["points"] for r in rows)
