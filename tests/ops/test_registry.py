"""Backend registry: selection (auto / named / per-op config / env override), clear errors for backends that
cannot run here, fall-through on a per-call decline logged once, and the op wrappers' argument wiring."""
import logging
import operator
import subprocess
import sys

import pytest
import torch

from hybridlm import ops
from hybridlm.kernels.causal_conv1d.torch_ref import causal_conv1d_torch
from hybridlm.kernels.span_attention.torch_ref import span_attention_torch
from hybridlm.kernels.ssd.torch_ref import ssd_scan_torch
from hybridlm.kernels.window_attention.torch_ref import window_attention_torch
from hybridlm.ops import registry
from hybridlm.ops.config import BackendConfig
from hybridlm.ops.registry import Backend, BackendUnavailableError

ENV_VARS = ["HYBRIDLM_BACKEND_SSD", "HYBRIDLM_BACKEND_CONV", "HYBRIDLM_BACKEND_WINDOW_ATTN",
            "HYBRIDLM_BACKEND_SPAN_ATTN", "HYBRIDLM_BACKEND_SE_ATTN", "HYBRIDLM_BACKEND_TOY", "TRITON_INTERPRET"]
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    yield
    registry._CHAINS.clear()  # the next op call re-resolves `auto` (after monkeypatch removes any toy op)


@pytest.fixture
def toy(monkeypatch):
    """A fake op `toy` on numbers: torch = abs, triton = negation (declines negative inputs), mamba_ssm = str
    (unavailable), so the result shows which backend ran."""
    impls = {
        "torch": Backend("toy", "torch", 0, lambda: abs),
        "triton": Backend("toy", "triton", 10, lambda: operator.neg,
                          verify=lambda x: "negative input" if x < 0 else None),
        "mamba_ssm": Backend("toy", "mamba_ssm", 20, lambda: str, available=lambda: "no GPU in this test"),
    }
    monkeypatch.setitem(registry._BACKENDS, "toy", impls)
    return impls


@no_gpu
def test_auto_on_this_cpu_machine_is_torch_and_says_why():
    chains = ops.configure("auto")
    assert chains == {op: ("torch",) for op in ("ssd_scan", "causal_conv1d", "window_attention", "span_attention",
                                                   "se_attention")}
    table = ops.describe()
    for op in chains:
        assert op in table
    assert "TRITON_INTERPRET" in table and "CUDA" in table


@no_gpu
def test_named_backend_that_cannot_run_raises_with_the_reason():
    with pytest.raises(BackendUnavailableError, match="triton.*TRITON_INTERPRET"):
        ops.configure("triton")
    with pytest.raises(BackendUnavailableError, match="mamba_ssm.*CUDA"):
        ops.configure(BackendConfig(name="mamba_ssm"))
    with pytest.raises(BackendUnavailableError, match="backend.window_attn=triton"):
        ops.configure(BackendConfig(name="torch", window_attn="triton"))


def test_unknown_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        ops.configure("cuda")
    monkeypatch.setenv("HYBRIDLM_BACKEND_WINDOW_ATTN", "mamba_ssm")  # window_attention has no mamba_ssm backend
    with pytest.raises(BackendUnavailableError, match="HYBRIDLM_BACKEND_WINDOW_ATTN=mamba_ssm.*no 'mamba_ssm' backend"):
        ops.configure("torch")


def test_auto_picks_best_available_and_a_decline_falls_through_logged_once(toy, caplog):
    assert ops.configure("auto")["toy"] == ("triton", "torch")
    assert "no GPU in this test" in ops.describe()  # why mamba_ssm was skipped
    assert registry.call("toy", 3) == -3  # triton
    with caplog.at_level(logging.WARNING, logger="hybridlm.ops.registry"):
        results = [registry.call("toy", -x) for x in (1, 2, 3)]
    assert results == [1, 2, 3]  # torch
    declines = [r.getMessage() for r in caplog.records]
    assert len(declines) == 1 and "toy" in declines[0] and "negative input" in declines[0]
    assert ("toy", "triton", "negative input") in ops.declined()


def test_auto_skip_and_explicit_request(toy, monkeypatch):
    toy["triton"].auto_skip = lambda: "interpreter only"
    assert ops.configure("auto")["toy"] == ("torch",)
    assert "interpreter only" in ops.describe()
    monkeypatch.setenv("HYBRIDLM_BACKEND_TOY", "triton")  # asked for by name: used
    assert ops.configure("auto")["toy"] == ("triton", "torch")


def test_env_override_beats_config(toy, monkeypatch):
    monkeypatch.setenv("HYBRIDLM_BACKEND_TOY", "torch")
    chains = ops.configure("auto")
    assert chains["toy"] == ("torch",)
    assert "HYBRIDLM_BACKEND_TOY=torch" in ops.describe()
    monkeypatch.setenv("HYBRIDLM_BACKEND_TOY", "mamba_ssm")
    with pytest.raises(BackendUnavailableError, match="HYBRIDLM_BACKEND_TOY=mamba_ssm.*no GPU in this test"):
        ops.configure("torch")


def test_op_wrappers_pass_arguments_through():
    """ops.* under the torch backend equal the reference functions called with keywords."""
    ops.configure("torch")
    torch.manual_seed(0)
    b, l, h, p, g, n = 2, 11, 4, 3, 2, 5
    x, dt, A = torch.randn(b, l, h, p), torch.rand(b, l, h), -torch.rand(h)
    B, C, D, h0 = torch.randn(b, l, g, n), torch.randn(b, l, g, n), torch.randn(h), torch.randn(b, h, p, n)
    got = ops.ssd_scan(x, dt, A, B, C, chunk_size=4, D=D, initial_state=h0)
    want = ssd_scan_torch(x, dt, A, B, C, chunk_size=4, D=D, initial_state=h0)
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r)
    u, w, bias, cs = torch.randn(b, l, 6), torch.randn(6, 1, 4), torch.randn(6), torch.randn(b, 3, 6)
    for a, r in zip(ops.causal_conv1d(u, w, bias, cs), causal_conv1d_torch(u, w, bias, conv_state=cs)):
        torch.testing.assert_close(a, r)
    q, k, v = torch.randn(1, 2, 9, 8), torch.randn(1, 1, 12, 8), torch.randn(1, 1, 12, 8)
    torch.testing.assert_close(ops.window_attention(q, k, v, window=5, softmax_scale=0.2),
                               window_attention_torch(q, k, v, window=5, softmax_scale=0.2))
    selected = torch.tensor([[[[0, -1], [0, 1], [1, 0]]]])
    torch.testing.assert_close(ops.span_attention(q, k, v, selected, 3, 2, 3, softmax_scale=0.5),
                               span_attention_torch(q, k, v, selected, 3, 2, 3, softmax_scale=0.5))


def test_importing_an_op_module_first_registers_every_op_in_order():
    """The op folders import hybridlm.ops.registry and hybridlm.ops imports the op folders: a fresh interpreter that
    imports an op's module before hybridlm.ops still ends with every op registered, in the describe() order."""
    code = ("import hybridlm.kernels.span_attention.selection; from hybridlm.ops import registry; "
            "print(*registry._BACKENDS)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["ssd_scan", "causal_conv1d", "window_attention", "span_attention", "se_attention"]
