"""The paper's SE-Attn layer (kind se_attn, models/se_attention.py; docs/design.md §4): its projections and RoPE
feed the op, checked against the loop-by-loop naive op on projections computed here; the chunk size drawn per call
in training (seeded, from the set) and fixed in eval; the streaming contract it claims (pieces on chunk
boundaries equal one pass; any piece equals one pass over what was seen so far; token by token does not equal one
pass); a few training steps of a model with se_attn and with se_attn_window; bad configs refused by key; and the
op through the backend registry."""
import math

import pytest
import torch
import torch.nn.functional as F

from hybridlm import ops
from hybridlm.convert import load_pretrained
from hybridlm.kernels.se_attention import se_attention_naive, se_attention_torch
from hybridlm.models import AttentionConfig, ModelConfig
from hybridlm.models.se_attention import SpanExpandedAttention
from hybridlm.ops.config import BackendConfig

D_MODEL = 16


def se_cfg(**kw):
    base = dict(kind="se_attn", num_heads=4, num_heads_kv=2, chunk_sizes=[4, 8, 12], block_size=4, top_k=2,
                rotary_emb_dim=2)
    base.update(kw)
    return AttentionConfig(**base)


def make_layer(cfg, seed=0):
    torch.manual_seed(seed)
    return SpanExpandedAttention(D_MODEL, cfg).double()


def rope(x, dim, base):
    """Rotary on the first `dim` channels, positions 0.. (rotate-half convention): x (b, h, L, d)."""
    half = dim // 2
    pos = torch.arange(x.shape[2], dtype=torch.float64)[:, None]
    ang = pos * base ** (-torch.arange(half, dtype=torch.float64) * 2 / dim)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    xr = x[..., :dim]
    rotated = torch.cat([-xr[..., half:], xr[..., :half]], -1)
    return torch.cat([xr * cos + rotated * sin, x[..., dim:]], -1)


@torch.no_grad()
def reference_layer(m, u, chunk_size):
    """The layer written out: in_proj -> q, k, v heads -> RoPE -> naive SE-Attn (loops) -> out_proj."""
    b, L, _ = u.shape
    c, hd, h, hkv = m.cfg, m.head_dim, m.num_heads, m.num_heads_kv
    q, k, v = (u @ m.in_proj.weight.T).split([h * hd, hkv * hd, hkv * hd], -1)
    q, k, v = (t.view(b, L, -1, hd).transpose(1, 2) for t in (q, k, v))
    q, k = rope(q, c.rotary_emb_dim, c.rotary_emb_base), rope(k, c.rotary_emb_dim, c.rotary_emb_base)
    o, _ = se_attention_naive(q, k, v, chunk_size=chunk_size, block_size=c.block_size, top_k=c.top_k,
                              scorer=c.scorer, shared=c.shared)
    return o.transpose(1, 2).reshape(b, L, h * hd) @ m.out_proj.weight.T


@pytest.mark.parametrize("scorer,shared,training", [("paper", False, True), ("paper", True, False),
                                                    ("moba", False, False)])
def test_layer_is_its_projections_then_the_op(scorer, shared, training):
    m = make_layer(se_cfg(scorer=scorer, shared=shared, eval_chunk_size=4)).train(training)
    u = torch.randn(1, 26, D_MODEL, dtype=torch.float64)
    torch.manual_seed(3)
    y, state = m(u)
    M = m.last_chunk_size
    assert M == (8 if training else 4)  # seed 3 draws 8: neither the eval size nor the largest
    torch.testing.assert_close(y, reference_layer(m, u, M))
    assert state["pos"] == 26 and state["q"].shape == (1, 4, 26, 4) and state["k"].shape == (1, 2, 26, 4)


def test_retrieval_changes_the_output():
    """top_k = 0 is chunk-local causal attention (the paper's SE-Attn-NoMem); retrieval must change it."""
    u = torch.randn(2, 32, D_MODEL, dtype=torch.float64)
    with_memory, no_memory = make_layer(se_cfg()).eval(), make_layer(se_cfg(top_k=0)).eval()
    y, y0 = with_memory(u)[0], no_memory(u)[0]
    torch.testing.assert_close(y[:, :12], y0[:, :12])  # the first chunk (M = 12) has nothing to retrieve
    assert (y[:, 12:] - y0[:, 12:]).abs().max() > 1e-3


# ---- the chunk size: drawn per call in training, fixed in eval ----

