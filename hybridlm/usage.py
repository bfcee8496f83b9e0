"""Wall time and peak memory of one job, for its result.json (hybridlm.runner.run_job) and the tables built from it.

The jobs of a multirun can share a process: Hydra's basic launcher runs them one after another in one process, and
each worker of the joblib launcher takes job after job. getrusage's ru_maxrss is the peak of the whole process life,
so on Linux the peak is reset when a job starts (writing 5 to /proc/self/clear_refs sets the "high water mark"
VmHWM to the current resident set, proc(5)) and read back as VmHWM: the job's own peak, which includes what was
already resident when it started (interpreter, torch, caches of an earlier job in the same process). Where that
reset is not possible the figure is ru_maxrss, the process's peak since it started; `peak_rss_since` says which.
"""
from __future__ import annotations

import os
import re
import resource
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

import torch

PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")
RU_MAXRSS_BYTES = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, kilobytes on Linux


def _vm_hwm_kb() -> Optional[int]:
    try:
        match = re.search(r"^VmHWM:\s+(\d+) kB", PROC_STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def reset_peak_rss() -> bool:
    """Set this process's peak RSS to its current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        PROC_CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _vm_hwm_kb() is not None


def peak_rss_mb() -> float:
    """This process's peak resident set since the last reset_peak_rss() (or since it started), in MiB."""
    hwm = _vm_hwm_kb()
    if hwm is not None:
        return hwm / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RU_MAXRSS_BYTES / 2**20


def children_peak_rss_mb() -> float:
    """The largest peak resident set among the child processes this process has waited for, in MiB (0: none)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * RU_MAXRSS_BYTES / 2**20


class JobUsage:
    """Started when a job starts (the clock, the peak RSS reset); record() when it ends."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._started = datetime.now().astimezone()
        self._per_job = reset_peak_rss()
        self._children_before = children_peak_rss_mb()

    def record(self) -> dict:
        children = children_peak_rss_mb()
        return {
            "started": self._started.isoformat(timespec="seconds"),
            "ended": datetime.now().astimezone().isoformat(timespec="seconds"),
            "wall_seconds": round(time.perf_counter() - self._start, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_rss_since": "job start" if self._per_job else "process start",
            # Child processes (DataLoader workers, DDP ranks, W&B's service) that ended during the job: ru_maxrss of
            # the children is a maximum over the process life, so it is the job's only when it grew during the job.
            # A forked child's resident set counts the pages it shares with this process (until it execs).
            "children_peak_rss_mb": round(children, 1) if children > self._children_before else None,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
        }
