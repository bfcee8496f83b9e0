"""Reading finished runs: the jobs of a Hydra run or multirun directory (each job's result.json, written by
hybridlm.runner.run_job, and its composed config in .hydra/), for the summary of a sweep (hybridlm.sweep) and the
tables and figures of `make repro-*`:

    python -m hybridlm.results lengthgen outputs/lengthgen --out results/lengthgen
    python -m hybridlm.results sespan outputs/sespan/seed0 [outputs/sespan/seed1 ...] --out results/sespan
"""
from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

import yaml


@dataclass
class Job:
    """One finished job: what its result.json and .hydra/ say."""

    dir: Path  # where result.json is (the job's Hydra output directory)
    overrides: list[str]  # the job's task overrides, sweep values included
    status: str  # "ok" | "failed"
    error: Optional[str]
    metrics: dict[str, float]
    out_dir: Path  # where the run wrote its outputs (differs from dir when a resumed run went on in its own)
    resources: dict[str, Any] = field(default_factory=dict)  # hybridlm.usage.JobUsage.record(); {} in older files

    @classmethod
    def read(cls, result: Path) -> Job:
        r = json.loads(result.read_text())
        return cls(dir=result.parent, overrides=r["overrides"], status=r["status"], error=r["error"],
                   metrics=r["metrics"], out_dir=Path(r["out_dir"]), resources=r.get("resources", {}))

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def override(self, key: str) -> Optional[str]:
        """The value the job's overrides give `key` (also as +key or ++key), or None."""
        for o in self.overrides:
            k, _, v = o.lstrip("+~").partition("=")
            if k == key:
                return v
        return None

    @cached_property
    def config(self) -> dict:
        """The job's composed config (.hydra/config.yaml), interpolations unresolved as Hydra saves them."""
        return yaml.safe_load((self.dir / ".hydra" / "config.yaml").read_text())

    @cached_property
    def hydra(self) -> dict:
        return yaml.safe_load((self.dir / ".hydra" / "hydra.yaml").read_text())["hydra"]

    @property
    def num(self) -> Optional[int]:
        """The job's number in its multirun (None for a single run)."""
        return self.hydra["job"].get("num") if self.hydra["mode"] == "MULTIRUN" else None

    @property
    def parallel(self) -> int:
        """Jobs its launcher ran at a time: n_jobs of the joblib launcher, 1 for a single run or the basic one."""
        return int(self.hydra.get("launcher", {}).get("n_jobs") or 1) if self.hydra["mode"] == "MULTIRUN" else 1

    @property
    def log(self) -> Path:
        """The job's Hydra log (Python logging of the job, not its console output)."""
        return self.dir / f"{self.hydra['job']['name']}.log"

    @property
    def wall_seconds(self) -> Optional[float]:
        return self.resources.get("wall_seconds")

    @property
    def peak_rss_mb(self) -> Optional[float]:
        return self.resources.get("peak_rss_mb")


def _natural(path: Path) -> list:
    """Sort key: job directories 2 before 10."""
    return [int(t) if t.isdigit() else t for part in path.parts for t in re.split(r"(\d+)", part)]


def read_jobs(root: Path, recursive: bool = True) -> list[Job]:
    """The jobs under root: a run directory, a multirun directory, or a folder of them (recursive), or only the
    job directories directly in a multirun directory (recursive=False). Ordered by the folder holding them, then
    by job number (the order of the sweep), then by name."""
    results = Path(root).rglob("result.json") if recursive else Path(root).glob("*/result.json")
    jobs = [Job.read(r) for r in results]

    def key(job: Job) -> tuple:
        num = job.num if (job.dir / ".hydra" / "hydra.yaml").is_file() else None
        return _natural(job.dir.parent), -1 if num is None else num, _natural(job.dir)

    return sorted(jobs, key=key)


def wall_span_seconds(jobs: list[Job]) -> Optional[float]:
    """From the first job's start to the last job's end (the runs' wall time, less their interpreter starts)."""
    times = [(datetime.fromisoformat(j.resources["started"]), datetime.fromisoformat(j.resources["ended"]))
             for j in jobs if "started" in j.resources]
    if not times:
        return None
    return (max(end for _, end in times) - min(start for start, _ in times)).total_seconds()


def last_finished(jobs: list[Job]) -> Optional[Job]:
    """The job that ended last (its resources say how loaded the machine was at the end)."""
    timed = [j for j in jobs if "ended" in j.resources]
    return max(timed, key=lambda j: datetime.fromisoformat(j.resources["ended"])) if timed else None


def finite(x: Any) -> Optional[float]:
    """x as a float, None for a missing or NaN value (e.g. a loss bucket without recall answers)."""
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


def fmt(x: Any, digits: int = 3) -> str:
    """A table cell: the number with `digits` decimals, "n/a" when it is missing or NaN."""
    x = finite(x)
    return "n/a" if x is None else f"{x:.{digits}f}"


def spread(values: list[Optional[float]]) -> Optional[dict]:
    """Mean, population std, min, max over the seeds that have the value."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals), "min": min(vals), "max": max(vals),
            "n": len(vals)}


def fmt_spread(s: Optional[dict], digits: int = 2) -> str:
    if s is None:
        return "n/a"
    if s["n"] == 1:
        return fmt(s["mean"], digits)
    return (f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} "
            f"({s['min']:.{digits}f}-{s['max']:.{digits}f})")
