"""Triton chunked SSD scan (kernels/ssd/triton_kernel.py) against the token-by-token recurrence (kernels/ssd/naive.py)
and the torch chunked reference: outputs, final state and the gradients of all inputs, fp32 on CPU under the
Triton interpreter (see conftest.py).

The tolerances (1e-4) hold because the interpreter computes fp32 tl.dot exactly. Compiled for A100/H100, every
fp32 tl.dot runs in tf32 (inputs rounded to a 10-bit mantissa, relative error up to ~5e-4 each), so a GPU
comparison of these kernels needs tolerances of that order (or bf16-level ones for bf16 inputs), not these."""
import pytest
import torch

from hybridlm.kernels.ssd.naive import ssd_scan_naive
from hybridlm.kernels.ssd.torch_ref import ssd_scan_torch
from hybridlm.kernels.ssd.triton_kernel import ssd_scan_triton, ssd_triton_fits

NAMES = ("x", "dt", "A", "B", "C", "D", "initial_state")


def make_inputs(b, l, h, g, p, n, with_init, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(b, l, h, p)
    dt = torch.nn.functional.softplus(torch.randn(b, l, h) - 1)
    A = -(torch.rand(h) * 2 + 0.2)
    B, C = torch.randn(b, l, g, n), torch.randn(b, l, g, n)
    D = torch.randn(h)
    h0 = torch.randn(b, h, p, n) if with_init else None
    return [t.requires_grad_() if t is not None else None for t in (x, dt, A, B, C, D, h0)]


def grads(fn, inputs, gy, gs):
    y, s = fn(*inputs)
    loss = (y * gy).sum() + (s * gs).sum()
    req = [t for t in inputs if t is not None]
    return y, s, torch.autograd.grad(loss, req)


@pytest.mark.parametrize("b,l,h,g,p,n,chunk,with_init", [
    (2, 37, 4, 2, 8, 16, 16, True),  # ragged length, ngroups < nheads, initial state
    (1, 32, 2, 1, 16, 8, 16, False),  # exact multiple of the chunk, d_state below the 16-wide block
    (1, 7, 2, 2, 4, 16, 16, True),  # shorter than one chunk
    (1, 45, 3, 1, 5, 12, 12, True),  # chunk, headdim and d_state not powers of two
    # the official Mamba-2 head (headdim 64, d_state 128): two 64-wide state tiles; chunk 128 = two position
    # tiles per chunk, the last chunk ragged
    (1, 200, 2, 1, 64, 128, 128, True),
    # headdim 80 = two head-dim tiles (partial ddt sums); chunk 100 is not a multiple of the 64-wide position
    # tile, so every chunk has padded rows inside the kernels
    (1, 230, 2, 2, 80, 16, 100, False),
])
def test_forward_and_gradients_match_naive(b, l, h, g, p, n, chunk, with_init):
    inputs = make_inputs(b, l, h, g, p, n, with_init)
    x, dt, A, B, C, D, h0 = inputs
    gy, gs = torch.randn(b, l, h, p), torch.randn(b, h, p, n)
    y, s, g_tri = grads(lambda *a: ssd_scan_triton(*a[:5], chunk, D=a[5], initial_state=a[6]), inputs, gy, gs)
    y_ref, s_ref, g_ref = grads(lambda *a: ssd_scan_naive(*a), inputs, gy, gs)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-4)
    names = [nm for nm, t in zip(NAMES, inputs) if t is not None]
    for name, a, r in zip(names, g_tri, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=2e-4, msg=lambda m, name=name: f"grad {name}: {m}")
    # and the torch chunked reference gives the same outputs
    y_t, s_t = ssd_scan_torch(x, dt, A, B, C, chunk, D=D, initial_state=h0)
    torch.testing.assert_close(y, y_t, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s, s_t, rtol=1e-4, atol=1e-4)


def test_only_output_or_only_state_used():
    """Backward with dfinal = None (state unused) and with dy = None (output unused)."""
    inputs = make_inputs(1, 20, 2, 1, 4, 16, True, seed=1)
    x, dt, A, B, C, D, h0 = inputs
    y, _ = ssd_scan_triton(x, dt, A, B, C, 8, D=D, initial_state=h0)
    y_ref, _ = ssd_scan_naive(x, dt, A, B, C, D, h0)
    g1 = torch.autograd.grad(y.square().sum(), inputs)
    g2 = torch.autograd.grad(y_ref.square().sum(), inputs)
    for a, r in zip(g1, g2):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=2e-4)
    _, s = ssd_scan_triton(x, dt, A, B, C, 8, D=D, initial_state=h0)
    _, s_ref = ssd_scan_naive(x, dt, A, B, C, D, h0)
    g1 = torch.autograd.grad(s.square().sum(), [x, dt, A, B, h0])
    g2 = torch.autograd.grad(s_ref.square().sum(), [x, dt, A, B, h0])
    for a, r in zip(g1, g2):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=2e-4)


