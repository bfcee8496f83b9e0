"""`make bench` (benchmarks/run.py). Before torch is imported anywhere in the run, the OpenMP wait policy:

- a quiet machine (1-minute load average below the core count - 0.5) keeps OpenMP's default, what a training run
  gets: waiting threads spin for a while before they sleep. Forcing `passive` there made the SSD scan's many
  small parallel ops ~1.45x slower (tiny shape, 16K tokens, fwd+bwd: median 136 vs 94 ms over 4 alternating
  process pairs, 2026-12-02; sliding-window attention, a few large ops, unchanged);
- an oversubscribed one gets OMP_WAIT_POLICY=passive: with spinning, every parallel op waits until a descheduled
  sibling thread runs again (a 262K-element add at 2 threads took 9 ms instead of 0.34 ms at load 6 on 2 cores).

An OMP_WAIT_POLICY already set is kept. The policy is recorded with every section (machine line, JSON record);
child processes inherit it."""
import os

if "OMP_WAIT_POLICY" in os.environ:
    OMP_POLICY = f"{os.environ['OMP_WAIT_POLICY']} (set by the caller)"
elif os.getloadavg()[0] >= (os.cpu_count() or 1) - 0.5:
    os.environ["OMP_WAIT_POLICY"] = "passive"
    OMP_POLICY = "passive (load average at start >= cores - 0.5)"
else:
    OMP_POLICY = "OpenMP's default (quiet machine at start)"
