"""hybridlm.kernels.compile_check: every Triton kernel compiles for sm_80 and sm_90 at realistic shapes and fits in
shared memory (fast mode, PTX), and in full mode (ptxas) spills at most 1 KB per thread. Each check runs in its own
process without TRITON_INTERPRET: the interpreter, which these kernel tests otherwise use (conftest.py), replaces
triton.language when triton is first imported, and then nothing can be compiled."""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hybridlm.kernels.ssd.triton_kernel import SHARED_BYTES_BUDGET

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ROOT / "kernels"


def run_python(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def launched_kernels() -> set[tuple[str, str]]:
    """(op folder, name) of every @triton.jit function that some wrapper launches (`name[grid](...)`), read from
    the sources, so a new kernel that the check does not reach fails the test."""
    found = set()
    for path in KERNELS.glob("*/*.py"):
        src = path.read_text()
        jit = set(re.findall(r"@triton\.jit\s*\ndef (\w+)", src))
        launched = set(re.findall(r"^\s*(\w+)\[", src, flags=re.M))
        found |= {(path.parent.name, name) for name in jit & launched}
    return found


def run_check(tmp_path: Path, full: bool, timeout: int) -> list[dict]:
    out = tmp_path / "rows.json"
    args = ["-m", "hybridlm.kernels.compile_check", "--json", str(out), *(["--full"] if full else [])]
    proc = run_python(args, timeout)
    assert proc.returncode == 0, f"compile check failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    rows = json.loads(out.read_text())
    reached = {(r["kernel"].split(".")[0], r["kernel"].split(".")[1].split(" ")[0]) for r in rows}
    assert launched_kernels() <= reached, f"kernels never compiled: {sorted(launched_kernels() - reached)}"
    assert {r["arch"] for r in rows} == {80, 90}
    for r in rows:
        assert r["shared"] is not None and r["shared"] <= r["shared_limit"] and not r["problems"], r
        if r["op"] == "ssd_scan":  # what ssd_triton_fits relies on: every sm_80+ GPU can launch them
            assert r["shared"] <= SHARED_BYTES_BUDGET, r
    return rows


def test_every_kernel_compiles_and_fits_in_shared_memory(tmp_path):
    rows = run_check(tmp_path, full=False, timeout=600)
    # the official Mamba-2 head/state/chunk sizes (headdim 64, d_state 128, chunk 256) are among the shapes
    assert any(r["op"] == "ssd_scan" and "p64 n128 g1 Q256" in r["shape"] for r in rows)
    assert all(r["regs"] is None for r in rows)  # fast mode stops before ptxas


@pytest.mark.slow
def test_full_build_spills_within_budget(tmp_path):
    rows = run_check(tmp_path, full=True, timeout=1700)
    assert {r["dtype"] for r in rows} == {"bfloat16", "float32"}
    for r in rows:
        assert r["regs"] is not None and r["spill"] is not None and r["spill"] <= 1024, r


def test_check_reports_a_tile_over_the_shared_memory_limit():
    """The same check, with window attention's tile function replaced by one asking for 128 x 128 x 128 tiles:
    the forward kernel then needs more shared memory than an H100 block has, and the row says so."""
    script = textwrap.dedent("""
        import torch
        import hybridlm.kernels.compile_check as cc
        import hybridlm.kernels.window_attention.triton_kernel as wa

        wa.attention_blocks = lambda head_dim: dict(BLOCK_M=128, BLOCK_N=128, BLOCK_D=128)
        def forward():  # forward only (inputs need no grad)
            q = cc._meta(2, 4, 1024, 128, dtype=torch.bfloat16, grad=False)
            return (wa.window_attention_triton(q, q, q, 256),)
        rows = cc.check([cc.Case("window_attention", "oversized tiles", torch.bfloat16, forward)], [90], full=False)
        print(cc.format_table(rows))
    """)
    proc = run_python(["-c", script], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if "window_attention._fwd_kernel" in ln)
    m = re.search(r"FAIL: shared memory (\d+) B > 232448 B per block on sm_90", line)
    assert m and int(m.group(1)) > 232_448, proc.stdout
