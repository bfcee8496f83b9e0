"""The torch ops' fast paths against the naive references they replace loops of: sliding-window attention in
banded blocks (window_attention/torch_ref.py; its direct flash-op path and the SDPA path other devices take),
its overlapping key tiles, and the SSD scan in groups of chunks with the states carried across chunks
(ssd/torch_ref.py). Lengths cross block and group boundaries; float64, so any disagreement beyond rounding is a
bug."""
import pytest
import torch
from helpers import assert_close_with_grads

import hybridlm.kernels.ssd.torch_ref as ssd_ref
import hybridlm.kernels.window_attention.torch_ref as win_ref
from hybridlm.kernels.ssd.naive import ssd_scan_naive
from hybridlm.kernels.window_attention.naive import window_mask
from hybridlm.kernels.window_attention.torch_ref import KeyTiles, window_attention_torch


def naive_attention(q, k, v, window, scale=None):
    """The masked softmax of window_attention/naive.py, in the inputs' precision (float64 here)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = torch.einsum("bhid,bhjd->bhij", q, k) * (scale if scale is not None else q.shape[-1] ** -0.5)
    s = s.masked_fill(~window_mask(q.shape[2], k.shape[2], window), float("-inf"))
    return torch.einsum("bhij,bhjd->bhid", torch.softmax(s, dim=-1), v)


@pytest.mark.parametrize("b,h,hkv,lq,lk,d,window", [
    (2, 4, 1, 300, 300, 8, 64),  # several blocks, grouped KV, ragged last block
    (1, 2, 2, 257, 400, 8, 100),  # cached keys before the queries: no front region
    (1, 2, 2, 200, 210, 8, 100),  # a short cache: part of the queries still see fewer than W - 1 earlier keys
    (1, 2, 1, 130, 130, 8, 129),  # window one short of the sequence
    (2, 2, 2, 1000, 1000, 8, 33),  # many blocks; W - 1 not a multiple of the block
    (1, 3, 3, 70, 70, 4, 1),  # each query sees only itself
    (1, 2, 2, 5, 700, 8, 300),  # a few queries at the end of a long cache
])
@pytest.mark.parametrize("direct", [True, False], ids=["flash-ops", "sdpa"])  # sdpa: older torch, other devices
def test_banded_window_attention_matches_masked_softmax(monkeypatch, direct, b, h, hkv, lq, lk, d, window):
    monkeypatch.setattr(win_ref, "_DIRECT", direct)
    torch.manual_seed(lq + window)
    q = torch.randn(b, h, lq, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, hkv, lk, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, hkv, lk, d, dtype=torch.float64, requires_grad=True)
    assert window < lk  # the banded path (blocks of _band_block(window, lq) queries)
    o, o_ref = window_attention_torch(q, k, v, window, 0.3), naive_attention(q, k, v, window, 0.3)
    assert_close_with_grads(o, o_ref, (q, k, v), rtol=1e-10, atol=1e-10)


def test_window_attention_of_transposed_views():
    """q/k/v as the attention mixer makes them: transposed views of (b, l, h, d)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 150, 2, 8, dtype=torch.float64).transpose(1, 2) for _ in range(3))
    torch.testing.assert_close(window_attention_torch(q, k, v, 40), naive_attention(q, k, v, 40))


def test_key_tiles_are_the_overlapping_windows_with_their_gradient():
    x = torch.randn(2, 3, 7 * 4, 5, dtype=torch.float64, requires_grad=True)  # 7 blocks of 4 rows
    tiles = KeyTiles.apply(x, 4, 3)  # (5 tiles, 2*3, 12 rows, 5): tile j = blocks j, j+1, j+2
    want = x.unfold(2, 12, 4).permute(2, 0, 1, 4, 3).reshape(5, 6, 12, 5)
    torch.testing.assert_close(tiles, want, rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda t: KeyTiles.apply(t, 4, 3), (x,))


@pytest.mark.parametrize("group_elems", [1, 3 * 16 * 16 * 4 * 2])  # one chunk per group; 3 chunks per group
@pytest.mark.parametrize("l,chunk,g", [(100, 16, 1), (161, 16, 2), (48, 16, 2)])
def test_ssd_scan_in_groups_of_chunks_matches_the_recurrence(monkeypatch, group_elems, l, chunk, g):
    """Groups of chunks carry the state from group to group; inside one, from chunk to chunk."""
    monkeypatch.setattr(ssd_ref, "_GROUP_ELEMS", group_elems)
    b, h, p, n = 2, 4, 3, 5
    assert ssd_ref._group_size(b, h, chunk, -(-l // chunk)) == (1 if group_elems == 1 else 3)
    torch.manual_seed(l)
    args = [torch.randn(b, l, h, p), torch.nn.functional.softplus(torch.randn(b, l, h) - 1), -torch.rand(h) * 2 - 0.1,
            torch.randn(b, l, g, n), torch.randn(b, l, g, n), torch.randn(h), torch.randn(b, h, p, n)]
    args = [a.double().requires_grad_() for a in args]
    y, s = ssd_ref.ssd_scan_torch(*args[:5], chunk, D=args[5], initial_state=args[6])
    y_ref, s_ref = ssd_scan_naive(*args)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)
    gy, gs = torch.randn_like(y), torch.randn_like(s)
    grads = torch.autograd.grad((y * gy).sum() + (s * gs).sum(), args)
    grads_ref = torch.autograd.grad((y_ref * gy).sum() + (s_ref * gs).sum(), args)
    for name, a, r in zip(("x", "dt", "A", "B", "C", "D", "h0"), grads, grads_ref):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"grad {name}: {m}")
