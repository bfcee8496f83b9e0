"""Shared benchmark plumbing: machine info, timing (medians), fresh-subprocess runs for peak memory, markdown
tables and the JSON-lines results file."""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results.jsonl"
THREADS = int(os.environ.get("BENCH_THREADS", "2"))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "host": platform.node()}
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)  # a busy shared machine makes timings noisy
    except OSError:
        pass
    from benchmarks import OMP_POLICY

    info["omp_wait_policy"] = OMP_POLICY
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def setup_threads() -> None:
    torch.set_num_threads(THREADS)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    Linux: VmHWM from /proc/self/status. getrusage's ru_maxrss survives exec, so a child started by a big
    parent (fork copies the parent's resident pages, then exec) would report the parent's RSS as its own peak.
    Elsewhere: getrusage (KiB on Linux, bytes on macOS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def timeit(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of each of `repeats` calls after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def run_child(module: str, args: dict[str, Any], timeout: float = 900,
              env: dict[str, Optional[str]] | None = None) -> dict[str, Any]:
    """Run `python -m module '<json args>'` in a fresh process (own peak RSS, own allocator); its last stdout
    line is a JSON object. env: variables to set on top of this process's (None: remove it)."""
    env = {k: v for k, v in {**os.environ, "OMP_NUM_THREADS": str(THREADS), "PYTHONPATH": str(ROOT),
                             **(env or {})}.items() if v is not None}
    proc = subprocess.run([sys.executable, "-m", module, json.dumps(args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_main(fn: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Entry point of a child process: parse the JSON argument, run, print the JSON result last."""
    setup_threads()
    print(json.dumps(fn(json.loads(sys.argv[1]))))


def markdown_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def record(section: str, rows: list[dict[str, Any]], **extra: Any) -> None:
    """Append one JSON record (section, machine, rows, extra) to benchmarks/results.jsonl."""
    rec = {"section": section, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine_info(),
           "rows": rows, **extra}
    if os.environ.get("BENCH_LABEL"):  # e.g. which code a before/after comparison ran
        rec["label"] = os.environ["BENCH_LABEL"]
    with open(RESULTS, "a") as f:
        f.write(json.dumps(rec) + "\n")


def report(section: str, title: str, rows: list[dict[str, Any]], columns: Sequence[str], **extra: Any) -> None:
    print(f"\n### {title}\n")
    print(markdown_table(rows, columns))
    for k, v in extra.items():
        print(f"\n{k}: {v}")
    sys.stdout.flush()
    record(section, rows, **extra)
