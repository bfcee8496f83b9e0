"""docs/design.md §2: running a sequence in pieces with the state passed along equals one pass, for every layer kind;
and each mixer equals a naive per-token computation written here from its raw parameters (the Mamba-2 scan by the
token-by-token recurrence shipped in kernels/ssd/naive.py)."""
import dataclasses
import math
import random

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model

from hybridlm.kernels.ssd.naive import ssd_scan_naive
from hybridlm.models import AttentionConfig, HybridLM, ModelConfig
from hybridlm.models.state import map_state

VOCAB = 50  # tiny_model's vocab_size


def make_model(pattern="MAM", attn=None, **kw):
    """The shared tiny model (d_model 32, d_state 8, headdim 8, chunks of 8, perturbed so the state matters) in
    float64: the checks below hold to 1e-9. kw: d_intermediate, seed, ngroups."""
    return tiny_model(pattern, attn=attn, dtype=torch.float64, **kw)


ATTN_VARIANTS = {
    "full": AttentionConfig(kind="full", num_heads=4),
    "swa": AttentionConfig(kind="swa", num_heads=4, window=5),
    "swa_gqa_rope_conv": AttentionConfig(kind="swa", num_heads=4, num_heads_kv=2, window=6, rotary_emb_dim=4,
                                         d_conv=3, qkv_proj_bias=True, out_proj_bias=True),
    "full_rope": AttentionConfig(kind="full", num_heads=2, rotary_emb_dim=16),
    # the windowed SE-Attn streams exactly (pieces of any length); the paper's se_attn only on chunk boundaries
    "se_attn_window": AttentionConfig(kind="se_attn_window", num_heads=4, num_heads_kv=2, window=6, block_size=4,
                                      query_chunk=4, top_k=2, scorer="mean_dot", d_conv=3),
}


def run_pieces(model, ids, cuts):
    state, outs = None, []
    bounds = [0, *cuts, ids.shape[1]]
    for s, e in zip(bounds[:-1], bounds[1:]):
        logits, state = model(ids[:, s:e], state)
        outs.append(logits)
    return torch.cat(outs, dim=1), state


def assert_states_close(a, b):
    for sa, sb in zip(a, b):
        assert sa.keys() == sb.keys()
        for k in sa:
            if torch.is_tensor(sa[k]):
                torch.testing.assert_close(sa[k], sb[k], rtol=1e-9, atol=1e-9)
            else:
                assert sa[k] == sb[k]


@pytest.mark.parametrize("variant", list(ATTN_VARIANTS))
@pytest.mark.parametrize("seed", [0, 1])
def test_pieces_equal_one_pass(variant, seed):
    model = make_model("MAMA", ATTN_VARIANTS[variant], d_intermediate=24, seed=seed)
    rng = random.Random(seed)
    L = 45
    ids = torch.randint(0, VOCAB, (2, L))
    full_logits, full_state = model(ids)
    # random cuts, plus pieces of 1 and 2 tokens (shorter than d_conv-1) and cuts off chunk boundaries
    cuts = sorted(set(rng.sample(range(1, L), 5)) | {3, 4, 6, 13})
    logits, state = run_pieces(model, ids, cuts)
    torch.testing.assert_close(logits, full_logits, rtol=1e-9, atol=1e-9)
    assert_states_close(state, full_state)