def drawn_sizes(m, u, n_calls):
    sizes = []
    for _ in range(n_calls):
        m(u)
        sizes.append(m.last_chunk_size)
    return sizes


def test_training_draws_the_chunk_size_per_call_from_the_set_with_the_global_generator():
    m = make_layer(se_cfg()).train()
    u = torch.randn(1, 24, D_MODEL, dtype=torch.float64)
    torch.manual_seed(7)
    first = drawn_sizes(m, u, 30)
    assert set(first) == {4, 8, 12}  # every size of the set is drawn, nothing else
    torch.manual_seed(7)
    assert drawn_sizes(m, u, 30) == first  # seeded: the same sequence again
    torch.manual_seed(8)
    assert drawn_sizes(m, u, 30) != first


@pytest.mark.parametrize("eval_chunk_size,want", [(None, 12), (8, 8), (20, 20)])
def test_eval_uses_the_fixed_eval_chunk_size_and_draws_nothing(eval_chunk_size, want):
    m = make_layer(se_cfg(eval_chunk_size=eval_chunk_size)).eval()
    u = torch.randn(1, 24, D_MODEL, dtype=torch.float64)
    rng = torch.get_rng_state()
    assert set(drawn_sizes(m, u, 5)) == {want}
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_single_chunk_size_draws_nothing_in_training():
    m = make_layer(se_cfg(chunk_sizes=[8])).train()
    u = torch.randn(1, 20, D_MODEL, dtype=torch.float64)
    rng = torch.get_rng_state()
    assert set(drawn_sizes(m, u, 3)) == {8}
    assert torch.equal(torch.get_rng_state(), rng)


# ---- the streaming contract (see the docstring of models/se_attention.py) ----

def run_pieces(m, u, cuts, state=None):
    bounds = [0, *cuts, u.shape[1]]
    ys = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        y, state = m(u[:, a:b], state)
        ys.append(y)
    return torch.cat(ys, 1), state


def assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if torch.is_tensor(a[key]):
            torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=1e-12)
        else:
            assert a[key] == b[key]


@pytest.mark.parametrize("cuts", [[8], [16, 24], [8, 16, 24, 32]])
def test_pieces_on_chunk_boundaries_equal_one_pass(cuts):
    m = make_layer(se_cfg(d_conv=3, eval_chunk_size=8)).eval()
    u = torch.randn(2, 37, D_MODEL, dtype=torch.float64)
    y, s = m(u)
    ys, ss = run_pieces(m, u, cuts)
    torch.testing.assert_close(ys, y, rtol=1e-12, atol=1e-12)
    assert_states_equal(ss, s)
    assert ss["k"].shape[2] == ss["q"].shape[2] == 37  # the state holds every query, key and value


def test_gradients_through_the_state_equal_one_pass():
    m = make_layer(se_cfg(eval_chunk_size=8)).eval()
    u = torch.randn(2, 30, D_MODEL, dtype=torch.float64)
    w = torch.randn(2, 30, D_MODEL, dtype=torch.float64)
    (m(u)[0] * w).sum().backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    (run_pieces(m, u, [8, 24])[0] * w).sum().backward()  # state passed on without detaching
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-10, atol=1e-10, msg=n)


def test_any_piece_equals_one_pass_over_what_was_seen_so_far():
    """Off chunk boundaries a piece's rows are those of one pass over the prefix ending with the piece; token by
    token this is causal decoding, and it differs from one pass over the whole sequence (where the later queries
    of a chunk take part in its selection), so the contract above cannot be widened."""
    m = make_layer(se_cfg(eval_chunk_size=8)).eval()
    u = torch.randn(1, 30, D_MODEL, dtype=torch.float64)
    cuts = [3, 5, 13, 14, 22]
    ys, _ = run_pieces(m, u, cuts)
    for a, b in zip([0, *cuts], [*cuts, 30]):
        torch.testing.assert_close(ys[:, a:b], m(u[:, :b])[0][:, a:b], rtol=1e-12, atol=1e-12)
    step, _ = run_pieces(m, u, list(range(1, 30)))
    y, _ = m(u)
    torch.testing.assert_close(step[:, :8], y[:, :8])  # chunk 0 retrieves nothing
    assert (step[:, 8:] - y[:, 8:]).abs().max() > 1e-3


