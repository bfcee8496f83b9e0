"""transformers' Mamba-2 hybrids, NemotronH and Bamba (docs/design.md §7): import, export, generation, fine-tuning.

The reference is transformers itself: tiny random models built with its own classes at configurations unlike any
default (grouped KV heads, n_groups > 1, hidden 72 / MLP 100, a Mamba-2 width other than expand * hidden, every
projection bias, untied and tied embeddings, NemotronH's M / attention / MLP layers together), saved with
save_pretrained and compared through its pure-torch forward and `generate`. Then the model features these formats
brought (F layers, the relu2 MLP, ssm.d_inner) are checked against the state contract and validation.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import randomize_ssm_params_
from transformers.models.bamba import modeling_bamba
from transformers.models.nemotron_h import modeling_nemotron_h

from hybridlm.convert import (
    CheckpointError,
    detect_format,
    export,
    load_pretrained,
    load_state_dict_checked,
    merge_model_config,
)
from hybridlm.models.config import AttentionConfig, ModelConfig, SSMConfig
from hybridlm.models.hybrid_lm import HybridLM

INF = float("inf")
VOCAB = 100
NEMOTRON_LAYERS = ["linear_attention", "full_attention", "mlp", "linear_attention", "mlp", "full_attention"]


@pytest.fixture(autouse=True)
def transformers_torch_path(monkeypatch):
    """transformers binds mamba_ssm / causal_conv1d kernels at import when they are installed (CUDA-only, and no
    device check): use its pure-torch functions, the reference these tests mean."""
    for module in (modeling_nemotron_h, modeling_bamba):
        for name in ("causal_conv1d_fn", "causal_conv1d_update", "mamba2_chunk_scan", "mamba2_selective_state_update",
                     "mamba2_split_conv1d_scan_combined"):
            fn = getattr(module, name, None)
            if fn is not None and hasattr(fn, "__wrapped__"):
                monkeypatch.setattr(module, name, fn.__wrapped__)


def make_nemotron_h(path, *, time_step_min=0.2, seed=0, vocab=VOCAB):
    """NemotronH with every layer kind; d_inner = 6 heads * 16 = 96 != expand * hidden = 144. time_step_min=0.2
    clamps dt for some heads (dt_bias spreads dt over about [0.05, 0.7])."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    config = NemotronHConfig(
        vocab_size=vocab, hidden_size=72, layers_block_type=NEMOTRON_LAYERS, num_attention_heads=6,
        num_key_value_heads=2, head_dim=12, intermediate_size=100, mlp_bias=True, mamba_num_heads=6, mamba_head_dim=16,
        n_groups=3, ssm_state_size=8, conv_kernel=3, chunk_size=16, use_bias=True, time_step_min=time_step_min,
        time_step_max=1.0, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    hf = NemotronHForCausalLM(config).eval()
    randomize_ssm_params_(hf, seed, others=0.1)
    hf.save_pretrained(path)
    return hf


def make_bamba(path, *, time_step_limit=(0.2, 2.0), tie=False, head_dim=None, rope_parameters=None, seed=0,
               vocab=VOCAB):
    """Bamba with attention at layers 1 and 3, every bias on. Defaults: head_dim = 72 / 6 = 12, RoPE on half of it."""
    from transformers import BambaConfig, BambaForCausalLM

    extra = {} if head_dim is None else {"head_dim": head_dim}
    config = BambaConfig(
        vocab_size=vocab, hidden_size=72, num_hidden_layers=4, attn_layer_indices=[1, 3], num_attention_heads=6,
        num_key_value_heads=2, intermediate_size=100, mamba_n_heads=6, mamba_n_groups=3, mamba_d_state=8,
        mamba_d_conv=3, mamba_chunk_size=16, attention_bias=True, mlp_bias=True, mamba_proj_bias=True,
        time_step_limit=time_step_limit, tie_word_embeddings=tie, rope_parameters=rope_parameters,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, **extra)
    torch.manual_seed(seed)
    hf = BambaForCausalLM(config).eval()
    randomize_ssm_params_(hf, seed, others=0.1)
    hf.save_pretrained(path)
    return hf


