"""OpenMP's wait policy against the ops (the `omp` section; why benchmarks/__init__.py chooses as it does): the
tiny-shape SSD scan (many small parallel ops) and sliding-window attention (a few large ones), forward + backward
at 16K tokens, in fresh processes that alternate between OMP_WAIT_POLICY=passive and OpenMP's default, so a load
change hits both arms. Per process: one warm-up, then the median of 5; the section reports the median over the
pairs of processes and the per-pair ratio passive / default. The policy is fixed when a process loads OpenMP, hence
a process per arm."""
from __future__ import annotations

import time

from benchmarks.common import child_main, median, report, run_child

ARMS = {"passive": {"OMP_WAIT_POLICY": "passive", "BENCH_OMP_POLICY": "passive (the omp section's arm)"},
        "default": {"OMP_WAIT_POLICY": None, "BENCH_OMP_POLICY": "OpenMP's default (the omp section's arm)"}}
LENGTH = 16384


def child(args: dict) -> dict:
    from benchmarks import scaling

    out = {}
    for name, make in (("SSD scan, tiny shape", scaling._ssd(scaling.TINY)),
                       ("SWA W=256, tiny shape", scaling._swa(scaling.TINY))):
        run, _ = make(args["length"], True)
        times = []
        for i in range(6):
            t = time.perf_counter()
            run().sum().backward()
            if i:  # the first is the warm-up
                times.append(time.perf_counter() - t)
        out[name] = median(times)
    return out


def run(pairs: int = 4, length: int = LENGTH) -> None:
    ms: dict[str, dict[str, list[float]]] = {}
    ratios: dict[str, list[float]] = {}
    for _ in range(pairs):
        got = {arm: run_child("benchmarks.omp_policy", {"length": length}, env=env) for arm, env in ARMS.items()}
        for op in got["passive"]:
            for arm in ARMS:
                ms.setdefault(op, {}).setdefault(arm, []).append(1000 * got[arm][op])
            ratios.setdefault(op, []).append(got["passive"][op] / got["default"][op])
    rows = [{"op": op, "length": length, "passive ms": median(ms[op]["passive"]),
             "default ms": median(ms[op]["default"]), "passive / default": median(ratios[op]), "pairs": pairs}
            for op in ms]
    report("omp_policy", "OpenMP wait policy: fwd+bwd ms in alternating fresh processes (median over pairs)", rows,
           ["op", "length", "passive ms", "default ms", "passive / default", "pairs"])


if __name__ == "__main__":
    child_main(child)