def test_zero_state_runs_like_no_state():
    m = make_layer(se_cfg(d_conv=3)).eval()
    u = torch.randn(3, 21, D_MODEL, dtype=torch.float64)
    y, s = m(u)
    y0, s0 = m(u, m.zero_state(3))
    torch.testing.assert_close(y0, y, rtol=0, atol=0)
    assert_states_equal(s0, s)


def test_a_state_of_another_layer_kind_is_refused():
    m = make_layer(se_cfg())
    swa_state = {"k": torch.zeros(1, 2, 5, 4, dtype=torch.float64), "v": torch.zeros(1, 2, 5, 4, dtype=torch.float64),
                 "pos": 5}
    with pytest.raises(ValueError, match="se_attn state: 0 cached queries but 5 cached keys"):
        m(torch.randn(1, 3, D_MODEL, dtype=torch.float64), swa_state)


# ---- a model trains with either SE-Attn kind ----

@pytest.mark.parametrize("attn", [
    dict(kind="se_attn", chunk_sizes=[8, 16], block_size=4, top_k=2),
    dict(kind="se_attn_window", window=8, block_size=4, top_k=2, query_chunk=8, scorer="mean_dot"),
])
def test_model_trains_a_few_steps(attn, tiny_model):
    attn_cfg = AttentionConfig(num_heads=4, num_heads_kv=2, rotary_emb_dim=4, **attn)
    model = tiny_model("MAMA", vocab_size=40, attn=attn_cfg, perturb=0)
    assert {type(m).__name__ for _, m in model.attention_layers()} == {
        "se_attn": {"SpanExpandedAttention"}, "se_attn_window": {"WindowedSpanAttention"}}[attn["kind"]]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 40, (4, 49))
    losses = []
    for _ in range(12):
        logits, _ = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.3 and losses[-1] < min(losses[:3])


# ---- bad configs are refused when the config is validated, naming the key ----

def model_cfg(**attn):
    return ModelConfig(d_model=16, layer_pattern="MA", attn=se_cfg(**attn))


@pytest.mark.parametrize("attn,needle", [
    (dict(chunk_sizes=[]), r"model\.attn\.chunk_sizes: must be a non-empty list"),
    (dict(chunk_sizes=[8, 6]), r"model\.attn\.chunk_sizes: every chunk size must be a positive multiple of "
                               r"block_size=4, got \[8, 6\]"),
    (dict(chunk_sizes=[0]), r"model\.attn\.chunk_sizes: every chunk size must be a positive multiple"),
    (dict(chunk_sizes=[-8]), r"model\.attn\.chunk_sizes: every chunk size must be a positive multiple"),
    (dict(chunk_sizes=[8, 8]), r"model\.attn\.chunk_sizes: has repeated sizes"),
    (dict(block_size=0), r"model\.attn\.block_size: must be a positive integer, got 0"),
    (dict(block_size=-4), r"model\.attn\.block_size: must be a positive integer"),
    (dict(top_k=-1), r"model\.attn\.top_k: must be an integer >= 0, got -1"),
    (dict(scorer="nope"), r"model\.attn\.scorer: unknown scorer 'nope' for kind se_attn; known: \['moba', 'nsa', "
                          r"'oracle', 'paper', 'quest'\]"),
    (dict(eval_chunk_size=0), r"model\.attn\.eval_chunk_size: must be null \(the largest of chunk_sizes\) or a "
                              r"positive multiple of block_size=4, got 0"),
    (dict(eval_chunk_size=10), r"model\.attn\.eval_chunk_size: must be null"),
    (dict(shared="yes"), r"model\.attn\.shared: must be true or false"),
    # the windowed variant's keys under kind se_attn: what a config or checkpoint of before issue 12 holds
    (dict(scorer="mean_dot", window=128, query_chunk=64, top_k=4),
     r"model\.attn\.scorer: 'mean_dot' is a scorer of kind se_attn_window.*use model\.attn\.kind=se_attn_window"),
    (dict(kind="se_attn_window", scorer="paper"),
     r"model\.attn\.scorer: unknown scorer 'paper' for kind se_attn_window; known: \['max_dot', 'mean_dot', "
     r"'mean_dot_shared'\]"),
    (dict(kind="se_attn_window", scorer="mean_dot", query_chunk=0), r"model\.attn\.query_chunk: must be a positive"),
    (dict(kind="se_attn_window", scorer="mean_dot", block_size=0), r"model\.attn\.block_size: must be a positive"),
])
def test_bad_config_is_refused_naming_the_key(attn, needle):
    with pytest.raises(ValueError, match=needle):
        model_cfg(**attn).validate()


