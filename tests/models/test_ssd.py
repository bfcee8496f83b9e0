"""The chunked SSD scan and the causal conv against the naive loops over time shipped beside them
(kernels/ssd/naive.py, kernels/causal_conv1d/naive.py)."""
import pytest
import torch

from hybridlm.kernels.causal_conv1d.naive import causal_conv1d_naive
from hybridlm.kernels.causal_conv1d.torch_ref import causal_conv1d_torch
from hybridlm.kernels.ssd.naive import ssd_scan_naive
from hybridlm.kernels.ssd.torch_ref import ssd_scan_torch


@pytest.mark.parametrize("l,chunk,g", [(50, 16, 1), (64, 16, 2), (7, 16, 1), (33, 8, 4)])
def test_ssd_matches_naive_recurrence_with_initial_state(l, chunk, g):
    torch.manual_seed(l)
    b, nh, p, n = 2, 4, 3, 5
    x = torch.randn(b, l, nh, p)
    dt = torch.nn.functional.softplus(torch.randn(b, l, nh))
    A = -torch.rand(nh) * 2 - 0.1
    B, C = torch.randn(b, l, g, n), torch.randn(b, l, g, n)
    D = torch.randn(nh)
    h0 = torch.randn(b, nh, p, n)
    y, h = ssd_scan_torch(x, dt, A, B, C, chunk, D=D, initial_state=h0)
    y_ref, h_ref = ssd_scan_naive(*(t.double() for t in (x, dt, A, B, C, D, h0)))  # the recurrence in float64
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-4, atol=1e-4)


def test_ssd_gradients_match_naive():
    torch.manual_seed(0)
    b, l, nh, p, n = 1, 21, 2, 3, 4
    args = [torch.randn(b, l, nh, p), torch.nn.functional.softplus(torch.randn(b, l, nh)), -torch.rand(nh) - 0.1,
            torch.randn(b, l, 1, n), torch.randn(b, l, 1, n), torch.randn(nh), torch.randn(b, nh, p, n)]
    args = [a.double().requires_grad_() for a in args]
    x, dt, A, B, C, D, h0 = args
    y, h = ssd_scan_torch(x, dt, A, B, C, 8, D=D, initial_state=h0)
    (y.sum() + (h ** 2).sum()).backward()
    grads = [a.grad.clone() for a in args]
    for a in args:
        a.grad = None
    y2, h2 = ssd_scan_naive(*args)
    (y2.sum() + (h2 ** 2).sum()).backward()
    for g1, a in zip(grads, args):
        torch.testing.assert_close(g1, a.grad, rtol=1e-6, atol=1e-6)


def test_causal_conv_matches_loop_and_streams():
    torch.manual_seed(0)
    b, l, d, k = 2, 9, 6, 4
    x, w, bias = torch.randn(b, l, d), torch.randn(d, 1, k), torch.randn(d)
    y, state = causal_conv1d_torch(x, w, bias)
    torch.testing.assert_close(y, causal_conv1d_naive(x, w, bias)[0])
    torch.testing.assert_close(state, x[:, -(k - 1):])
    # pieces shorter than k-1 carry the state correctly
    y1, s1 = causal_conv1d_torch(x[:, :2], w, bias)
    y2, s2 = causal_conv1d_torch(x[:, 2:3], w, bias, s1)
    y3, s3 = causal_conv1d_torch(x[:, 3:], w, bias, s2)
    torch.testing.assert_close(torch.cat([y1, y2, y3], 1), y)
    torch.testing.assert_close(s3, state)
