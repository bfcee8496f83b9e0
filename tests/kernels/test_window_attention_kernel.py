"""Triton flash-style sliding-window attention against an explicit masked softmax and the torch op (outputs and
gradients of q, k, v), fp32 on CPU under the Triton interpreter (see conftest.py)."""
import pytest
import torch

from hybridlm.kernels.window_attention.naive import window_attention_naive
from hybridlm.kernels.window_attention.torch_ref import window_attention_torch
from hybridlm.kernels.window_attention.triton_kernel import window_attention_triton


@pytest.mark.parametrize("b,h,hkv,lq,lk,d,window", [
    (2, 4, 2, 37, 37, 8, None),  # full causal, GQA, ragged length
    (1, 4, 2, 29, 45, 16, 7),  # cached keys before the queries (streaming), window inside a block
    (1, 2, 1, 20, 20, 12, 40),  # window longer than the sequence; head dim not a power of two
    (1, 2, 2, 1, 30, 16, 12),  # one decoding query
    (1, 2, 2, 33, 33, 16, 1),  # window 1: each query sees only itself
])
def test_forward_and_gradients(b, h, hkv, lq, lk, d, window):
    torch.manual_seed(lq + lk)
    q = torch.randn(b, h, lq, d, requires_grad=True)
    k = torch.randn(b, hkv, lk, d, requires_grad=True)
    v = torch.randn(b, hkv, lk, d, requires_grad=True)
    go = torch.randn(b, h, lq, d)
    o = window_attention_triton(q, k, v, window)
    o_ref = window_attention_naive(q, k, v, window)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o, window_attention_torch(q, k, v, window), rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad((o * go).sum(), (q, k, v))
    g_ref = torch.autograd.grad((o_ref * go).sum(), (q, k, v))
    for name, a, r in zip("qkv", g, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"grad {name}: {m}")


def test_softmax_scale_and_non_contiguous_inputs():
    """q/k/v as the attention mixer makes them: transposed views of (b, l, h, d)."""
    torch.manual_seed(0)
    q = torch.randn(2, 19, 2, 16).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 19, 2, 16).transpose(1, 2).requires_grad_()
    v = torch.randn(2, 19, 2, 16).transpose(1, 2).requires_grad_()
    o = window_attention_triton(q, k, v, 6, softmax_scale=0.3)
    o_ref = window_attention_naive(q, k, v, 6, softmax_scale=0.3)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad(o.square().sum(), (q, k, v))
    g_ref = torch.autograd.grad(o_ref.square().sum(), (q, k, v))
    for a, r in zip(g, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("b,h,hkv,lq,lk,window", [
    (2, 4, 2, 300, 300, 20),  # GQA; head, many tiles, ragged tail
    (1, 2, 2, 150, 203, 33),  # cached keys before the queries: no head
    (1, 2, 1, 64, 64, 16),  # the queries an exact number of blocks
])
@pytest.mark.parametrize("bq,group", [(16, 1), (16, 1 << 30), (24, 1 << 30)])
def test_torch_banded_path_in_small_blocks_and_groups(monkeypatch, b, h, hkv, lq, lk, window, bq, group):
    """The torch op's direct banded path (CPU flash ops) with small blocks, one block or all blocks per call:
    tiles as strided views, head and tail calls, tile gradients summed into dk/dv (slice by slice, or through the
    diagonal view; blocks of 24 leave a partial last slice); against the naive op."""
    import hybridlm.kernels.window_attention.torch_ref as ops
    monkeypatch.setattr(ops, "_BQ", bq)
    monkeypatch.setattr(ops, "_GROUP_ELEMS", group)
    torch.manual_seed(lq + lk)
    q, k, v = (torch.randn(b, n, length, 8, requires_grad=True)
               for n, length in ((h, lq), (hkv, lk), (hkv, lk)))
    go = torch.randn(b, h, lq, 8)
    for scale in (None, 0.3):
        o = window_attention_torch(q, k, v, window, softmax_scale=scale)
        o_ref = window_attention_naive(q, k, v, window, softmax_scale=scale)
        torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
        g = torch.autograd.grad((o * go).sum(), (q, k, v))
        g_ref = torch.autograd.grad((o_ref * go).sum(), (q, k, v))
        for name, a, r in zip("qkv", g, g_ref):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"grad {name}: {m}")
