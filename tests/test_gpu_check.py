"""hybridlm.gpu_check: its CPU mode end to end (in-process), its comparison helper, and that it imports without the
training stack (the GPU machine it is meant for has no hydra, wandb or datasets)."""
import json
import math
import subprocess
import sys

import pytest
import torch

from hybridlm import gpu_check, ops
from hybridlm.gpu_check import TOL, call_op, compare, compare_all, make_inputs, naive_op


@pytest.fixture
def reset_backends():
    yield
    ops.configure("torch")


def test_cpu_mode_report(tmp_path, monkeypatch, capsys, reset_backends):
    # Without the interpreter triton cannot run on CPU: its rows must say so rather than run for minutes.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "report.json"
    assert gpu_check.main(["--cpu", "--out", str(out), "--budget", "900"]) == 0
    report = json.loads(out.read_text())
    assert report["failed"] == 0
    secs = report["sections"]
    assert list(secs) == ["small", "ops", "train", "bench"]
    for name in ("ops", "bench"):  # the GPU-only sections are skipped and say why
        assert secs[name]["status"] == "skipped" and secs[name]["reason"] and secs[name]["rows"] == []
    assert secs["small"]["status"] == secs["train"]["status"] == "ran"

    small = secs["small"]["rows"]
    ok = {(r["op"], r["shape"], r["dtype"]) for r in small if r["backend"] == "torch" and r["status"] == "ok"}
    assert ok == {(op, gpu_check.label(s), dt) for op, s in gpu_check.SMALL for dt in ("fp64", "fp32", "bf16")}
    fp64 = [r for r in small if r["dtype"] == "fp64"]
    assert all(set(r["errs"]) >= {"dq", "dk", "dv"} or set(r["errs"]) >= {"dx", "dweight"} or "dA" in r["errs"]
               for r in fp64)  # gradients of the inputs are compared, not only outputs
    assert all(r["err"] < TOL["fp64"] for r in fp64)
    for r in small:  # on CPU the other backends are skipped (or, with a GPU present, decline CPU tensors)
        if r["backend"] != "torch":
            assert r["status"] in ("skipped", "declined") and r["note"]

    train = secs["train"]["rows"]
    torch_rows = [r for r in train if r["backend"] == "torch"]
    assert [r["op"] for r in torch_rows] == ["HybridLM MMAM swa", "HybridLM MMAM se_attn"]
    for r in torch_rows:
        assert r["status"] == "ok" and all(math.isfinite(x) for x in r["losses"]) and r["losses"][-1] < r["losses"][0]
    for r in train:
        if r["backend"] != "torch":
            assert r["status"] == "skipped" or "declined" in r["note"]

    table = capsys.readouterr().out
    assert "skipped: " + secs["ops"]["reason"] in table and "0 check(s) failed" in table


def test_compare_fails_on_wrong_results(reset_backends):
    ref = torch.randn(4, 8, dtype=torch.float64)
    assert compare(ref.clone(), ref, 1e-12) == (True, 0.0)
    off = ref.clone()
    off[1, 2] += 0.01 * ref.abs().max()
    ok, err = compare(off, ref, 1e-3)
    assert not ok and err == pytest.approx(0.01)
    nan = ref.clone()
    nan[0, 0] = float("nan")
    assert not compare(nan, ref, 1.0)[0]
    assert not compare(ref[:3], ref, 1.0)[0]  # shape mismatch
    assert not compare(None, ref, 1.0)[0]  # a missing gradient
    assert compare_all(["a", "b"], [ref, off], [ref, ref], 1e-3)[:3] == (False, err, "b")

    # A real op run with a wrong setting (window 9 instead of 8) fails against the naive reference of window 8.
    ops.configure("torch")
    s = dict(b=1, h=2, kv=1, Lq=24, Lk=24, d=8, W=8)
    args = make_inputs("window_attention", s, torch.float64, torch.device("cpu"), seed=0)
    (want,) = naive_op("window_attention", s, args)
    (good,) = call_op("window_attention", s, args)
    (bad,) = call_op("window_attention", {**s, "W": 9}, args)
    assert compare(good, want, TOL["fp64"])[0]
    assert not compare(bad, want, TOL["bf16"])[0]


def test_exit_code_on_failure(tmp_path, monkeypatch, reset_backends):
    # A bf16 tolerance no rounding can meet: the bf16 rows fail, the report counts them and the exit code says so.
    monkeypatch.setitem(TOL, "bf16", 1e-9)
    monkeypatch.setattr(gpu_check, "SMALL", gpu_check.SMALL[1:2])  # the conv case: fast
    out = tmp_path / "report.json"
    assert gpu_check.main(["--cpu", "--backends", "torch", "--sections", "small", "--out", str(out)]) == 1
    rows = json.loads(out.read_text())["sections"]["small"]["rows"]
    assert [(r["dtype"], r["status"]) for r in rows] == [("fp64", "ok"), ("fp32", "ok"), ("bf16", "FAIL")]


def test_imports_without_training_stack():
    code = ("import sys, hybridlm.gpu_check; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'hydra', 'wandb', 'datasets', 'omegaconf'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
