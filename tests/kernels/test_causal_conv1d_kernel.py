"""Triton causal conv1d (kernels/causal_conv1d/triton_kernel.py) against the per-timestep loop
(kernels/causal_conv1d/naive.py) and the torch op: outputs, new state and the gradients of x, weight, bias and
conv_state (through y and the new state), streaming in pieces, strided inputs, bf16, and routing through the op
registry. CPU under the Triton interpreter (see conftest.py)."""
import logging
import random

import pytest
import torch

import hybridlm.kernels.causal_conv1d.triton_kernel as kmod
from hybridlm import ops
from hybridlm.kernels.causal_conv1d.naive import causal_conv1d_naive
from hybridlm.kernels.causal_conv1d.torch_ref import causal_conv1d_torch
from hybridlm.kernels.causal_conv1d.triton_kernel import BLOCK_D, BLOCK_L, causal_conv1d_triton

NAMES = ("x", "weight", "bias", "conv_state")


def make_inputs(b, l, d, k, with_bias, with_state, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    x = torch.randn(b, l, d, dtype=dtype)
    w = torch.randn(d, 1, k) / k
    bias = torch.randn(d) if with_bias else None
    cs = torch.randn(b, k - 1, d, dtype=dtype) if with_state else None
    return [t.requires_grad_() if t is not None else None for t in (x, w, bias, cs)]


def run(fn, inputs, gy, gs):
    """y, new state and the gradients of the given inputs of loss = <y, gy> + <new state, gs>."""
    y, s = fn(*inputs)
    req = [t for t in inputs if t is not None]
    return y, s, torch.autograd.grad((y.float() * gy).sum() + (s.float() * gs).sum(), req)


def check_against_references(b, l, d, k, with_bias, with_state, seed=0):
    inputs = make_inputs(b, l, d, k, with_bias, with_state, seed)
    gy, gs = torch.randn(b, l, d), torch.randn(b, k - 1, d)
    y, s, g = run(causal_conv1d_triton, inputs, gy, gs)
    names = [n for n, t in zip(NAMES, inputs) if t is not None]
    for ref_fn in (causal_conv1d_naive, causal_conv1d_torch):
        y_ref, s_ref, g_ref = run(ref_fn, inputs, gy, gs)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        assert s.shape == (b, k - 1, d)
        torch.testing.assert_close(s, s_ref, rtol=0, atol=0)  # the state is a copy of inputs
        for name, a, r in zip(names, g, g_ref):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("b,l,d,k,with_bias,with_state", [
    (2, 37, 45, 4, True, True),  # several time and channel blocks, neither a multiple of the block
    (1, 2, 5, 4, True, True),  # l < k-1: the new state keeps part of the old one
    (2, 3, 7, 4, False, False),  # l == k-1, no bias, zero state
    (1, 1, 33, 4, False, True),  # one decoding step, d one past a channel block
    (1, 2 * BLOCK_L, BLOCK_D, 3, True, False),  # exact multiples of both blocks
    (1, 5, 3, 1, True, True),  # k = 1: pointwise, empty state
    (1, 20, 9, 7, True, True),  # a long kernel whose taps span two time blocks
])
def test_forward_state_and_gradients(b, l, d, k, with_bias, with_state):
    check_against_references(b, l, d, k, with_bias, with_state)


def test_random_shapes():
    rng = random.Random(0)
    for seed in range(6):
        k = rng.randint(2, 5)
        shape = (rng.randint(1, 2), rng.choice([rng.randint(1, k - 1), rng.randint(k, 40)]), rng.randint(1, 70), k)
        check_against_references(*shape, rng.random() < 0.5, rng.random() < 0.5, seed=seed)


def test_streaming_in_pieces_equals_one_pass():
    """Pieces shorter and longer than k-1, the state passed along undetached: same outputs, final state and
    gradients (which reach early pieces only through the states) as one pass."""
    b, l, d, k = 2, 23, 10, 4
    x, w, bias, cs = make_inputs(b, l, d, k, True, True)
    gy, gs = torch.randn(b, l, d), torch.randn(b, k - 1, d)
    y_one, s_one, g_one = run(causal_conv1d_triton, (x, w, bias, cs), gy, gs)

    def pieces(x, w, bias, cs):
        ys, state = [], cs
        for lo, hi in [(0, 1), (1, 3), (3, 4), (4, 17), (17, 23)]:
            y, state = causal_conv1d_triton(x[:, lo:hi], w, bias, state)
            ys.append(y)
        return torch.cat(ys, dim=1), state

    y_pc, s_pc, g_pc = run(pieces, (x, w, bias, cs), gy, gs)
    torch.testing.assert_close(y_pc, y_one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_pc, s_one, rtol=0, atol=0)
    for name, a, r in zip(NAMES, g_pc, g_one):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"grad {n}: {m}")


