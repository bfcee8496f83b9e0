"""`make bench` (benchmarks/run.py). Before torch is imported anywhere in the run, the OpenMP wait policy:

- a quiet machine (1-minute load average below the core count - 0.5) keeps OpenMP's default, what a training run
  gets: waiting threads spin for a while before they sleep. Forcing `passive` there made the SSD scan's many
  small parallel ops ~1.5x slower (the `omp` section measures it: benchmarks/omp_policy.py);
- an oversubscribed one gets OMP_WAIT_POLICY=passive: with spinning, every parallel op waits until a descheduled
  sibling thread runs again (a 262K-element add at 2 threads took 9 ms instead of 0.34 ms at load 6 on 2 cores).

An OMP_WAIT_POLICY already set is kept. The run's main process decides once and its child processes (fresh
processes for peak memory) inherit the decision through BENCH_OMP_POLICY instead of judging a load that the run
itself raises. The policy is recorded with every section (machine line, JSON record)."""
import os

if "BENCH_OMP_POLICY" in os.environ:  # a child process of a bench run: the main process has decided
    OMP_POLICY = os.environ["BENCH_OMP_POLICY"]
elif "OMP_WAIT_POLICY" in os.environ:
    OMP_POLICY = f"{os.environ['OMP_WAIT_POLICY']} (set by the caller)"
elif hasattr(os, "getloadavg") and os.getloadavg()[0] >= (os.cpu_count() or 1) - 0.5:
    os.environ["OMP_WAIT_POLICY"] = "passive"
    OMP_POLICY = "passive (load average at start >= cores - 0.5)"
else:
    OMP_POLICY = "OpenMP's default (quiet machine at start)"
os.environ["BENCH_OMP_POLICY"] = OMP_POLICY