def test_valid_configs_pass():
    model_cfg().validate()
    model_cfg(chunk_sizes=[4], eval_chunk_size=16, top_k=0, scorer="oracle", shared=True).validate()
    model_cfg(kind="se_attn_window", scorer="max_dot").validate()
    ModelConfig(layer_pattern="MM", attn=se_cfg(chunk_sizes=[])).validate()  # no attention layer: not checked


def test_a_checkpoint_of_the_windowed_variant_named_se_attn_is_refused(tmp_path):
    """A checkpoint written before issue 12 stores kind se_attn with the windowed variant's keys (and no
    chunk_sizes): loading it fails with one line that names the key and the kind to use."""
    old_attn = dict(kind="se_attn", num_heads=4, num_heads_kv=None, head_dim=None, window=128, rotary_emb_dim=0,
                    rotary_emb_base=10000.0, qkv_proj_bias=False, out_proj_bias=False, d_conv=0, block_size=32,
                    top_k=4, query_chunk=64, scorer="mean_dot", max_memory_blocks=None, group_ratio=0.25)
    model = dict(d_model=16, layer_pattern="MA", vocab_size=50, attn=old_attn)
    path = tmp_path / "old.ckpt"
    torch.save({"hyper_parameters": {"cfg": {"model": model}}, "state_dict": {}, "global_step": 0}, path)
    with pytest.raises(ValueError, match=r"^model\.attn\.scorer: 'mean_dot' is a scorer of kind se_attn_window") as e:
        load_pretrained(path)
    assert "\n" not in str(e.value) and "use model.attn.kind=se_attn_window" in str(e.value)


# ---- the op through the backend registry ----

@pytest.fixture
def torch_backends():
    yield
    ops.configure("torch")


def test_registry_runs_the_torch_op_and_takes_its_per_op_override(torch_backends, monkeypatch):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 20, 8, generator=g) for n in (4, 2, 2))
    kw = dict(chunk_size=8, block_size=4, top_k=2, scorer="nsa", shared=True)
    assert ops.configure(BackendConfig(se_attn="torch"))["se_attention"] == ("torch",)
    torch.testing.assert_close(ops.se_attention(q, k, v, **kw), se_attention_torch(q, k, v, **kw), rtol=0, atol=0)
    assert "backend.se_attn=torch" in ops.describe()
    monkeypatch.setenv("HYBRIDLM_BACKEND_SE_ATTN", "torch")
    ops.configure("auto")
    assert "HYBRIDLM_BACKEND_SE_ATTN=torch" in ops.describe()


@pytest.mark.parametrize("seq_len,attn,needle", [
    # chunks as long as the row: one chunk per row, nothing before it to retrieve
    (256, dict(chunk_sizes=[256, 512]), r"^model\.attn\.chunk_sizes: every chunk size \(\[256, 512\]\) is >= "
                                        r"data\.seq_len=256"),
    # rows of 256, chunks {128, 256}: chunk 128's last chunk starts at token 128, after 4 whole blocks of 32; top_k 8
    # takes them all, and chunk 256 is the whole row (the default data.seq_len with the default chunk set)
    (256, dict(chunk_sizes=[128, 256], block_size=32, top_k=8),
     r"^model\.attn\.top_k: with every chunk size \(\[128, 256\]\), the last chunk of a 256-token row has at most 4 "
     r"whole past blocks of 32; top_k=8"),
])
def test_a_chunk_set_the_training_length_cannot_use_is_refused_before_training(seq_len, attn, needle):
    """The cross-check the top-level config makes (it knows data.seq_len), before anything is built."""
    from hybridlm.config import Config
    from hybridlm.data.config import DataConfig

    cfg = Config(model=model_cfg(**attn), data=DataConfig(seq_len=seq_len))
    with pytest.raises(ValueError, match=needle):
        cfg.validate()
    cfg.data.seq_len = 1024  # the paper's setting: chunks {T, 2T} = {128, 256}, S 32, k 8, rows of 8T
    cfg.model.attn.chunk_sizes, cfg.model.attn.block_size, cfg.model.attn.top_k = [128, 256], 32, 8
    cfg.validate()
    cfg.data.seq_len = 512  # one chunk size that leaves a choice is enough (256 has a past of 8 blocks, 128 of 12)
    cfg.validate()
