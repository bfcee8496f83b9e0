"""Checkpoint import (docs/design.md §7): transformers Mamba2ForCausalLM checkpoints made by transformers itself,
a mamba_ssm MambaLMHeadModel state dict of the documented layout built here by hand, hybridlm's own
Lightning checkpoints, tokenizers stored with a checkpoint, and clear errors for bad files and configs.

References are independent of hybridlm: transformers' pure-torch forward, and a naive attention loop
written below from mamba_ssm's MHA definition.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
from helpers import randomize_ssm_params_

from hybridlm.convert import (
    CheckpointError,
    detect_format,
    find_tokenizer,
    load_checkpoint_tokenizer,
    load_pretrained,
    load_state_dict_checked,
    merge_model_config,
    read_checkpoint,
    resolve_checkpoint,
)
from hybridlm.models.config import AttentionConfig, ModelConfig, SSMConfig
from hybridlm.models.hybrid_lm import HybridLM


def hybrid_from(path):
    cfg, sd = load_pretrained(path)
    model = HybridLM(cfg).eval()
    load_state_dict_checked(model, sd, source=str(path))
    return cfg, model


# ------------------------------------------------------------------------------------- transformers

def make_hf_mamba2(tmp_path, n_groups: int, tie: bool, seed: int = 0):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(seed)
    config = Mamba2Config(hidden_size=64, num_hidden_layers=2, head_dim=16, num_heads=8, state_size=16,
                          n_groups=n_groups, vocab_size=100, chunk_size=16, expand=2, conv_kernel=4,
                          tie_word_embeddings=tie)
    hf = Mamba2ForCausalLM(config).eval()
    randomize_ssm_params_(hf, seed)
    path = tmp_path / "hf"
    hf.save_pretrained(path)
    return hf, path


@pytest.mark.parametrize("n_groups,tie", [(1, True), (2, False)])
def test_hf_mamba2_import_matches_transformers(tmp_path, n_groups, tie):
    hf, path = make_hf_mamba2(tmp_path, n_groups, tie)
    assert detect_format(path) == "hf_mamba2"
    cfg, model = hybrid_from(path)
    assert (cfg.d_model, cfg.layer_pattern, cfg.vocab_size, cfg.padded_vocab_size) == (64, "MM", 100, 100)
    s = cfg.ssm
    assert (s.d_state, s.headdim, s.ngroups, s.expand, s.d_conv, s.chunk_size) == (16, 16, n_groups, 2, 4, 16)
    assert cfg.tie_embeddings == tie and cfg.d_intermediate == 0
    assert (model.lm_head.weight is model.backbone.embedding.weight) == tie
    ids = torch.randint(0, 100, (2, 37), generator=torch.Generator().manual_seed(1))  # 37: not a multiple of 16
    with torch.no_grad():
        ref = hf(ids).logits
        ours, _ = model(ids)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_hf_time_step_limit_and_sharded_weights(tmp_path):
    """transformers writes inf as {"__float__": "Infinity"}; large checkpoints come in shards with an index."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    config = Mamba2Config(hidden_size=32, num_hidden_layers=2, head_dim=16, num_heads=4, state_size=8, n_groups=1,
                          vocab_size=40, chunk_size=8, time_step_limit=(0.01, float("inf")))
    hf = Mamba2ForCausalLM(config).eval()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    cfg, model = hybrid_from(tmp_path)
    assert cfg.ssm.dt_limit == (0.01, float("inf"))
    ids = torch.randint(0, 40, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], hf(ids).logits, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ mamba_ssm layout, built by hand

D_MODEL, VOCAB, PAD, D_INT = 32, 50, 16, 128
SSM_CFG = dict(layer="Mamba2", d_state=8, d_conv=4, expand=2, headdim=16, ngroups=2, chunk_size=8)
# MHA's biases default to True in mamba_ssm: qkv_proj_bias / out_proj_bias are left out on purpose.
ATTN_CFG = dict(num_heads=4, num_heads_kv=2, rotary_emb_dim=4, causal=True, d_conv=3)
N_LAYER, ATTN_IDX = 3, [1]


