"""Triton span-expanded attention against an explicit (Lq x Lk) mask built from the documented semantics and
against hybridlm's torch op: outputs and gradients of q, k, v, fp32 on CPU under the Triton interpreter."""
import pytest
import torch

from hybridlm.kernels.span_attention.naive import span_attention_naive
from hybridlm.kernels.span_attention.selection import block_summaries, select_blocks
from hybridlm.kernels.span_attention.torch_ref import span_attention_torch
from hybridlm.kernels.span_attention.triton_kernel import span_attention_triton


def check(q, k, v, selected, W, M, C):
    go = torch.randn_like(q)
    o = span_attention_triton(q, k, v, selected, W, M, C)
    o_ref = span_attention_naive(q, k, v, selected, W, M, C)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o, span_attention_torch(q, k, v, selected, W, M, C), rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad((o * go).sum(), (q, k, v))
    g_ref = torch.autograd.grad((o_ref * go).sum(), (q, k, v))
    for name, a, r in zip("qkv", g, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("b,h,hkv,lq,lk,d,W,M,C,top_k", [
    (1, 4, 2, 45, 45, 16, 8, 4, 8, 3),  # GQA, ragged last chunk, early chunks with empty slots
    (2, 2, 1, 30, 50, 8, 6, 8, 12, 2),  # cached keys; chunk not a multiple of the 16-row block
    (1, 2, 2, 40, 40, 16, 5, 4, 16, 0),  # top_k = 0: plain sliding window
])
def test_with_selected_blocks_from_select_blocks(b, h, hkv, lq, lk, d, W, M, C, top_k):
    torch.manual_seed(lq * 7 + top_k)
    q = torch.randn(b, h, lq, d, requires_grad=True)
    k = torch.randn(b, hkv, lk, d, requires_grad=True)
    v = torch.randn(b, hkv, lk, d, requires_grad=True)
    selected = select_blocks(q, block_summaries(k, M), lk, W, M, C, top_k)
    check(q, k, v, selected, W, M, C)


def test_block_chosen_by_many_chunks_and_partly_visible():
    """Block 0 is selected by every chunk (its dk/dv sum over chunks); chunk 1's first queries see block 2 only
    up to the key bound j <= t_i - W (the per-query rule, even for a block select_blocks would not return)."""
    torch.manual_seed(1)
    b, h, hkv, L, d, W, M, C = 1, 2, 1, 24, 16, 4, 4, 8
    q = torch.randn(b, h, L, d, requires_grad=True)
    k = torch.randn(b, hkv, L, d, requires_grad=True)
    v = torch.randn(b, hkv, L, d, requires_grad=True)
    selected = torch.tensor([[[[0, -1], [0, 2], [0, 1]]]])  # (b, hkv, n_chunks=3, top_k=2)
    check(q, k, v, selected, W, M, C)


@pytest.mark.parametrize("b,h,hkv,lq,lk,W,M,C,top_k", [
    (2, 4, 2, 150, 150, 12, 6, 8, 3),  # GQA; M divides lk (blocks gathered whole); ragged last chunk
    (1, 2, 2, 100, 131, 10, 8, 16, 4),  # cached keys; M does not divide lk (keys gathered one by one)
])
def test_torch_op_in_small_blocks_and_groups_of_one_chunk(monkeypatch, b, h, hkv, lq, lk, W, M, C, top_k):
    """The torch op's CPU path (window part in blocks of 16 queries, one block or chunk per flash call, merged
    with the retrieved part through the logsumexps), against the naive op, with empty slots."""
    import hybridlm.kernels.window_attention.torch_ref as win
    monkeypatch.setattr(win, "_BQ", 16)
    monkeypatch.setattr(win, "_GROUP_ELEMS", 1)
    torch.manual_seed(lq + lk)
    q, k, v = (torch.randn(b, n, length, 8, requires_grad=True)
               for n, length in ((h, lq), (hkv, lk), (hkv, lk)))
    selected = select_blocks(q, block_summaries(k, M), lk, W, M, C, top_k)
    selected = selected.masked_fill(torch.rand(selected.shape) < 0.3, -1)
    assert (selected >= 0).any() and (selected < 0).any()
    go = torch.randn(b, h, lq, 8)
    o = span_attention_torch(q, k, v, selected, W, M, C, softmax_scale=0.4)
    o_ref = span_attention_naive(q, k, v, selected, W, M, C, softmax_scale=0.4)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad((o * go).sum(), (q, k, v))
    g_ref = torch.autograd.grad((o_ref * go).sum(), (q, k, v))
    for name, a, r in zip("qkv", g, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"grad {name}: {m}")
