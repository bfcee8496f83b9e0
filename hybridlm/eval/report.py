"""Writing and logging diagnostics. Every diagnostic becomes a table (CSV + JSON) and a PNG plot in `out_dir`;
with a W&B logger attached the same table and plot are logged as wandb.Table and wandb.Image, and its scalars go
to every logger (CSV included). Plots use matplotlib's Agg canvas directly (no pyplot global state)."""
from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lightning.pytorch.loggers import Logger, WandbLogger
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PREFIX = "length_eval"


@dataclass
class Diagnostic:
    name: str
    columns: list[str]
    rows: list[list]
    plot: Callable[[Axes], None]  # draws the diagnostic onto an axes
    scalars: dict[str, float] = field(default_factory=dict)  # logged as f"{PREFIX}/{name}/{key}"
    meta: dict = field(default_factory=dict)  # settings that produced it, written to the JSON


def write(d: Diagnostic, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / f"{d.name}.csv", "json": out_dir / f"{d.name}.json", "png": out_dir / f"{d.name}.png"}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(d.columns)
        w.writerows(d.rows)
    paths["json"].write_text(json.dumps({"name": d.name, "columns": d.columns, "rows": d.rows,
                                         "scalars": d.scalars, "meta": d.meta}, indent=1))
    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    d.plot(ax)
    ax.set_title(d.name)
    fig.tight_layout()
    fig.savefig(paths["png"])
    return paths


def scalar_metrics(d: Diagnostic) -> dict[str, float]:
    return {f"{PREFIX}/{d.name}/{k}": float(v) for k, v in d.scalars.items()}


def log(d: Diagnostic, png: Path, loggers: Sequence[Logger], step: int) -> None:
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            lg.log_table(key=f"{PREFIX}/{d.name}", columns=d.columns, data=d.rows, step=step)
            lg.log_image(key=f"{PREFIX}/{d.name}_plot", images=[str(png)], step=step)
        if d.scalars:
            lg.log_metrics(scalar_metrics(d), step=step)


def emit(d: Diagnostic, out_dir: Path, loggers: Sequence[Logger], step: int) -> dict[str, Path]:
    paths = write(d, out_dir)
    log(d, paths["png"], loggers, step)
    return paths
