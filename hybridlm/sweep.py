"""Hydra callback: after a multirun, one table of every job's overrides, status, final metric, wall time and peak
memory (read from each job's result.json by hybridlm.results)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from hybridlm.results import read_jobs

log = logging.getLogger(__name__)


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = [{"job": job.dir.name, "overrides": " ".join(job.overrides), "status": job.status,
                 "val/loss": job.metrics.get("val/loss"), "error": job.error, "wall_seconds": job.wall_seconds,
                 "peak_rss_mb": job.peak_rss_mb}
                for job in read_jobs(sweep_dir, recursive=False)]
        if not rows:
            return
        (sweep_dir / "summary.json").write_text(json.dumps(rows, indent=2))
        lines = ["| job | overrides | status | val/loss | wall time (s) | peak RSS (MB) |", "|---|---|---|---|---|---|"]
        for r in rows:
            status = r["status"] if r["status"] == "ok" else f"FAILED: {r['error']}"
            lines.append(f"| {r['job']} | {r['overrides']} | {status} | {_fmt(r['val/loss'], '.4f')} | "
                         f"{_fmt(r['wall_seconds'], '.0f')} | {_fmt(r['peak_rss_mb'], '.0f')} |")
        table = "\n".join(lines)
        (sweep_dir / "summary.md").write_text(table + "\n")
        print(f"\nSweep summary ({sweep_dir}):\n{table}", flush=True)