def test_strided_inputs():
    """x as Mamba-2 passes it (a channel slice of the in_proj output) and a transposed conv_state view."""
    torch.manual_seed(0)
    b, l, d, k = 2, 19, 12, 4
    x = torch.randn(b, l, d + 9)[..., 4:4 + d].requires_grad_()
    cs = torch.randn(b, d, k - 1).transpose(1, 2).requires_grad_()
    w, bias = torch.randn(d, 1, k, requires_grad=True), torch.randn(d, requires_grad=True)
    gy, gs = torch.randn(b, l, d), torch.randn(b, k - 1, d)
    y, s, g = run(causal_conv1d_triton, (x, w, bias, cs), gy, gs)
    y_ref, s_ref, g_ref = run(causal_conv1d_naive, (x, w, bias, cs), gy, gs)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    for a, r in zip(g, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_state", [True, False])
def test_bf16(with_state):
    """bf16 x / conv_state with fp32 weight and bias: y and gradients in the inputs' dtypes, close to the fp32
    loop on the same values (the kernel accumulates in fp32) and, more loosely, to the torch op (bf16 throughout)."""
    b, l, d, k = 2, 21, 40, 4
    inputs = make_inputs(b, l, d, k, True, with_state, dtype=torch.bfloat16)
    gy, gs = torch.randn(b, l, d), torch.randn(b, k - 1, d)
    y, s, g = run(causal_conv1d_triton, inputs, gy, gs)
    assert y.dtype == s.dtype == torch.bfloat16
    assert [a.dtype for a in g] == [t.dtype for t in inputs if t is not None]
    y_ref, s_ref, g_ref = run(causal_conv1d_naive, inputs, gy, gs)
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    for a, r in zip(g, g_ref):
        torch.testing.assert_close(a.float(), r.float(), rtol=3e-2, atol=3e-2)
    y_t, _, g_t = run(causal_conv1d_torch, inputs, gy, gs)
    torch.testing.assert_close(y, y_t, rtol=5e-2, atol=5e-2)
    for a, r in zip(g, g_t):
        torch.testing.assert_close(a.float(), r.float(), rtol=5e-2, atol=2e-1)


@pytest.fixture
def reset_backends():
    yield
    ops.configure("torch")


def test_triton_backend_routes_causal_conv1d_to_the_kernel(reset_backends, monkeypatch, caplog):
    ops.configure("torch")
    assert ops.active("causal_conv1d") == "torch"
    assert ops.configure("triton")["causal_conv1d"] == ("triton", "torch")
    assert ops.active("causal_conv1d") == "triton"
    row = next(r for r in ops.describe().splitlines() if r.startswith("causal_conv1d"))
    assert "triton -> torch" in row

    calls = []  # one entry per run of the kernel's autograd Function
    apply = kmod._CausalConv1d.apply
    monkeypatch.setattr(kmod._CausalConv1d, "apply", lambda *args: calls.append(1) or apply(*args))
    x, w, bias, cs = make_inputs(1, 9, 6, 4, True, True)
    with torch.no_grad():
        for a, r in zip(ops.causal_conv1d(x, w, bias, cs), causal_conv1d_naive(x, w, bias, cs)):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    assert calls == [1]  # the kernel ran, not the torch fallback
    # a kernel longer than the unrolled maximum is declined, logged once, and computed by torch
    x, w, bias, cs = make_inputs(1, 9, 6, 17, True, True)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="hybridlm.ops.registry"):
        for _ in range(2):
            y, s = ops.causal_conv1d(x, w, bias, cs)
    assert calls == [1]
    torch.testing.assert_close(y, causal_conv1d_naive(x, w, bias, cs)[0], rtol=1e-5, atol=1e-5)
    lines = [r.getMessage() for r in caplog.records if "causal_conv1d" in r.getMessage()]
    assert len(lines) == 1 and "kernel size 17 > 16" in lines[0]
