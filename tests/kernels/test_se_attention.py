"""SE-Attn's torch op (kernels/se_attention) against references written here: a dense (L x L) allowed mask built from
the selection, a brute-force per-head top-k of the paper's relevance, dense full-attention probabilities for the
oracle, and set intersections for the recall; and against the loop-by-loop naive.py. float64 on CPU."""
import math

import pytest
import torch
from helpers import assert_close_with_grads

from hybridlm.kernels.se_attention import (
    SCORERS,
    attend_selected,
    block_attention_mass,
    block_recall,
    se_attention_naive,
    se_attention_torch,
    select_blocks,
)

F64 = torch.float64


def qkv(b, h, hkv, L, d, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, n, L, d, generator=g, dtype=F64).requires_grad_(requires_grad)
                 for n in (h, hkv, hkv))


def dense_reference(q, k, v, sel, M, S, scale=None):
    """Full (L x L) allowed mask: key s is visible to query t iff s is in t's chunk and s <= t, or s lies in a block
    selected for (b, head, chunk of t); then one masked softmax over all L keys."""
    b, h, L, d = q.shape
    g = h // k.shape[1]
    t = torch.arange(L)
    own = ((t[:, None] // M) == (t[None, :] // M)) & (t[None, :] <= t[:, None])  # (L, L)
    row_sel = sel.expand(b, h, -1, -1)[:, :, t // M]  # (b, h, L, top_k): the selection of each query's chunk
    retrieved = (((t // S)[None, None, None, :, None] == row_sel[:, :, :, None, :])
                 & (row_sel >= 0)[:, :, :, None, :]).any(-1)  # (b, h, L, L)
    allowed = own | retrieved
    kx, vx = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    logits = q @ kx.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(d))
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1) @ vx


CASES = [  # b, h, hkv, L, d, M, S, top_k
    (2, 4, 2, 37, 8, 8, 4, 2),  # GQA; L a multiple of neither M nor S; first chunks have < top_k eligible blocks
    (1, 2, 2, 40, 6, 10, 3, 3),  # S does not divide M: a block straddling a chunk start is never a candidate
    (1, 3, 1, 29, 4, 12, 4, 8),  # one kv head for three query heads; top_k above every chunk's eligible count
    (2, 2, 1, 5, 4, 2, 8, 2),  # L < S: no complete block, plain chunk-local causal attention
    (1, 2, 2, 24, 4, 24, 4, 2),  # one chunk: full causal attention, nothing to retrieve
]


@pytest.mark.parametrize("direct", [True, False], ids=["flash-ops", "sdpa"])  # sdpa: older torch, other devices
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("b,h,hkv,L,d,M,S,top_k", CASES)
def test_output_and_gradients_match_dense_mask(monkeypatch, b, h, hkv, L, d, M, S, top_k, shared, direct):
    import hybridlm.kernels.window_attention.torch_ref as win
    monkeypatch.setattr(win, "_DIRECT", direct)
    q, k, v = qkv(b, h, hkv, L, d, seed=L * 31 + M, requires_grad=True)
    out, sel = se_attention_torch(q, k, v, chunk_size=M, block_size=S, top_k=top_k, shared=shared,
                                  return_selection=True)
    assert sel.shape == (b, 1 if shared else h, -(-L // M), top_k)
    assert not sel.requires_grad
    ref = dense_reference(q, k, v, sel, M, S)
    assert_close_with_grads(out, ref, (q, k, v), rtol=1e-10, atol=1e-10)  # the selection is a constant here


@pytest.mark.parametrize("b,h,hkv,L,d,M,S,top_k", [
    (2, 4, 2, 100, 8, 16, 4, 3),  # GQA; S divides L (blocks gathered whole); ragged last chunk
    (1, 2, 1, 61, 6, 8, 5, 4),  # S does not divide L (keys gathered one by one)
])
def test_groups_of_one_chunk_match_dense_mask(monkeypatch, b, h, hkv, L, d, M, S, top_k):
    """The CPU path's flash calls one chunk at a time (causal own chunk and retrieved blocks merged through their
    logsumexps), with empty slots, against the dense mask."""
    import hybridlm.kernels.window_attention.torch_ref as win
    monkeypatch.setattr(win, "_GROUP_ELEMS", 1)
    q, k, v = qkv(b, h, hkv, L, d, seed=L, requires_grad=True)
    sel = select_blocks(q, k, v, chunk_size=M, block_size=S, top_k=top_k)
    sel = sel.masked_fill(torch.rand(sel.shape, generator=torch.Generator().manual_seed(0)) < 0.3, -1)
    assert (sel >= 0).any() and (sel < 0).any()
    out = attend_selected(q, k, v, sel, chunk_size=M, block_size=S, scale=0.4)
    ref = dense_reference(q, k, v, sel, M, S, scale=0.4)
    assert_close_with_grads(out, ref, (q, k, v), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("scorer", sorted(SCORERS))
def test_matches_naive_loops(scorer, shared):
    q, k, v = qkv(2, 4, 2, 21, 4, seed=7)
    kw = dict(chunk_size=6, block_size=4, top_k=2, scorer=scorer, shared=shared)
    out, sel = se_attention_torch(q, k, v, return_selection=True, **kw)
    out_ref, sel_ref = se_attention_naive(q, k, v, **kw)
    torch.testing.assert_close(sel, sel_ref, rtol=0, atol=0)  # same blocks, same order (no ties in random data)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)


def paper_relevance_brute_force(q, k, v, M, S):
    """R[b, h, i, j] = sum over chunk i's queries of q . mean(softmax(Q_j K_j^T / sqrt(d)) V_j), every block j."""
    b, h, L, d = q.shape
    g = h // k.shape[1]
    T, U = -(-L // M), L // S
    R = torch.zeros(b, h, T, U, dtype=F64)
    for j in range(U):
        blk = slice(j * S, (j + 1) * S)
        kx, vx = k[:, :, blk].repeat_interleave(g, 1), v[:, :, blk].repeat_interleave(g, 1)
        c = (torch.softmax(q[:, :, blk] @ kx.transpose(-1, -2) / math.sqrt(d), -1) @ vx).mean(2)  # (b, h, d)
        for i in range(T):
            R[:, :, i, j] = (q[:, :, i * M: (i + 1) * M] @ c[..., None]).sum((2, 3))
    return R


@pytest.mark.parametrize("b,h,hkv,L,d,M,S,top_k", CASES[:3])
def test_paper_selection_is_the_brute_force_top_k(b, h, hkv, L, d, M, S, top_k):
    q, k, v = qkv(b, h, hkv, L, d, seed=3 * L)
    R = paper_relevance_brute_force(q, k, v, M, S)
    T, U = R.shape[2:]
    for shared in (False, True):
        sel = select_blocks(q, k, v, chunk_size=M, block_size=S, top_k=top_k, shared=shared)
        rows = R.sum(1, keepdim=True) if shared else R
        for bi in range(b):
            for hi in range(rows.shape[1]):
                for i in range(T):
                    eligible = [j for j in range(U) if (j + 1) * S <= i * M]
                    best = sorted(eligible, key=lambda j: -float(rows[bi, hi, i, j]))[:top_k]
                    got = [j for j in sel[bi, hi, i].tolist() if j >= 0]
                    assert sorted(got) == sorted(best), (shared, bi, hi, i)


def test_shared_selection_serves_every_head():
    """Per head, heads choose different blocks; shared, one row serves all heads (its blocks are checked against
    the brute force above); with one head both give the same output."""
    q, k, v = qkv(1, 4, 2, 48, 8, seed=5)
    kw = dict(chunk_size=16, block_size=4, top_k=2)
    per_head = select_blocks(q, k, v, **kw)
    assert not all(torch.equal(per_head[:, 0], per_head[:, i]) for i in range(1, 4))
    assert select_blocks(q, k, v, shared=True, **kw).shape == (1, 1, 3, 2)
    q1, k1, v1 = q[:, :1], k[:, :1], v[:, :1]
    torch.testing.assert_close(se_attention_torch(q1, k1, v1, shared=True, **kw), se_attention_torch(q1, k1, v1, **kw))


def test_top_k_zero_is_chunk_local_causal_attention():
    q, k, v = qkv(1, 2, 1, 30, 8, seed=11)
    out = se_attention_torch(q, k, v, chunk_size=8, block_size=4, top_k=0)
    kx, vx = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    for a in range(0, 30, 8):
        sl = slice(a, a + 8)
        ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, sl], kx[:, :, sl], vx[:, :, sl], is_causal=True)
        torch.testing.assert_close(out[:, :, sl], ref)


def test_gradcheck_attention_given_a_selection():
    q, k, v = qkv(1, 2, 1, 11, 3, seed=2, requires_grad=True)
    sel = torch.tensor([[[[-1, -1], [0, -1], [2, 0]], [[-1, -1], [1, 0], [3, -1]]]])  # (1, 2, T=3, 2); M=4, S=2
    assert torch.autograd.gradcheck(
        lambda q, k, v: attend_selected(q, k, v, sel, chunk_size=4, block_size=2, scale=0.7), (q, k, v))


@pytest.mark.parametrize("key_tile", [None, 4, 9])
def test_block_attention_mass_is_full_attention_probability_per_block(key_tile):
    b, h, hkv, L, d, M, S = 2, 4, 2, 27, 8, 7, 4
    q, k, _ = qkv(b, h, hkv, L, d, seed=13)
    mass = block_attention_mass(q, k, chunk_size=M, block_size=S, key_tile=key_tile)
    kx = k.repeat_interleave(h // hkv, 1)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    p = torch.softmax((q @ kx.transpose(-1, -2) / math.sqrt(d)).masked_fill(~causal, float("-inf")), -1)
    T, U = -(-L // M), -(-L // S)
    ref = torch.zeros(b, h, T, U, dtype=F64)
    for t in range(L):
        for s in range(t + 1):
            ref[:, :, t // M, s // S] += p[:, :, t, s]
    torch.testing.assert_close(mass, ref, rtol=1e-10, atol=1e-10)
    queries = torch.tensor([min(M, L - i * M) for i in range(T)], dtype=F64)
    torch.testing.assert_close(mass.sum(-1), queries.expand(b, h, T))  # every query's mass sums to 1
    per_query = block_attention_mass(q, k, chunk_size=1, block_size=S, key_tile=key_tile)
    torch.testing.assert_close(per_query.sum(-1), torch.ones(b, h, L, dtype=F64))


def test_block_recall_against_set_intersections():
    b, h, hkv, L, d, M, S, top_k = 2, 4, 2, 64, 8, 16, 4, 5  # chunk 1 has only 4 eligible blocks
    q, k, v = qkv(b, h, hkv, L, d, seed=17)
    res = block_recall(q, k, v, chunk_size=M, block_size=S, top_k=top_k, scorers=("paper", "moba", "oracle"))
    torch.testing.assert_close(res.recall["oracle"], torch.ones(h, dtype=F64))
    mass = block_attention_mass(q, k, chunk_size=M, block_size=S)
    T = L // M
    for name in ("paper", "moba"):
        sel = select_blocks(q, k, v, chunk_size=M, block_size=S, top_k=top_k, scorer=name)
        for hi in range(h):
            recalls, captured, past = [], [], []
            for bi in range(b):
                for i in range(1, T):  # chunk 0 has no eligible block
                    n = (i * M) // S
                    oracle = set(sorted(range(n), key=lambda j: -float(mass[bi, hi, i, j]))[:top_k])
                    chosen = set(sel[bi, hi, i].tolist()) - {-1}
                    recalls.append(len(oracle & chosen) / min(top_k, n))
                    captured.append(float(sum(mass[bi, hi, i, j] for j in chosen)) / M)
                    past.append(float(mass[bi, hi, i, :n].sum()) / M)
            assert res.recall[name][hi].item() == pytest.approx(sum(recalls) / len(recalls), abs=1e-12)
            assert res.captured_mass[name][hi].item() == pytest.approx(sum(captured) / len(captured), abs=1e-12)
            assert res.past_mass[hi].item() == pytest.approx(sum(past) / len(past), abs=1e-12)
        assert (res.captured_mass[name] <= res.captured_mass["oracle"] + 1e-12).all()  # top mass is the most mass
    assert (res.captured_mass["oracle"] <= res.past_mass + 1e-12).all()


def test_token_level_scorers_keep_a_needle():
    """One key of block 0 is a needle that only one query of the last chunk matches; the other keys and queries are
    small noise. Scorers that look at single queries (moba: max over queries; quest: per-channel bounds; nsa:
    per-query softmax; oracle: exact mass) retrieve block 0 for that chunk with top_k = 1."""
    L, d, M, S = 64, 8, 16, 8
    q, k, v = (0.1 * x for x in qkv(1, 1, 1, L, d, seed=19))
    k[0, 0, 5, 0] = 10.0
    q[0, 0, 60, 0] = 10.0
    for scorer in ("moba", "quest", "nsa", "oracle"):
        sel = select_blocks(q, k, v, chunk_size=M, block_size=S, top_k=1, scorer=scorer)
        assert sel[0, 0, 3, 0].item() == 0, scorer


@pytest.mark.parametrize("kw,needle", [
    (dict(chunk_size=0), "chunk_size"),
    (dict(block_size=-1), "block_size"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=1.5), "top_k"),
    (dict(scorer="mean_key"), "scorer"),
])
def test_bad_arguments_are_refused_by_name(kw, needle):
    q, k, v = qkv(1, 2, 1, 12, 4, seed=0)
    args = dict(chunk_size=4, block_size=2, top_k=2) | kw
    with pytest.raises(ValueError, match=needle):
        se_attention_torch(q, k, v, **args)


def test_query_heads_must_be_a_multiple_of_kv_heads():
    q, _, _ = qkv(1, 3, 1, 12, 4, seed=0)
    _, k, v = qkv(1, 2, 2, 12, 4, seed=0)
    with pytest.raises(ValueError, match="multiple of the kv heads"):
        se_attention_torch(q, k, v, chunk_size=4, block_size=2, top_k=1)
