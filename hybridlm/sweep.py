"""Hydra callback: after a multirun, one table of every job's overrides, status and final metric."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = []
        results = sorted(sweep_dir.glob("*/result.json"), key=lambda p: (len(p.parent.name), p.parent.name))
        for result in results:
            r = json.loads(result.read_text())
            metric = r["metrics"].get("val/loss")
            rows.append({"job": result.parent.name, "overrides": " ".join(r["overrides"]), "status": r["status"],
                         "val/loss": metric, "error": r["error"]})
        if not rows:
            return
        (sweep_dir / "summary.json").write_text(json.dumps(rows, indent=2))
        lines = ["| job | overrides | status | val/loss |", "|---|---|---|---|"]
        for r in rows:
            m = f"{r['val/loss']:.4f}" if r["val/loss"] is not None else "-"
            status = r["status"] if r["status"] == "ok" else f"FAILED: {r['error']}"
            lines.append(f"| {r['job']} | {r['overrides']} | {status} | {m} |")
        table = "\n".join(lines)
        (sweep_dir / "summary.md").write_text(table + "\n")
        print(f"\nSweep summary ({sweep_dir}):\n{table}", flush=True)
