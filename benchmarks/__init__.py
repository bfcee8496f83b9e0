"""`make bench` (benchmarks/run.py). Before torch is imported anywhere in the run: OpenMP threads that wait for work
sleep instead of spinning (OMP_WAIT_POLICY=passive, unless set). On a shared, oversubscribed machine the default
spinning makes every parallel op wait until a descheduled sibling thread runs again: a 262K-element add at
2 threads took 9 ms instead of 0.34 ms (load average 6 on 2 cores). Child processes inherit the setting."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")
