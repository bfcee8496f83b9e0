"""hybridlm.usage: a job's wall time and peak memory are its own, also when jobs share a process (the basic and
joblib launchers run several jobs in one process)."""
import json
import subprocess
import sys

import pytest

# Two jobs in one fresh process (this test process carries the peaks of earlier tests): the first touches 400 MiB
# and a child process of 300 MiB, the second 100 MiB and no child. VmRSS before each job is the reference.
SCRIPT = r"""
import json, re, subprocess, sys, time
from hybridlm.usage import JobUsage

def rss_mb():
    return int(re.search(r"VmRSS:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024

def touch(mib):
    b = bytearray(mib * 2**20)
    b[::4096] = b"\1" * len(b[::4096])  # every page resident
    return b

out = []
for mib, child in ((400, 300), (100, 0)):
    before = rss_mb()
    usage = JobUsage()
    if child:  # before the job's own block: a forked child's peak also counts the parent's pages it maps until exec
        subprocess.run([sys.executable, "-c", f"b = bytearray({child} * 2**20); b[::4096] = b'\1' * len(b[::4096])"],
                       check=True)
    block = touch(mib)
    time.sleep(0.2)
    del block
    out.append({"before": before, **usage.record()})
print(json.dumps(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the per-job reset needs Linux's /proc")
def test_each_job_gets_its_own_peak_rss_wall_time_and_children_peak():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, timeout=300)
    first, second = json.loads(proc.stdout.splitlines()[-1])
    assert first["peak_rss_since"] == second["peak_rss_since"] == "job start"
    assert first["peak_rss_mb"] >= first["before"] + 400 * 0.98
    # The second job's peak is its own 100 MiB on top of what was resident, not the first job's 400 MiB.
    assert second["before"] + 100 * 0.98 <= second["peak_rss_mb"] <= second["before"] + 100 + 50
    # the child's own 300 MiB plus an interpreter; none in the second job
    assert 300 <= first["children_peak_rss_mb"] < 400 and second["children_peak_rss_mb"] is None
    assert first["wall_seconds"] >= 0.2 and second["wall_seconds"] >= 0.2
    assert first["threads"] >= 1 and first["cpus"] >= 1 and len(first["load_average"]) == 3