def test_gradients_equal_when_state_not_detached():
    model = make_model("MAM", ATTN_VARIANTS["swa_gqa_rope_conv"], d_intermediate=16)
    ids = torch.randint(0, VOCAB, (2, 30))
    target = torch.randint(0, VOCAB, (2, 30))

    def grads(cuts):
        model.zero_grad()
        logits, _ = run_pieces(model, ids, cuts)
        F.cross_entropy(logits.flatten(0, 1), target.flatten()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    g_full, g_pieces = grads([]), grads([7, 9, 20])
    for n in g_full:
        torch.testing.assert_close(g_pieces[n], g_full[n], rtol=1e-8, atol=1e-10, msg=n)


@pytest.mark.parametrize("variant", ["full", "swa_gqa_rope_conv", "se_attn_window"])
def test_token_by_token_generation_equals_one_pass(variant):
    model = make_model("MAM", ATTN_VARIANTS[variant], d_intermediate=16)
    ids = torch.randint(0, VOCAB, (1, 6))
    logits, state = model(ids)
    # greedy continuation, one token at a time from the state
    seq = ids
    next_logits = logits[:, -1]
    for _ in range(12):
        tok = next_logits.argmax(-1, keepdim=True)
        seq = torch.cat([seq, tok], dim=1)
        step_logits, state = model(tok, state)
        next_logits = step_logits[:, -1]
    full_logits, full_state = model(seq)
    torch.testing.assert_close(next_logits, full_logits[:, -1], rtol=1e-9, atol=1e-9)
    assert_states_close(state, full_state)


SE_ATTN = AttentionConfig(kind="se_attn", num_heads=4, num_heads_kv=2, chunk_sizes=[4, 8], eval_chunk_size=8,
                          block_size=4, top_k=2, rotary_emb_dim=4, d_conv=3)


@pytest.mark.parametrize("training", [False, True])
def test_se_attn_pieces_on_chunk_boundaries_equal_one_pass(training):
    """The paper's SE-Attn scores a chunk with all its queries: pieces equal one pass when every cut is a multiple of
    the chunk size (eval: eval_chunk_size; training: a single chunk size, or the draws would differ per call);
    tests/models/test_se_attn.py checks what other cuts give."""
    attn = dataclasses.replace(SE_ATTN, chunk_sizes=[8]) if training else SE_ATTN
    model = make_model("MAMA", attn, d_intermediate=24).train(training)
    ids = torch.randint(0, VOCAB, (2, 45))
    full_logits, full_state = model(ids)
    logits, state = run_pieces(model, ids, [8, 16, 40])
    torch.testing.assert_close(logits, full_logits, rtol=1e-9, atol=1e-9)
    assert_states_close(state, full_state)


def test_nonzero_initial_ssm_state_changes_output_and_only_ssm_key_needed():
    model = make_model("MM")
    ids = torch.randint(0, VOCAB, (2, 10))
    base, _ = model(ids)
    nh, p, n = model.backbone.layers[0].mixer.nheads, 8, 8
    state = [{"ssm": torch.randn(2, nh, p, n, dtype=torch.double)}, None]
    out, _ = model(ids, state)
    assert (out - base).abs().max() > 1e-3


# ---- mixers against naive per-token references written from their raw parameters ----

def naive_mamba2(m, u):
    """mamba_ssm Mamba2 semantics, one token at a time. The conv loop stays here: the shipped causal_conv1d_naive
    computes in float32."""
    b, L, _ = u.shape
    di, ng, n, nh, hp = m.d_inner, m.ngroups, m.d_state, m.nheads, m.headdim
    zxbcdt = u @ m.in_proj.weight.T
    z, xBC, dt = zxbcdt.split([di, m.conv_dim, nh], dim=-1)
    k = m.conv1d.weight.shape[-1]
    xp = torch.cat([torch.zeros(b, k - 1, m.conv_dim, dtype=u.dtype), xBC], 1)
    conv = torch.stack([(xp[:, t:t + k] * m.conv1d.weight[:, 0].T).sum(1) + m.conv1d.bias for t in range(L)], 1)
    conv = conv * torch.sigmoid(conv)
    x, Bm, Cm = conv.split([di, ng * n, ng * n], dim=-1)
    dt = F.softplus(dt + m.dt_bias)
    A = -torch.exp(m.A_log)
    y, _ = ssd_scan_naive(x.view(b, L, nh, hp), dt, A, Bm.view(b, L, ng, n), Cm.view(b, L, ng, n), m.D)
    y = y.reshape(b, L, di) * F.silu(z)
    gs = di // ng
    yg = y.view(b, L, ng, gs)
    y = (yg / torch.sqrt(yg.pow(2).mean(-1, keepdim=True) + m.norm.eps)).reshape(b, L, di) * m.norm.weight
    return y @ m.out_proj.weight.T


@pytest.mark.parametrize("ngroups", [1, 2])
def test_mamba2_mixer_matches_naive(ngroups):
    model = make_model("M", ngroups=ngroups)
    m = model.backbone.layers[0].mixer
    u = torch.randn(2, 19, 32, dtype=torch.double)
    out, _ = m(u)
    torch.testing.assert_close(out, naive_mamba2(m, u), rtol=1e-9, atol=1e-9)


def naive_attention(a, u, window):
    b, L, _ = u.shape
    hd, H, Hkv = a.head_dim, a.num_heads, a.num_heads_kv
    qkv = u @ a.in_proj.weight.T
    q, k, v = qkv.split([H * hd, Hkv * hd, Hkv * hd], -1)
    q, k, v = q.view(b, L, H, hd), k.view(b, L, Hkv, hd), v.view(b, L, Hkv, hd)
    out = torch.zeros(b, L, H, hd, dtype=u.dtype)
    for t in range(L):
        for h in range(H):
            kv = h // (H // Hkv)
            lo = 0 if window is None else max(0, t - window + 1)
            s = torch.stack([(q[:, t, h] * k[:, j, kv]).sum(-1) / math.sqrt(hd) for j in range(lo, t + 1)], -1)
            p = torch.softmax(s, -1)
            out[:, t, h] = sum(p[:, i:i + 1] * v[:, lo + i, kv] for i in range(t + 1 - lo))
    return out.reshape(b, L, H * hd) @ a.out_proj.weight.T


@pytest.mark.parametrize("kind,window,kv", [("full", None, 4), ("swa", 4, 2)])
def test_attention_mixer_matches_naive(kind, window, kv):
    model = make_model("A", AttentionConfig(kind=kind, num_heads=4, num_heads_kv=kv, window=window or 1))
    a = model.backbone.layers[0].mixer
    u = torch.randn(2, 11, 32, dtype=torch.double)
    out, _ = a(u)
    torch.testing.assert_close(out, naive_attention(a, u, window), rtol=1e-9, atol=1e-9)


def test_long_sliding_window_uses_blocked_path_and_matches_dense(monkeypatch):
    import hybridlm.kernels.window_attention.torch_ref as att
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 300, 8, dtype=torch.double) for _ in range(3))
    dense = att.window_attention_torch(q, k, v, window=37)
    monkeypatch.setattr(att, "_MAX_SCORES", 64 * 64)  # force many query blocks
    torch.testing.assert_close(att.window_attention_torch(q, k, v, window=37), dense)
    torch.testing.assert_close(att.window_attention_torch(q, k, v, window=None),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_vocab_padding_and_tied_head():
    cfg = ModelConfig(d_model=32, layer_pattern="M", vocab_size=50, pad_vocab_size_multiple=16)
    model = HybridLM(cfg)
    assert model.backbone.embedding.weight.shape[0] == 64
    assert model.lm_head.weight is model.backbone.embedding.weight
    logits, _ = model(torch.randint(0, 50, (1, 5)))
    assert logits.shape == (1, 5, 50)


def test_map_state_keeps_positions():
    model = make_model("MA")
    _, state = model(torch.randint(0, VOCAB, (1, 5)))
    moved = map_state(state, lambda t: t.float())
    assert moved[1]["pos"] == 5 and moved[0]["ssm"].dtype == torch.float32


# ---- the state constructor: zero_state and the layer queries ----

ZERO_STATE_VARIANTS = {
    **ATTN_VARIANTS,
    "s2": AttentionConfig(kind="s2", num_heads=4, group_ratio=0.25),
    "se_attn": SE_ATTN,
    "se_attn_no_retrieval": AttentionConfig(kind="se_attn", num_heads=4, chunk_sizes=[4, 8], block_size=4, top_k=0),
    "se_attn_window_no_retrieval": AttentionConfig(kind="se_attn_window", num_heads=4, window=6, block_size=4,
                                                   query_chunk=4, top_k=0, scorer="mean_dot"),
}


@pytest.mark.parametrize("variant", list(ZERO_STATE_VARIANTS))
@pytest.mark.parametrize("training", [False, True])
def test_zero_state_runs_like_no_state(variant, training):
    """Starting from model.zero_state(b) gives the logits and final state of starting from None (se_attn draws its
    chunk size in training: both passes draw from the same seed)."""
    model = make_model("MAMA", ZERO_STATE_VARIANTS[variant], d_intermediate=16).train(training)
    ids = torch.randint(0, VOCAB, (3, 23))
    torch.manual_seed(1)
    ref_logits, ref_state = model(ids)
    torch.manual_seed(1)
    logits, state = model(ids, model.zero_state(3))
    torch.testing.assert_close(logits, ref_logits, rtol=1e-9, atol=1e-9)
    assert_states_close(state, ref_state)


@pytest.mark.parametrize("variant", ["swa_gqa_rope_conv", "s2", "se_attn", "se_attn_no_retrieval", "se_attn_window",
                                     "se_attn_window_no_retrieval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_zero_state_is_shaped_like_a_final_state(variant, dtype):
    """Every entry of the zero state has the dtype, device and shape of the entry a forward pass returns; attention
    caches are empty (length 0 along dim 2) and at position 0. Only se_attn_window's "sel" (kept while a chunk is
    unfinished, here after 23 tokens in chunks of 4) is absent."""
    model = make_model("MAM", ZERO_STATE_VARIANTS[variant]).to(dtype).eval()
    _, final = model(torch.randint(0, VOCAB, (2, 23)))
    zero = model.zero_state(2)
    assert len(zero) == len(final) == 3
    for i, (z, f) in enumerate(zip(zero, final)):
        assert z.keys() == f.keys() - {"sel"}, i
        for k, t in z.items():
            if k == "pos":
                assert t == 0
                continue
            assert (t.dtype, t.device) == (f[k].dtype, f[k].device), (i, k)
            if model.cfg.layer_pattern[i] == "M":
                assert t.shape == f[k].shape, (i, k)
                assert torch.count_nonzero(t) == 0
            elif k == "conv":
                assert t.shape == f[k].shape and torch.count_nonzero(t) == 0
            else:
                assert t.shape[2] == 0 and t.shape[:2] + t.shape[3:] == f[k].shape[:2] + f[k].shape[3:], (i, k)


@pytest.mark.parametrize("variant", ["se_attn", "se_attn_window"])
def test_zero_state_device_and_dtype_arguments(variant):
    """dtype is the activations' dtype: conv and key/value entries take it, the SSM state is at least float32."""
    model = make_model("MA", ZERO_STATE_VARIANTS[variant]).float()
    m, a = model.zero_state(1, device="cpu", dtype=torch.bfloat16)
    assert m["ssm"].dtype == torch.float32 and m["conv"].dtype == torch.bfloat16
    assert a["k"].dtype == a["conv"].dtype == a["q"].dtype == torch.bfloat16
    assert variant == "se_attn" or a["mem_sum"].dtype == torch.float32
    assert m["ssm"].shape == (1, 8, 8, 8) and m["conv"].shape == (1, 3, 64 + 2 * 8)  # nheads = 2*32/8, conv_dim
    assert a["k"].shape == (1, 2, 0, 8) and a["q"].shape == (1, 4, 0, 8)  # hkv = 2, h = 4, head_dim = 32/4
    assert all(t.device.type == "cpu" for s in (m, a) for t in s.values() if torch.is_tensor(t))


def test_layer_queries_follow_the_layer_pattern():
    model = make_model("MAAMM", ZERO_STATE_VARIANTS["se_attn"])
    mamba, attention = model.mamba_layers(), model.attention_layers()
    assert [i for i, _ in mamba] == [0, 3, 4] and [i for i, _ in attention] == [1, 2]
    for i, mixer in mamba + attention:
        assert mixer is model.backbone.layers[i].mixer
    assert type(attention[0][1]).__name__ == "SpanExpandedAttention"
    assert type(make_model("MA", ZERO_STATE_VARIANTS["se_attn_window"]).attention_layers()[0][1]).__name__ == (
        "WindowedSpanAttention")
    assert make_model("MMM").attention_layers() == [] and make_model("A").mamba_layers() == []
