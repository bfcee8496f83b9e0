"""Windowed SE-Attn (kind se_attn_window, docs/design.md §4; the op span_attention): the op against a dense mask
built with loops, selection against a brute-force top-k, the limiting cases (sliding window, full attention),
causality, and streaming."""
import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

import hybridlm.kernels.span_attention.torch_ref as span_ops
import hybridlm.kernels.window_attention.torch_ref as win_ops
from hybridlm.kernels.span_attention.selection import block_summaries, select_blocks
from hybridlm.kernels.span_attention.torch_ref import span_attention_torch
from hybridlm.kernels.window_attention.torch_ref import window_attention_torch
from hybridlm.models import AttentionConfig
from hybridlm.models.attention import Attention
from hybridlm.models.se_attention_window import WindowedSpanAttention


def rand_qkv(b=2, h=4, hkv=2, lq=23, lk=23, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, lk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, lk, d, generator=g, dtype=torch.float64)
    return q, k, v


def dense_reference(q, k, v, selected, W, M, C):
    """Softmax attention with an explicit (query, key) mask: window keys plus selected blocks' keys before it."""
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g, off = h // hkv, lk - lq
    allowed = torch.zeros(b, h, lq, lk, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for i in range(lq):
                t = i + off
                for j in range(max(0, t - W + 1), t + 1):
                    allowed[bi, hi, i, j] = True
                for s in selected[bi, hi // g, i // C].tolist():
                    if s >= 0:
                        for j in range(s * M, s * M + M):
                            if j <= t - W:
                                allowed[bi, hi, i, j] = True
    kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    logits = (q @ kr.transpose(-1, -2)) * d ** -0.5
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1) @ vr


def brute_select(q, k, W, M, C, top_k, scorer, max_blocks=None, q_prev=None):
    """Top-k with explicit loops: chunk n is scored by the C queries ending at its first query (all heads of the
    kv group), candidates end before that query's window; result ascending, -1 padded."""
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g, off = h // hkv, lk - lq
    qs = q if q_prev is None else torch.cat([q_prev, q], 2)
    p = 0 if q_prev is None else q_prev.shape[2]
    n_chunks = -(-lq // C)
    out = torch.full((b, hkv, n_chunks, top_k), -1, dtype=torch.long)

    def head_score(bi, kv, n, j, kind):
        rows = [r for r in range(p + n * C - C + 1, p + n * C + 1) if r >= 0]
        vecs = [qs[bi, hh, r] for hh in range(kv * g, kv * g + g) for r in rows]
        summary = k[bi, kv, j * M:(j + 1) * M].mean(0)
        if kind == "max":
            return max(float(vv @ summary) for vv in vecs)
        return float(torch.stack(vecs).mean(0) @ summary)

    for bi in range(b):
        for kv in range(hkv):
            for n in range(n_chunks):
                t0 = n * C + off
                lim = t0 - W + 1
                cands = [j for j in range(lk // M) if (j + 1) * M <= lim
                         and (max_blocks is None or j >= lim // M - max_blocks)]
                if scorer == "mean_dot":
                    score = {j: head_score(bi, kv, n, j, "mean") for j in cands}
                elif scorer == "max_dot":
                    score = {j: head_score(bi, kv, n, j, "max") for j in cands}
                else:  # mean_dot_shared
                    score = {j: sum(head_score(bi, kk, n, j, "mean") for kk in range(hkv)) for j in cands}
                chosen = sorted(sorted(cands, key=lambda j: -score[j])[:top_k])
                out[bi, kv, n, :len(chosen)] = torch.tensor(chosen, dtype=torch.long)
    return out


@pytest.mark.parametrize("scorer", ["mean_dot", "max_dot", "mean_dot_shared"])
@pytest.mark.parametrize("lq,lk,max_blocks,n_prev,negative", [
    (29, 29, None, 0, False), (17, 30, None, 3, False), (31, 31, 2, 0, False), (12, 40, 3, 2, False),
    (10, 40, None, 0, True),  # every <q, key> < 0 and the first chunks lack scoring queries: padding must not count
])
def test_selection_matches_brute_force(scorer, lq, lk, max_blocks, n_prev, negative):
    W, M, C, top_k = 4, 3, 4, 3
    q, k, _ = rand_qkv(lq=lq, lk=lk, seed=1)
    if negative:
        q, k = -q.abs(), k.abs()
    q_prev = torch.randn(2, 4, n_prev, 8, dtype=torch.float64) if n_prev else None
    got = select_blocks(q, block_summaries(k, M), lk, W, M, C, top_k, scorer, max_blocks, q_prev)
    want = brute_select(q, k, W, M, C, top_k, scorer, max_blocks, q_prev)
    assert torch.equal(got, want)
    assert (got >= 0).any()
    if lq == lk:
        assert (got == -1).any()  # early chunks have fewer than top_k candidates


OP_CASES = [(23, 23, 4, 3, 4, 2), (9, 26, 3, 2, 5, 3), (16, 16, 1, 4, 2, 1), (30, 30, 6, 2, 1, 4)]


@pytest.mark.parametrize("lq,lk,W,M,C,top_k", OP_CASES)
def test_op_in_groups_of_one_chunk_matches_dense_mask(monkeypatch, lq, lk, W, M, C, top_k):
    """The general path (devices other than CPU, row-masked selections; forced here on CPU): past _MAX_SCORES
    logits it gathers keys one group of chunks at a time and recomputes each group in backward (bounded memory at
    long lengths): the same outputs and gradients, with and without grad."""
    monkeypatch.setattr(win_ops, "direct_inputs", lambda q, k, v: None)
    monkeypatch.setattr(span_ops, "_MAX_SCORES", 1)  # one chunk per group
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **kw: calls.append(1) or checkpoint(*a, **kw))
    test_op_matches_dense_mask_with_gradients(lq, lk, W, M, C, top_k)
    assert len(calls) == -(-lq // C)  # every group recomputed in backward
    q, k, v = rand_qkv(lq=lq, lk=lk, seed=2)
    selected = select_blocks(q, block_summaries(k, M), lk, W, M, C, top_k)
    with torch.no_grad():
        torch.testing.assert_close(span_attention_torch(q, k, v, selected, W, M, C),
                                   dense_reference(q, k, v, selected, W, M, C))
    assert len(calls) == -(-lq // C)  # nothing to recompute without gradients


@pytest.mark.parametrize("lq,lk,W,M,C,top_k", OP_CASES)
def test_direct_path_in_calls_of_one_block_matches_dense_mask(monkeypatch, lq, lk, W, M, C, top_k):
    """The CPU path (flash calls merged by logsumexp) with one key tile / retrieved block per call."""
    monkeypatch.setattr(win_ops, "_GROUP_ELEMS", 1)
    test_op_matches_dense_mask_with_gradients(lq, lk, W, M, C, top_k)


@pytest.mark.parametrize("lq,lk,W,M,C,top_k", OP_CASES)
def test_op_matches_dense_mask_with_gradients(lq, lk, W, M, C, top_k):
    q, k, v = rand_qkv(lq=lq, lk=lk, seed=2)
    selected = select_blocks(q, block_summaries(k, M), lk, W, M, C, top_k)
    assert (selected >= 0).any()
    tensors = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = [t.clone().requires_grad_(True) for t in (q, k, v)]
    o = span_attention_torch(*tensors, selected, W, M, C)
    o_ref = dense_reference(*ref, selected, W, M, C)
    torch.testing.assert_close(o, o_ref)
    w = torch.randn_like(o)
    (o * w).sum().backward()
    (o_ref * w).sum().backward()
    for a, r in zip(tensors, ref):
        torch.testing.assert_close(a.grad, r.grad)
    # Gradient reaches the keys of a retrieved block that no window covers.
    s = int(selected[0, 0, -1, 0])
    assert s * M + M - 1 < lk - lq + (lq - 1) // C * C - W + 1  # block wholly before the last chunk's window
    assert tensors[1].grad[0, 0, s * M: s * M + M].abs().sum() > 0


@pytest.mark.parametrize("lq,lk,W,M,C", [(23, 23, 4, 3, 4), (9, 26, 3, 2, 5), (30, 30, 6, 2, 1)])
def test_op_semantics_hold_for_any_selection(lq, lk, W, M, C):
    # The documented contract (for kernels): blocks may overlap the window or the future; only their keys
    # before the window count, each key once.
    q, k, v = rand_qkv(lq=lq, lk=lk, seed=5)
    n, nb, top_k = -(-lq // C), lk // M, 3
    g = torch.Generator().manual_seed(0)
    selected = torch.stack([torch.randperm(nb, generator=g)[:top_k] for _ in range(2 * 2 * n)]).view(2, 2, n, top_k)
    selected[torch.rand(selected.shape, generator=g) < 0.3] = -1
    torch.testing.assert_close(span_attention_torch(q, k, v, selected, W, M, C),
                               dense_reference(q, k, v, selected, W, M, C))


@pytest.mark.parametrize("lq,lk,W,C", [(23, 23, 5, 4), (7, 19, 3, 4), (20, 20, 1, 3), (12, 12, 30, 5)])
def test_no_retrieval_equals_sliding_window(lq, lk, W, C):
    q, k, v = rand_qkv(lq=lq, lk=lk, seed=3)
    n = -(-lq // C)
    want = window_attention_torch(q, k, v, window=W)
    torch.testing.assert_close(span_attention_torch(q, k, v, torch.empty(2, 2, n, 0, dtype=torch.long), W, 3, C), want)
    torch.testing.assert_close(span_attention_torch(q, k, v, torch.full((2, 2, n, 3), -1), W, 3, C), want)


def test_window_plus_retrieval_covering_everything_equals_full_attention():
    # With C = M = 1 nothing falls between the retrieved blocks and the window, and top_k covers every block.
    L, W = 26, 4
    q, k, v = rand_qkv(lq=L, lk=L, seed=4)
    selected = select_blocks(q, block_summaries(k, 1), L, W, 1, 1, top_k=L - W + 1)
    o = span_attention_torch(q, k, v, selected, W, 1, 1)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(o, want)


def se_cfg(**kw):
    base = dict(kind="se_attn_window", num_heads=4, num_heads_kv=2, window=5, block_size=3, top_k=2, query_chunk=4,
                rotary_emb_dim=2, scorer="mean_dot")
    base.update(kw)
    return AttentionConfig(**base)


def make_mixer(cfg, seed=0):
    torch.manual_seed(seed)
    return WindowedSpanAttention(16, cfg).double()


def test_mixer_limits_equal_swa_and_full():
    u = torch.randn(2, 37, 16, dtype=torch.float64)
    se = make_mixer(se_cfg(top_k=0))
    swa = Attention(16, se_cfg(kind="swa")).double()
    swa.load_state_dict(se.state_dict())
    torch.testing.assert_close(se(u)[0], swa(u)[0])
    se_full = make_mixer(se_cfg(window=3, block_size=1, query_chunk=1, top_k=40))
    full = Attention(16, se_cfg(kind="full")).double()
    full.load_state_dict(se_full.state_dict())
    torch.testing.assert_close(se_full(u)[0], full(u)[0])


@pytest.mark.parametrize("scorer", ["mean_dot", "max_dot", "mean_dot_shared"])
def test_mixer_is_causal(scorer):
    m = make_mixer(se_cfg(scorer=scorer))
    u = torch.randn(1, 40, 16, dtype=torch.float64)
    y = m(u)[0]
    swa = Attention(16, se_cfg(kind="swa")).double()
    swa.load_state_dict(m.state_dict())
    assert (y - swa(u)[0]).abs().max() > 1e-3  # retrieval changes the output, so the check below means something
    for i in (0, 13, 17, 22, 30, 38):
        u2 = u.clone()
        u2[:, i + 1:] = torch.randn_like(u2[:, i + 1:])
        y2 = m(u2)[0]
        torch.testing.assert_close(y2[:, : i + 1], y[:, : i + 1], rtol=0, atol=0)
        if i + 1 < u.shape[1]:
            assert (y2[:, i + 1:] - y[:, i + 1:]).abs().max() > 1e-6


def run_pieces(m, u, sizes):
    state, ys, states = None, [], []
    i = 0
    for n in sizes:
        y, state = m(u[:, i:i + n], state)
        ys.append(y)
        states.append(state)
        i += n
    assert i == u.shape[1]
    return torch.cat(ys, 1), state, states


def assert_states_equal(a, b):
    assert set(a) == set(b)
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].shape == b[key].shape, key
            torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=1e-12)
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("scorer,max_blocks", [("mean_dot", None), ("max_dot", 2), ("mean_dot_shared", 1)])
@pytest.mark.parametrize("sizes", [[1, 2, 5, 3, 7, 1, 1, 13, 4, 13], [1] * 50, [50]])
def test_streaming_equals_one_pass(scorer, max_blocks, sizes):
    cfg = se_cfg(scorer=scorer, max_memory_blocks=max_blocks, d_conv=3)
    m = make_mixer(cfg)
    u = torch.randn(2, 50, 16, dtype=torch.float64)
    y, s = m(u)
    ys, ss, states = run_pieces(m, u, sizes)
    torch.testing.assert_close(ys, y, rtol=1e-12, atol=1e-12)
    assert_states_equal(ss, s)
    W, M, C = cfg.window, cfg.block_size, cfg.query_chunk
    for st in states:
        assert st["k"].shape[2] == min(st["pos"], W - 1)
        if max_blocks is not None:
            assert st["mem_k"].shape[2] <= max_blocks * M + M + C - 2
        else:
            assert st["mem_k"].shape[2] + st["k"].shape[2] == st["pos"]  # unbounded bank keeps everything


def test_bounded_bank_changes_what_is_retrieved():
    u = torch.randn(2, 60, 16, dtype=torch.float64)
    unbounded = make_mixer(se_cfg(top_k=1, scorer="max_dot"))
    bounded = make_mixer(se_cfg(top_k=1, scorer="max_dot", max_memory_blocks=1))
    assert (unbounded(u)[0] - bounded(u)[0]).abs().max() > 1e-6


def test_bad_scorer_is_rejected():
    with pytest.raises(ValueError, match="scorer"):
        WindowedSpanAttention(16, se_cfg(scorer="nope"))


@pytest.mark.parametrize("kind", ["se_attn_window", "s2"])
def test_hybrid_lm_forward_backward_and_streaming(kind, tiny_model):
    model = tiny_model("MAM", d_model=16, vocab_size=40, d_intermediate=24, attn=se_cfg(kind=kind, group_ratio=0.25),
                       perturb=0)
    ids = torch.randint(0, 40, (2, 32))
    logits, _ = model(ids)
    logits.logsumexp(-1).mean().backward()
    attn = model.backbone.layers[1].mixer
    assert type(attn).__name__ == {"se_attn_window": "WindowedSpanAttention", "s2": "S2Attention"}[kind]
    assert attn.in_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()  # s2 streams with its inference attention
    with torch.no_grad():
        full, _ = model(ids)
        state, parts = None, []
        for a, b in [(0, 7), (7, 8), (8, 21), (21, 32)]:
            out, state = model(ids[:, a:b], state)
            parts.append(out)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)


def test_streaming_gradients_equal_one_pass():
    m = make_mixer(se_cfg(max_memory_blocks=2))
    u = torch.randn(2, 33, 16, dtype=torch.float64)
    w = torch.randn(2, 33, 16, dtype=torch.float64)
    (m(u)[0] * w).sum().backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    ys, _, _ = run_pieces(m, u, [6, 1, 10, 16])  # state passed on without detaching
    (ys * w).sum().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-10, atol=1e-10)