def mamba_ssm_layout(seed: int = 0) -> tuple[dict, dict]:
    """config.json and state dict of a MambaLMHeadModel (mamba_ssm/models/mixer_seq_simple.py, modules/
    mamba2.py, mha.py, mlp.py): shapes from those modules' formulas, values random."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g) * 0.2
    config = dict(d_model=D_MODEL, d_intermediate=D_INT, n_layer=N_LAYER, vocab_size=VOCAB, ssm_cfg=SSM_CFG,
                  attn_layer_idx=ATTN_IDX, attn_cfg=ATTN_CFG, rms_norm=True, residual_in_fp32=True,
                  fused_add_norm=True, pad_vocab_size_multiple=PAD, tie_embeddings=True)
    d_inner = SSM_CFG["expand"] * D_MODEL
    nheads = d_inner // SSM_CFG["headdim"]
    gn = SSM_CFG["ngroups"] * SSM_CFG["d_state"]
    conv_dim = d_inner + 2 * gn
    hd = D_MODEL // ATTN_CFG["num_heads"]
    qkv_dim = hd * (ATTN_CFG["num_heads"] + 2 * ATTN_CFG["num_heads_kv"])
    emb = rnd(64, D_MODEL)  # 50 rounded up to a multiple of 16
    sd = {"backbone.embedding.weight": emb}
    for i in range(N_LAYER):
        p = f"backbone.layers.{i}."
        sd[p + "norm.weight"] = 1 + rnd(D_MODEL)
        if i in ATTN_IDX:
            sd[p + "mixer.in_proj.weight"] = rnd(qkv_dim, D_MODEL)
            sd[p + "mixer.in_proj.bias"] = rnd(qkv_dim)
            sd[p + "mixer.conv1d.weight"] = rnd(qkv_dim, 1, ATTN_CFG["d_conv"])
            sd[p + "mixer.conv1d.bias"] = rnd(qkv_dim)
            sd[p + "mixer.out_proj.weight"] = rnd(D_MODEL, ATTN_CFG["num_heads"] * hd)
            sd[p + "mixer.out_proj.bias"] = rnd(D_MODEL)
        else:
            sd[p + "mixer.in_proj.weight"] = rnd(2 * d_inner + 2 * gn + nheads, D_MODEL)  # [z, x, B, C, dt]
            sd[p + "mixer.conv1d.weight"] = rnd(conv_dim, 1, SSM_CFG["d_conv"])
            sd[p + "mixer.conv1d.bias"] = rnd(conv_dim)
            sd[p + "mixer.dt_bias"] = rnd(nheads) - 1.0
            sd[p + "mixer.A_log"] = rnd(nheads)
            sd[p + "mixer.D"] = 1 + rnd(nheads)
            sd[p + "mixer.norm.weight"] = 1 + rnd(d_inner)
            sd[p + "mixer.out_proj.weight"] = rnd(D_MODEL, d_inner)
        sd[p + "norm2.weight"] = 1 + rnd(D_MODEL)
        sd[p + "mlp.fc1.weight"] = rnd(2 * D_INT, D_MODEL)
        sd[p + "mlp.fc2.weight"] = rnd(D_MODEL, D_INT)
    sd["backbone.norm_f.weight"] = 1 + rnd(D_MODEL)
    sd["lm_head.weight"] = emb  # tied: the same tensor under both names, as in MambaLMHeadModel.state_dict()
    return config, sd


def write_mamba_ssm(path, config: dict, sd: dict):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    torch.save(sd, path / "pytorch_model.bin")
    return path


def naive_mha(u, sd, prefix, num_heads, num_heads_kv, rotary_dim, base=10000.0):
    """mamba_ssm MHA written out: fused in_proj -> causal depthwise conv over qkv (no activation) -> split
    [q, k, v] -> non-interleaved rotary on the first rotary_dim channels -> GQA causal softmax(qk/sqrt(d)) v
    -> out_proj. Loops over positions and heads."""
    w_in, b_in = sd[prefix + "in_proj.weight"], sd[prefix + "in_proj.bias"]
    cw, cb = sd[prefix + "conv1d.weight"], sd[prefix + "conv1d.bias"]
    b, L, _ = u.shape
    qkv = u @ w_in.T + b_in
    k_size = cw.shape[-1]
    conv = torch.zeros_like(qkv)
    for t in range(L):
        acc = cb.expand(b, -1).clone()
        for j in range(k_size):
            src = t - (k_size - 1) + j
            if src >= 0:
                acc = acc + cw[:, 0, j] * qkv[:, src]
        conv[:, t] = acc
    hd = sd[prefix + "out_proj.weight"].shape[1] // num_heads
    q = conv[..., : num_heads * hd].reshape(b, L, num_heads, hd)
    k = conv[..., num_heads * hd: (num_heads + num_heads_kv) * hd].reshape(b, L, num_heads_kv, hd)
    v = conv[..., (num_heads + num_heads_kv) * hd:].reshape(b, L, num_heads_kv, hd)

    def rope(x):
        y, half = x.clone(), rotary_dim // 2
        for t in range(L):
            for i in range(half):
                theta = t * base ** (-2.0 * i / rotary_dim)
                x1, x2 = x[:, t, :, i], x[:, t, :, i + half]
                y[:, t, :, i] = x1 * math.cos(theta) - x2 * math.sin(theta)
                y[:, t, :, i + half] = x2 * math.cos(theta) + x1 * math.sin(theta)
        return y

    q, k = rope(q), rope(k)
    o = torch.zeros(b, L, num_heads, hd)
    for h in range(num_heads):
        kvh = h // (num_heads // num_heads_kv)
        for t in range(L):
            p = torch.softmax((q[:, t, h, None, :] * k[:, : t + 1, kvh]).sum(-1) / math.sqrt(hd), dim=-1)
            o[:, t, h] = (p[..., None] * v[:, : t + 1, kvh]).sum(1)
    return o.reshape(b, L, num_heads * hd) @ sd[prefix + "out_proj.weight"].T + sd[prefix + "out_proj.bias"]


def test_mamba_ssm_layout_import(tmp_path):
    config, sd = mamba_ssm_layout()
    path = write_mamba_ssm(tmp_path / "ms", config, sd)
    assert detect_format(path) == "mamba_ssm"
    cfg, model = hybrid_from(path)
    assert cfg.layer_pattern == "MAM" and cfg.d_intermediate == D_INT and cfg.padded_vocab_size == 64
    assert cfg.attn.kind == "full" and cfg.attn.qkv_proj_bias and cfg.attn.out_proj_bias
    assert (cfg.ssm.ngroups, cfg.ssm.chunk_size, cfg.ssm.d_state) == (2, 8, 8)
    # Every tensor lands bit-exactly under its own name; the head stays tied.
    msd = model.state_dict()
    assert set(msd) == set(sd)
    for key, value in sd.items():
        assert torch.equal(msd[key], value), key
    assert model.lm_head.weight is model.backbone.embedding.weight
    u = torch.randn(2, 11, D_MODEL)
    with torch.no_grad():
        out, _ = model.backbone.layers[1].mixer(u)
        ref = naive_mha(u, sd, "backbone.layers.1.mixer.", ATTN_CFG["num_heads"], ATTN_CFG["num_heads_kv"],
                        ATTN_CFG["rotary_emb_dim"])
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        logits, _ = model(torch.randint(0, VOCAB, (1, 13)))
    assert logits.shape == (1, 13, VOCAB)  # padded rows are sliced off


def test_mamba_ssm_layout_round_trips_bit_exactly(tmp_path):
    from safetensors.torch import load_file

    from hybridlm.convert import export

    config, sd = mamba_ssm_layout()
    cfg, model = hybrid_from(write_mamba_ssm(tmp_path / "ms", config, sd))
    out = export(model, cfg, tmp_path / "out", format="mamba_ssm")
    # pytorch_model.bin is what MambaLMHeadModel.from_pretrained reads: every name, tied head included.
    back = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert torch.equal(back[key], value), key
    assert back["lm_head.weight"].data_ptr() == back["backbone.embedding.weight"].data_ptr()
    st = load_file(str(out / "model.safetensors"))
    assert set(st) == set(sd) - {"lm_head.weight"}
    for key, value in st.items():
        assert torch.equal(value, sd[key]), key
    exported = json.loads((out / "config.json").read_text())
    for key, value in config.items():
        if isinstance(value, dict):
            assert {k: exported[key][k] for k in value} == value, key
        else:
            assert exported[key] == value, key
    assert exported["attn_cfg"]["qkv_proj_bias"] is True and exported["attn_cfg"]["out_proj_bias"] is True
    assert load_pretrained(out)[0] == cfg


@pytest.mark.parametrize("change,message", [
    (lambda c: c["attn_cfg"].update(mlp_dim=64), "attn_cfg.mlp_dim"),
    (lambda c: c["attn_cfg"].pop("causal"), "attn_cfg.causal"),
    (lambda c: c["attn_cfg"].update(rotary_emb_interleaved=True), "rotary_emb_interleaved"),
    (lambda c: c["attn_cfg"].update(softmax_scale=1.0), "attn_cfg.softmax_scale"),
    (lambda c: c["ssm_cfg"].pop("layer"), "ssm_cfg.layer"),
    (lambda c: c["ssm_cfg"].update(D_has_hdim=True), "D_has_hdim"),
    (lambda c: c["ssm_cfg"].update(d_ssm=32), "d_ssm"),
    (lambda c: c.update(rms_norm=False), "rms_norm"),
    (lambda c: c["ssm_cfg"].update(new_knob=1), "new_knob"),
])
def test_mamba_ssm_unsupported_configs_are_refused(tmp_path, change, message):
    config, sd = mamba_ssm_layout()
    config = copy.deepcopy(config)
    change(config)
    path = write_mamba_ssm(tmp_path / "ms", config, sd)
    with pytest.raises(CheckpointError, match=message) as e:
        load_pretrained(path)
    assert str(path / "config.json") in str(e.value)


def test_mismatched_state_dict_lists_every_problem(tmp_path):
    config, sd = mamba_ssm_layout()
    sd = dict(sd)
    sd["backbone.layers.0.mixer.A_log"] = torch.zeros(3)  # wrong shape
    del sd["backbone.layers.2.mixer.D"]  # missing
    sd["backbone.layers.0.mixer.extra"] = torch.zeros(2, 2)  # unexpected
    path = write_mamba_ssm(tmp_path / "ms", config, sd)
    cfg, loaded = load_pretrained(path)
    with pytest.raises(CheckpointError) as e:
        load_state_dict_checked(HybridLM(cfg), loaded, source=str(path))
    msg = str(e.value)
    assert str(path) in msg and "3 problem(s)" in msg
    assert "backbone.layers.0.mixer.A_log: checkpoint (3,) vs model (4,)" in msg
    assert "missing from the checkpoint: backbone.layers.2.mixer.D (4,)" in msg
    assert "unexpected in the checkpoint: backbone.layers.0.mixer.extra (2, 2)" in msg


# ------------------------------------------------------------------------------------ hybridlm .ckpt

def test_hybridlm_lightning_checkpoint(tmp_path):
    """A real checkpoint of the lead's HybridLMModule (HybridLM in `.model`, the config as a plain dict in
    hyper_parameters["cfg"]) loads back with torch.load(weights_only=True)."""
    import lightning as L

    from hybridlm.config import Config
    from hybridlm.lit import HybridLMModule

    cfg = ModelConfig(d_model=32, layer_pattern="MA", vocab_size=40, d_intermediate=16,
                      ssm=SSMConfig(d_state=8, headdim=16, chunk_size=8, dt_limit=(0.0, 5.0)),
                      attn=AttentionConfig(kind="swa", num_heads=2, window=4, rotary_emb_dim=4))
    module = HybridLMModule(Config(model=cfg))
    ids = torch.randint(0, 40, (2, 13))
    data = torch.utils.data.DataLoader([{"input_ids": r[:-1], "labels": r[1:]} for r in ids], batch_size=2)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(module, data)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    assert detect_format(ckpt) == "hybridlm"
    loaded_cfg, model = hybrid_from(ckpt)
    assert loaded_cfg == cfg
    for key, value in module.model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    # One read gives what evaluation needs besides the model: the training config (data settings) as saved.
    read = read_checkpoint(ckpt)
    assert (read.format, read.path, read.cfg) == ("hybridlm", ckpt, cfg)
    assert read.run_config == module.hparams["cfg"] and read.run_config["data"]["seq_len"] == Config().data.seq_len


def test_hybridlm_checkpoint_without_config_is_refused(tmp_path):
    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": {"model.w": torch.zeros(1)}, "hyper_parameters": {}}, path)
    with pytest.raises(CheckpointError, match=r"hyper_parameters\['cfg'\]\['model'\]") as e:
        load_pretrained(path)
    assert str(path) in str(e.value)


# -------------------------------------------------------------------------------------- overrides

def test_merge_model_config(tmp_path):
    config, _ = mamba_ssm_layout()
    ckpt_cfg, _ = load_pretrained(write_mamba_ssm(tmp_path / "ms", config, mamba_ssm_layout()[1]))
    user = ModelConfig(d_model=128, attn=AttentionConfig(kind="swa", window=6, num_heads=4, num_heads_kv=2),
                       ssm=SSMConfig(chunk_size=4, dt_limit=(0.001, 2.0)))
    merged = merge_model_config(ckpt_cfg, user, {"attn.kind", "model.attn.window", "ssm.chunk_size", "ssm.dt_limit",
                                                 "attn.num_heads", "attn.num_heads_kv"})
    assert (merged.attn.kind, merged.attn.window, merged.ssm.chunk_size) == ("swa", 6, 4)
    assert merged.ssm.dt_limit == (0.001, 2.0)
    assert merged.d_model == D_MODEL and merged.ssm.d_state == 8  # not explicit: the checkpoint's value stays
    assert ckpt_cfg.attn.kind == "full"  # inputs are not mutated
    with pytest.raises(CheckpointError, match=r"model\.d_model = 128 .* model\.d_model = 32"):
        merge_model_config(ckpt_cfg, user, {"d_model"})
    with pytest.raises(CheckpointError, match=r"model\.ssm\.d_state = 64 .* model\.ssm\.d_state = 8"):
        merge_model_config(ckpt_cfg, user, {"ssm.d_state"})
    # head_dim None means d_model // num_heads = 8: explicitly asking for 8 is no conflict, 16 is.
    same = merge_model_config(ckpt_cfg, dataclasses.replace(user, attn=AttentionConfig(head_dim=8)), {"attn.head_dim"})
    assert same.attn.head_dim == 8
    with pytest.raises(CheckpointError, match=r"model\.attn\.head_dim = 16"):
        merge_model_config(ckpt_cfg, dataclasses.replace(user, attn=AttentionConfig(head_dim=16)), {"attn.head_dim"})
    with pytest.raises(CheckpointError, match=r"model\.ssm\.not_a_key"):
        merge_model_config(ckpt_cfg, user, {"ssm.not_a_key"})
    # Merged configs build a model the checkpoint's weights load into.
    load_state_dict_checked(HybridLM(merged), load_pretrained(tmp_path / "ms")[1])


# ------------------------------------------------------------------------------------ bad files

def test_corrupt_files_are_named(tmp_path):
    _, path = make_hf_mamba2(tmp_path, n_groups=1, tie=True)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    with pytest.raises(CheckpointError, match="safetensors") as e:
        load_pretrained(path)
    assert str(weights) in str(e.value)

    config, sd = mamba_ssm_layout()
    ms = write_mamba_ssm(tmp_path / "ms", config, sd)
    (ms / "pytorch_model.bin").write_bytes(b"\x80\x04garbage" * 10)
    with pytest.raises(CheckpointError, match="weights_only") as e:
        load_pretrained(ms)
    assert str(ms / "pytorch_model.bin") in str(e.value)
    assert "set to `False`" not in str(e.value)  # torch's advice to unpickle anyway is not passed on

    (ms / "config.json").write_text('{"d_model": 3')
    with pytest.raises(CheckpointError, match="cannot read JSON") as e:
        load_pretrained(ms)
    assert str(ms / "config.json") in str(e.value)

    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(bytes(range(256)))
    with pytest.raises(CheckpointError) as e:
        load_pretrained(ckpt)
    assert str(ckpt) in str(e.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no weights file"):
        load_pretrained(empty)


def test_unknown_path_or_unreachable_hub_id(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        load_pretrained(tmp_path / "nope")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    with pytest.raises(CheckpointError, match="hybridlm-test/no-such-model: not a local path"):
        resolve_checkpoint("hybridlm-test/no-such-model")


# -------------------------------------------------------------------------------------- tokenizer

def test_tokenizer_stored_with_checkpoint(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    _, path = make_hf_mamba2(tmp_path, n_groups=1, tie=True)
    assert find_tokenizer(path) is None and load_checkpoint_tokenizer(path) is None
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]", "<|endoftext|>"])
    tok.train_from_iterator(["the state space model reads the sequence", "a hybrid model mixes attention"] * 20,
                            trainer)
    tok.save(str(path / "tokenizer.json"))
    assert find_tokenizer(path) == path
    loaded = load_checkpoint_tokenizer(path)
    text = "the hybrid model reads attention"
    assert loaded.encode(text) == tok.encode(text).ids
    assert loaded.vocab_size == tok.get_vocab_size()
    assert loaded.eod_id == tok.token_to_id("<|endoftext|>")


# --------------------------------------------------------------------------------- real mamba_ssm

@pytest.mark.cuda
def test_matches_mamba_ssm_lm_head_model(tmp_path):
    """Against mamba_ssm's own MambaLMHeadModel (CUDA only): import its save_pretrained output, and export
    ours back into its from_pretrained."""
    pytest.importorskip("mamba_ssm")
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    from hybridlm.convert import export

    torch.manual_seed(0)
    config = MambaConfig(d_model=64, d_intermediate=128, n_layer=3, vocab_size=100, pad_vocab_size_multiple=16,
                         ssm_cfg=dict(layer="Mamba2", d_state=16, headdim=16, ngroups=2, chunk_size=16),
                         attn_layer_idx=[1], attn_cfg=dict(num_heads=4, num_heads_kv=2, causal=True, d_conv=4),
                         tie_embeddings=True)
    ref = MambaLMHeadModel(config, device="cuda", dtype=torch.float32).eval()
    randomize_ssm_params_(ref, 0)
    ref.save_pretrained(str(tmp_path / "ms"))
    _, model = hybrid_from(tmp_path / "ms")
    model = model.cuda()
    ids = torch.randint(0, 100, (2, 37), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], ref(ids).logits[..., :100], atol=1e-3, rtol=1e-3)
        export(model, model.cfg, tmp_path / "out", format="mamba_ssm")
        back = MambaLMHeadModel.from_pretrained(str(tmp_path / "out"), device="cuda", dtype=torch.float32).eval()
        torch.testing.assert_close(back(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