def hybrid_from(path, dtype=torch.float32):
    cfg, sd = load_pretrained(path)
    model = HybridLM(cfg).eval()
    load_state_dict_checked(model, sd, source=str(path))
    return cfg, model.to(dtype)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def ids_for(b=2, length=37, vocab=VOCAB, seed=1):  # 37: not a multiple of the chunk size 16
    return torch.randint(0, vocab, (b, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------- import

# transformers' scan casts to float32 inside, so float64 runs agree only to float32 precision.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nemotron_h_import_matches_transformers(tmp_path, dtype):
    hf = make_nemotron_h(tmp_path).to(dtype)
    assert detect_format(tmp_path) == "hf_nemotron_h"
    cfg, model = hybrid_from(tmp_path, dtype)
    assert (cfg.layer_pattern, cfg.d_model, cfg.vocab_size, cfg.padded_vocab_size) == ("MAFMFA", 72, VOCAB, VOCAB)
    assert (cfg.d_intermediate, cfg.d_ffn, cfg.mlp_activation, cfg.mlp_bias) == (0, 100, "relu2", True)
    s, a = cfg.ssm, cfg.attn
    assert (s.d_inner, s.headdim, s.ngroups, s.d_state, s.d_conv, s.bias) == (96, 16, 3, 8, 3, True)
    assert s.dt_limit == (0.2, INF)
    assert (a.kind, a.num_heads, a.num_heads_kv, a.head_dim, a.rotary_emb_dim) == ("full", 6, 2, 12, 0)
    assert not cfg.tie_embeddings and not cfg.residual_in_fp32
    ids = ids_for()
    with torch.no_grad():
        ref = hf(ids).logits
        ours, state = model(ids)
        assert rel_err(ours, ref) < 1e-4
        assert [i for i, s in enumerate(state) if s == {}] == [2, 4]  # the F layers hold no state
        # The dt clamp at time_step_min matters in this configuration: without it the logits move.
        unclamped = copy.deepcopy(model)
        for _, mixer in unclamped.mamba_layers():
            mixer.cfg = dataclasses.replace(mixer.cfg, dt_limit=(0.0, INF))
        assert rel_err(unclamped(ids)[0], ref) > 1e-3


@pytest.mark.parametrize("dtype,tie,head_dim,rope,rotary", [
    (torch.float32, False, None, None, 6),  # BambaConfig's partial_rotary_factor 0.5 on head_dim 72 / 6
    (torch.float64, True, 16, {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 1.0}, 16),
])
def test_bamba_import_matches_transformers(tmp_path, dtype, tie, head_dim, rope, rotary):
    hf = make_bamba(tmp_path, tie=tie, head_dim=head_dim, rope_parameters=rope).to(dtype)
    assert detect_format(tmp_path) == "hf_bamba"
    cfg, model = hybrid_from(tmp_path, dtype)
    assert (cfg.layer_pattern, cfg.d_model, cfg.d_intermediate, cfg.mlp_activation, cfg.mlp_bias) == (
        "MAMA", 72, 100, "swiglu", True)
    s, a = cfg.ssm, cfg.attn
    assert (s.d_inner, s.expand, s.headdim, s.ngroups, s.d_state, s.bias, s.dt_limit) == (
        None, 2, 24, 3, 8, True, (0.2, 2.0))
    assert (a.num_heads, a.num_heads_kv, a.head_dim or 12, a.rotary_emb_dim) == (6, 2, head_dim or 12, rotary)
    assert a.qkv_proj_bias and a.out_proj_bias and a.rotary_emb_base == (500.0 if rope else 10000.0)
    assert cfg.tie_embeddings == tie and (model.lm_head.weight is model.backbone.embedding.weight) == tie
    ids = ids_for()
    with torch.no_grad():
        assert rel_err(model(ids)[0], hf(ids).logits) < 1e-4


# --------------------------------------------------------------------------------------------- generation

def greedy_streaming(model: HybridLM, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Feed the prompt once, then one token at a time with the state: n greedy tokens."""
    logits, state = model(prompt)
    tokens = [logits[:, -1].argmax(-1)]
    for _ in range(n - 1):
        logits, state = model(tokens[-1][:, None], state)
        tokens.append(logits[:, -1].argmax(-1))
    return torch.stack(tokens, dim=1)


# transformers' torch decode step (one token with a cache) does not clamp dt, its chunked prefill does: with a
# clamp that bites, transformers disagrees with itself. These configurations keep dt inside the limits.
@pytest.mark.parametrize("fmt", ["nemotron_h", "bamba"])
def test_greedy_generation_through_the_state_matches_transformers_generate(tmp_path, fmt):
    if fmt == "nemotron_h":
        hf = make_nemotron_h(tmp_path, time_step_min=1e-3, seed=3)
    else:
        hf = make_bamba(tmp_path, time_step_limit=(0.01, 20.0), seed=3)
    _, model = hybrid_from(tmp_path)
    prompt, n = ids_for(b=2, length=11, seed=4), 12
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=n, do_sample=False)[:, prompt.shape[1]:]
        ours = greedy_streaming(model, prompt, n)
    assert ref.shape == (2, n)
    assert torch.equal(ours, ref), (ours, ref)


# ------------------------------------------------------------------------------------------------- export

@pytest.mark.parametrize("fmt", ["hf_nemotron_h", "hf_bamba"])
def test_export_through_the_cli_loads_back_in_transformers(tmp_path, fmt):
    from hybridlm.export import main

    src = tmp_path / "src"
    hf = make_nemotron_h(src) if fmt == "hf_nemotron_h" else make_bamba(src, tie=True)
    out = main([f"ckpt_path={src}", f"out={tmp_path / 'out'}", f"format={fmt}"])
    assert detect_format(out) == fmt
    back = type(hf).from_pretrained(out).eval()
    ids = ids_for()
    with torch.no_grad():
        assert rel_err(back(ids).logits, hf(ids).logits) < 1e-6
    assert load_pretrained(out)[0] == load_pretrained(src)[0]  # the config survives the round trip


def random_hybrid(cfg: ModelConfig, seed: int = 0) -> HybridLM:
    torch.manual_seed(seed)
    model = HybridLM(cfg).eval()
    randomize_ssm_params_(model, seed, others=0.1)
    return model


NATIVE = {
    # tied and vocabulary-padded (100 -> 112); dt_limit (0, inf) exports as time_step_min = 0
    "hf_nemotron_h": ModelConfig(
        d_model=48, layer_pattern="MFAM", vocab_size=VOCAB, d_ffn=80, mlp_activation="relu2",
        ssm=SSMConfig(d_state=8, headdim=16, ngroups=2, chunk_size=8),
        attn=AttentionConfig(kind="full", num_heads=4, num_heads_kv=2)),
    # tied, padded; RoPE on 8 of head_dim 16 (not d_model / num_heads), biases on
    "hf_bamba": ModelConfig(
        d_model=48, layer_pattern="MAM", vocab_size=VOCAB, d_intermediate=80, mlp_bias=True,
        ssm=SSMConfig(d_state=8, headdim=16, ngroups=2, chunk_size=8, bias=True),
        attn=AttentionConfig(kind="full", num_heads=4, num_heads_kv=2, head_dim=16, rotary_emb_dim=8,
                             rotary_emb_base=300.0, qkv_proj_bias=True, out_proj_bias=True)),
}


@pytest.mark.parametrize("fmt", sorted(NATIVE))
def test_a_hybridlm_model_exports_to_transformers(tmp_path, fmt):
    cfg = NATIVE[fmt]
    model = random_hybrid(cfg)
    export(model, cfg, tmp_path, format=fmt)
    cls = modeling_nemotron_h.NemotronHForCausalLM if fmt == "hf_nemotron_h" else modeling_bamba.BambaForCausalLM
    hf = cls.from_pretrained(tmp_path).eval()
    ids = ids_for()
    with torch.no_grad():
        assert rel_err(hf(ids).logits, model(ids)[0]) < 1e-4


def test_export_refuses_what_the_target_cannot_compute(tmp_path):
    def refused(cfg, fmt, *needles, **kw):
        with pytest.raises(CheckpointError) as e:
            export(HybridLM(cfg), cfg, tmp_path / fmt, format=fmt, **kw)
        assert all(n in str(e.value) for n in needles) and "\n" not in str(e.value), str(e.value)
        assert not (tmp_path / fmt).exists()  # refused before anything was written

    nemotron = NATIVE["hf_nemotron_h"]
    refused(dataclasses.replace(nemotron, d_intermediate=64), "hf_nemotron_h", "d_intermediate")
    refused(dataclasses.replace(nemotron, mlp_activation="swiglu"), "hf_nemotron_h", "mlp_activation")
    swa = dataclasses.replace(nemotron, attn=AttentionConfig(kind="swa", num_heads=4, window=8))
    refused(swa, "hf_nemotron_h", "allow_full_attention")
    export(HybridLM(swa), swa, tmp_path / "allowed", format="hf_nemotron_h", allow_full_attention=True)
    refused(nemotron, "hf_bamba", "F layers")
    refused(nemotron, "mamba_ssm", "F layers")
    relu2 = ModelConfig(d_model=48, layer_pattern="MA", d_intermediate=64, mlp_activation="relu2",
                        ssm=SSMConfig(headdim=16), attn=AttentionConfig(kind="full"))
    refused(relu2, "mamba_ssm", "mlp_activation")
    swiglu = dataclasses.replace(relu2, mlp_activation="swiglu")
    export(HybridLM(swiglu), swiglu, tmp_path / "swiglu", format="mamba_ssm")  # with mamba_ssm's MLP it exports
    refused(nemotron, "hf_mamba2", "MLP")
    wide = ModelConfig(d_model=48, layer_pattern="MM", ssm=SSMConfig(d_inner=64, headdim=16))
    refused(wide, "mamba_ssm", "ssm.d_inner")
    refused(wide, "hf_mamba2", "ssm.d_inner")
    bamba = NATIVE["hf_bamba"]
    refused(dataclasses.replace(bamba, d_intermediate=0), "hf_bamba", "d_intermediate")
    odd = dataclasses.replace(bamba, attn=dataclasses.replace(bamba.attn, out_proj_bias=False))
    refused(odd, "hf_bamba", "attention_bias")


def write_config(path, config: dict):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("config,needles", [
    ({"model_type": "nemotron_h", "hybrid_override_pattern": "M-E*"}, ["layers_block_type", "moe"]),
    ({"model_type": "nemotron_h", "layers_block_type": ["mlp", "mamba"]}, ["layers_block_type", "mamba"]),
    ({"model_type": "nemotron_h", "mlp_hidden_act": "silu", "layers_block_type": ["mlp"]}, ["mlp_hidden_act"]),
    ({"model_type": "nemotron_h", "layer_norm_epsilon": 1e-6, "layers_block_type": ["linear_attention"]},
     ["layer_norm_epsilon"]),
    ({"model_type": "bamba", "rope_parameters": {"rope_type": "linear", "factor": 2.0}, "attn_layer_indices": [0]},
     ["rope_type", "linear"]),
    ({"model_type": "bamba", "rope_scaling": {"type": "dynamic", "factor": 2.0}, "attn_layer_indices": [0]},
     ["rope_scaling"]),
    ({"model_type": "bamba", "hidden_size": 64, "num_attention_heads": 4, "mamba_n_heads": 4,
      "rope_parameters": {"partial_rotary_factor": 0.3125}, "attn_layer_indices": [0]},
     ["partial_rotary_factor", "odd"]),
    ({"model_type": "bamba", "attn_layer_indices": [40]}, ["attn_layer_indices"]),
    ({"model_type": "bamba", "hidden_act": "gelu"}, ["hidden_act"]),
])
def test_import_refuses_what_hybridlm_cannot_compute_in_one_line(tmp_path, config, needles):
    path = write_config(tmp_path / "ckpt", config)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(path)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


def test_nemotron_h_reads_nvidia_legacy_keys_and_model_prefix(tmp_path):
    """NVIDIA's configs name the pattern `hybrid_override_pattern` and some Mamba keys `mamba_*`; weights may
    also come under transformers' in-memory prefix `model.`. Multi-token-prediction weights are ignored."""
    hf = make_nemotron_h(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["hybrid_override_pattern"] = "M*-M-*"
    raw["mamba_n_groups"], raw["mamba_d_conv"] = raw.pop("n_groups"), raw.pop("conv_kernel")
    del raw["layers_block_type"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    from safetensors.torch import load_file, save_file

    sd = load_file(tmp_path / "model.safetensors")
    sd = {k.replace("backbone.", "model.", 1): v for k, v in sd.items()}
    sd["mtp.layers.0.norm.weight"] = torch.ones(72)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    cfg, model = hybrid_from(tmp_path)
    assert cfg.layer_pattern == "MAFMFA" and cfg.ssm.ngroups == 3 and cfg.ssm.d_conv == 3
    ids = ids_for()
    with torch.no_grad():
        assert rel_err(model(ids)[0], hf(ids).logits) < 1e-4


# ------------------------------------------------------------------ what hybridlm applies to an import

def test_se_attn_and_hylora_apply_to_an_imported_nemotron_h(tmp_path):
    from hybridlm.adapters import AdapterConfig, apply_adapter
    from hybridlm.adapters.recipes import lora_targets

    hf = make_nemotron_h(tmp_path)
    ckpt_cfg, sd = load_pretrained(tmp_path)
    ids = ids_for()
    with torch.no_grad():
        ref = hf(ids).logits

    def se_attn(window):
        user = ModelConfig(attn=AttentionConfig(kind="se_attn_window", window=window, block_size=4, top_k=2,
                                                query_chunk=8, scorer="mean_dot"))
        keys = {"attn.kind", "attn.window", "attn.block_size", "attn.top_k", "attn.query_chunk", "attn.scorer"}
        model = HybridLM(merge_model_config(ckpt_cfg, user, keys)).eval()
        load_state_dict_checked(model, sd)
        with torch.no_grad():
            return model(ids)[0]

    assert rel_err(se_attn(64), ref) < 1e-4  # the window holds all 37 tokens: full attention
    assert rel_err(se_attn(8), ref) > 1e-3  # a short window and retrieval compute something else

    model = HybridLM(ckpt_cfg)
    load_state_dict_checked(model, sd)
    apply_adapter(model, AdapterConfig(name="hylora", r=4))
    targets = lora_targets(model, AdapterConfig(name="hylora"))
    assert sorted({int(t.split(".")[2]) for t in targets}) == [1, 5]  # the attention layers only (the paper's HyLoRA)
    with torch.no_grad():
        assert rel_err(model.eval()(ids)[0], ref) < 1e-4  # LoRA B starts at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(".mlp." in n for n in trainable)  # the F layers' MLPs stay frozen
    assert {"backbone.layers.0.mixer.conv1d.weight", "backbone.layers.3.mixer.conv1d.weight"} <= trainable
    model.train()
    model(ids)[0].logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if "lora_B" in n), "every LoRA B gets a gradient"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["hf_nemotron_h", "hf_bamba"])
def test_fine_tune_an_imported_checkpoint_and_export_it_back(tmp_path, fmt):
    """python -m hybridlm.train init_from=<transformers dir> with HyLoRA and state passing, then the trained
    checkpoint exports back to the same format and loads in transformers."""
    from hybridlm.export import main

    src = tmp_path / "src"
    vocab = 260  # the byte tokenizer's vocabulary fits
    if fmt == "hf_nemotron_h":
        make_nemotron_h(src, vocab=vocab)
    else:
        make_bamba(src, vocab=vocab)
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run(
        [sys.executable, "-m", "hybridlm.train", f"init_from={src}", "adapter=hylora", "intervention=state_passing",
         "data.seq_len=32", "data.batch_size=2", "data.val_batches=2", "trainer.max_steps=2",
         "trainer.val_check_interval=2", "logger=csv", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    cfg, _ = load_pretrained(last)
    assert cfg == load_pretrained(src)[0]
    out = main([f"ckpt_path={last}", f"out={tmp_path / 'out'}", f"format={fmt}"])
    cls = modeling_nemotron_h.NemotronHForCausalLM if fmt == "hf_nemotron_h" else modeling_bamba.BambaForCausalLM
    _, ours = hybrid_from(out)
    ids = ids_for(vocab=vocab)
    with torch.no_grad():
        assert rel_err(cls.from_pretrained(out).eval()(ids).logits, ours(ids)[0]) < 1e-4


# ------------------------------------------------------------------ model features these formats brought

@pytest.mark.parametrize("activation,bias", [("relu2", True), ("swiglu", False)])
def test_f_layers_follow_the_state_contract(activation, bias):
    """An F layer is stateless: its entry is {} from zero_state and from forward, and pieces still equal one pass."""
    cfg = ModelConfig(d_model=40, layer_pattern="MFAF", vocab_size=50, d_ffn=56, d_intermediate=24,
                      mlp_activation=activation, mlp_bias=bias, ssm=SSMConfig(d_state=8, headdim=16, chunk_size=8),
                      attn=AttentionConfig(kind="swa", num_heads=4, window=6, rotary_emb_dim=4))
    model = random_hybrid(cfg).double()
    zero = model.zero_state(2)
    assert zero[1] == {} and zero[3] == {} and "ssm" in zero[0] and "k" in zero[2]
    assert model.backbone.layers[1].mixer is None and not hasattr(model.backbone.layers[1], "norm2")
    ids = ids_for(b=2, length=21, vocab=50)
    with torch.no_grad():
        full, final = model(ids)
        outs, state = [], zero
        for a, b in [(0, 1), (1, 3), (3, 11), (11, 21)]:
            logits, state = model(ids[:, a:b], state)
            outs.append(logits)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-9, atol=1e-9)
    assert final[1] == {} and state[3] == {}
    torch.testing.assert_close(state[0]["ssm"], final[0]["ssm"], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("changes,key", [
    (dict(layer_pattern="MF"), "model.d_ffn"),
    (dict(mlp_activation="gelu"), "model.mlp_activation"),
    (dict(d_ffn=-1), "model.d_ffn"),
    (dict(ssm=SSMConfig(d_inner=0)), "model.ssm.d_inner"),
    (dict(ssm=SSMConfig(d_inner=100, headdim=32)), "model.ssm.headdim"),
])
def test_new_model_keys_are_validated(changes, key):
    with pytest.raises(ValueError, match=f"^{key}:"):
        ModelConfig(**changes).validate()


def test_ssm_d_inner_sets_the_mamba_width():
    model = HybridLM(ModelConfig(d_model=40, layer_pattern="M", ssm=SSMConfig(d_inner=48, headdim=16, ngroups=3)))
    mixer = model.mamba_layers()[0][1]
    assert (mixer.d_inner, mixer.nheads, mixer.out_proj.in_features) == (48, 3, 48)