def test_streaming_in_pieces_equals_one_pass():
    x, dt, A, B, C, D, _ = (t.detach() if t is not None else None for t in make_inputs(2, 30, 2, 2, 4, 16, False, 2))
    y, s = ssd_scan_triton(x, dt, A, B, C, 8, D=D)
    y1, s1 = ssd_scan_triton(x[:, :13], dt[:, :13], A, B[:, :13], C[:, :13], 8, D=D)
    y2, s2 = ssd_scan_triton(x[:, 13:], dt[:, 13:], A, B[:, 13:], C[:, 13:], 8, D=D, initial_state=s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2, s, rtol=1e-5, atol=1e-5)


def test_fits_names_the_grid_limit():
    """Tiles do not grow with the shape, so the official sizes and larger ones fit; batch x heads indexes grid
    dimension 1, which CUDA caps at 65535."""
    x, B = torch.empty(8, 4096, 80, 64, device="meta"), torch.empty(8, 4096, 1, 256, device="meta")
    assert ssd_triton_fits(x, B, 256) is None
    reason = ssd_triton_fits(torch.empty(2, 16, 40000, 64, device="meta"), B[:2, :16], 256)
    assert reason is not None and "80000 > 65535" in reason


@pytest.mark.slow
def test_model_sized_shapes():
    """Chunk 64, headdim 32, d_state 64 as in the benchmark config, two chunks plus a tail."""
    inputs = make_inputs(1, 150, 4, 1, 32, 64, True, seed=3)
    gy, gs = torch.randn(1, 150, 4, 32), torch.randn(1, 4, 32, 64)
    y, s, g_tri = grads(lambda *a: ssd_scan_triton(*a[:5], 64, D=a[5], initial_state=a[6]), inputs, gy, gs)
    y_ref, s_ref, g_ref = grads(lambda *a: ssd_scan_naive(*a), inputs, gy, gs)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-3)
    for a, r in zip(g_tri, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("factor_range", [None, 0.0])
@pytest.mark.parametrize("with_d,use", [(True, "both"), (False, "both"), (True, "output"), (False, "state")])
def test_torch_decay_paths_match_naive(monkeypatch, factor_range, with_d, use):
    """torch_ref.py uses a chunk's decay matrix factored, exp(Acum_l - ref) exp(ref - Acum_s), in groups whose Acum
    spread within a chunk is at most _FACTOR_RANGE, else as exp(Acum_l - Acum_s): here the first groups are
    factored and the last (large dt) is not, or (factor_range 0) none is; with and without D, with only the output
    or only the final state used."""
    import hybridlm.kernels.ssd.torch_ref as ssd_ref

    if factor_range is not None:
        monkeypatch.setattr(ssd_ref, "_FACTOR_RANGE", factor_range)
    monkeypatch.setattr(ssd_ref, "_GROUP_ELEMS", 2 * 6 * 16 * 16 * 2)  # two chunks per group (b h Q^2 each)
    b, l, h, g, p, n, chunk = 2, 75, 6, 2, 3, 5, 16
    torch.manual_seed(5)
    dt = torch.nn.functional.softplus(torch.randn(b, l, h) - 1)
    dt[:, 64:] = 6.0  # Acum spread 6 * 15 * |A| > 80 in the last chunks
    args = [torch.randn(b, l, h, p), dt, -torch.rand(h) * 2 - 1, torch.randn(b, l, g, n), torch.randn(b, l, g, n),
            torch.randn(h) if with_d else None, torch.randn(b, h, p, n)]
    args = [a.double().requires_grad_() if a is not None else None for a in args]
    y, s = ssd_ref.ssd_scan_torch(*args[:5], chunk, D=args[5], initial_state=args[6])
    y_ref, s_ref = ssd_scan_naive(*args)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)
    gy, gs = torch.randn_like(y), torch.randn_like(s)
    def loss(y, s):
        return ((y * gy).sum() if use != "state" else 0) + ((s * gs).sum() if use != "output" else 0)
    req = [a for a in args if a is not None]
    g_ref = torch.autograd.grad(loss(y_ref, s_ref), req, allow_unused=True, materialize_grads=True)  # C: state only
    for name, a, r in zip([nm for nm, t in zip(NAMES, args) if t is not None], torch.autograd.grad(loss(y, s), req),
                          g_ref):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"grad {name}: {m}")
