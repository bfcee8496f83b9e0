"""hf_nemotron_h: a transformers `NemotronHForCausalLM` directory (config.json with model_type "nemotron_h" +
safetensors), NVIDIA's successor to Mamba-2-Hybrid.

Each NemotronH layer is one pre-norm residual block holding one of: a Mamba-2 mixer ("linear_attention", "M"
in NVIDIA's `hybrid_override_pattern`), attention ("full_attention", "*"), a non-gated MLP ("mlp", "-") or a
mixture of experts ("moe", "E"). They map onto layer_pattern letters M, A, F (MoE is refused); there is no MLP
after a mixer (d_intermediate = 0). What transformers 5.24 computes, and so what is imported:
- Mamba-2 as ours, with nheads = mamba_num_heads, headdim = mamba_head_dim (their product need not be
  expand * hidden_size: it becomes ssm.d_inner), the gated RMSNorm over n_groups groups with eps
  layer_norm_epsilon, in_proj / out_proj bias `use_bias` (`mamba_proj_bias` is unused), and dt clamped below
  at time_step_min (the mixer's time_step_limit is (time_step_min, inf), whatever the config's
  `time_step_limit` says). Its torch decode step (one token with a cache) skips that clamp; its chunked
  forward and mamba_ssm's kernels apply it, as hybridlm always does.
- Attention: separate q/k/v/o projections without bias (`attention_bias` is unused) and without RoPE, grouped
  KV heads, head_dim from the config, full causal (`sliding_window` is unused).
- MLP: up_proj -> relu(.)^2 -> down_proj, bias `mlp_bias`.
- Norms: RMSNorm with eps layer_norm_epsilon; residual in the activations' dtype (`residual_in_fp32` is
  unused), lm_head never tied to the embeddings (the class ties nothing, whatever `tie_word_embeddings` says).
- Multi-token-prediction weights (`mtp.*`, num_nextn_predict_layers > 0) are not part of the forward and are
  dropped, as transformers does.
The weights are stored under `backbone.` (NVIDIA's names; transformers renames them to `model.` in memory and
back when saving); both prefixes are read, `backbone.` is written.
"""
from __future__ import annotations

from pathlib import Path

import torch

from hybridlm.checkpointing.io import CheckpointError
from hybridlm.convert.base import INF, Checkpoint, Format, StateDict, refuse, validated
from hybridlm.convert.files import read_json, read_weights, save_safetensors, write_json
from hybridlm.convert.state_dict import cpu_state_dict
from hybridlm.models.config import ModelConfig
from hybridlm.models.hybrid_lm import HybridLM

NAME = "hf_nemotron_h"
MODEL_TYPE = "nemotron_h"

# transformers NemotronHConfig defaults for the keys we read (layers_block_type's default holds a MoE layer).
_HF_DEFAULTS = dict(vocab_size=131072, hidden_size=4096, tie_word_embeddings=False, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128, intermediate_size=21504, mlp_hidden_act="relu2",
                    mlp_bias=False, ssm_state_size=128, mamba_num_heads=128, mamba_head_dim=64,
                    mamba_hidden_act="silu", n_groups=8, conv_kernel=4, expand=2, time_step_min=0.001,
                    time_step_max=0.1, time_step_floor=1e-4, use_conv_bias=True, chunk_size=128, use_bias=False,
                    initializer_range=0.02, layer_norm_epsilon=1e-5,
                    layers_block_type=["linear_attention", "moe", "full_attention", "mlp"])
# Older config.json names that NemotronHConfig still reads (its __post_init__).
_LEGACY_KEYS = dict(mamba_n_groups="n_groups", mamba_d_conv="conv_kernel", mamba_expand="expand",
                    mamba_dt_min="time_step_min", mamba_dt_max="time_step_max", mamba_dt_init_floor="time_step_floor",
                    mamba_conv_bias="use_conv_bias", mamba_chunk_size="chunk_size")
_BLOCK_TYPES = {"linear_attention": "M", "full_attention": "A", "mlp": "F"}
_PATTERN_CHARS = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
# hybridlm's Mamba-2 gated norm uses eps 1e-5 (as mamba_ssm); NemotronH uses layer_norm_epsilon there too.
_GATED_NORM_EPS = 1e-5


# ---------------------------------------------------------------------------------------------- config

def _block_types(raw: dict, source: Path) -> list:
    """The layer types, from `layers_block_type` (transformers 5), `layer_types` (its alias) or, failing both,
    NVIDIA's `hybrid_override_pattern` string (M, *, -, E)."""
    if raw.get("layers_block_type") is not None:
        return list(raw["layers_block_type"])
    if raw.get("layer_types") is not None:
        return list(raw["layer_types"])
    if raw.get("hybrid_override_pattern") is not None:
        pattern = str(raw["hybrid_override_pattern"])
        bad = sorted(set(pattern) - set(_PATTERN_CHARS))
        if bad:
            refuse(source, "hybrid_override_pattern", pattern, f"unknown layer character(s) {bad}")
        return [_PATTERN_CHARS[ch] for ch in pattern]
    return list(_HF_DEFAULTS["layers_block_type"])


def import_config(raw: dict, source: Path) -> ModelConfig:
    """config.json of a transformers NemotronHForCausalLM -> ModelConfig (refuses what HybridLM cannot compute).
    Other keys (token ids, dropout, MoE sizes with no MoE layer, init-only keys, cache dtype) change nothing
    in the forward."""
    c = {**_HF_DEFAULTS, **raw}
    c.update({new: raw[old] for old, new in _LEGACY_KEYS.items() if old in raw})  # as in transformers, these win
    types = _block_types(raw, source)
    if "moe" in types:
        refuse(source, "layers_block_type", types, "mixture-of-experts ('moe') layers are not implemented in hybridlm")
    bad = sorted(set(types) - set(_BLOCK_TYPES))
    if bad:
        refuse(source, "layers_block_type", types, f"unknown layer type(s) {bad}")
    pattern = "".join(_BLOCK_TYPES[t] for t in types)
    if c["mamba_hidden_act"] != "silu":
        refuse(source, "mamba_hidden_act", c["mamba_hidden_act"], "the Mamba-2 conv activation is SiLU in hybridlm")
    if "F" in pattern and c["mlp_hidden_act"] != "relu2":
        refuse(source, "mlp_hidden_act", c["mlp_hidden_act"], "hybridlm's non-gated MLP is relu2 only")
    if "M" in pattern and float(c["layer_norm_epsilon"]) != _GATED_NORM_EPS:
        refuse(source, "layer_norm_epsilon", c["layer_norm_epsilon"],
               f"NemotronH uses it inside the Mamba-2 gated norm, where hybridlm uses {_GATED_NORM_EPS}")
    d_model = int(c["hidden_size"])
    cfg = ModelConfig(
        d_model=d_model, layer_pattern=pattern, vocab_size=int(c["vocab_size"]), d_intermediate=0,
        d_ffn=int(c["intermediate_size"]) if "F" in pattern else 0, mlp_activation="relu2",
        mlp_bias=bool(c["mlp_bias"]), pad_vocab_size_multiple=1,  # HF embeddings hold exactly vocab_size rows
        tie_embeddings=False, norm_epsilon=float(c["layer_norm_epsilon"]), residual_in_fp32=False,
        initializer_range=float(c["initializer_range"]),
    )
    s = cfg.ssm
    s.d_state, s.d_conv, s.headdim = int(c["ssm_state_size"]), int(c["conv_kernel"]), int(c["mamba_head_dim"])
    s.ngroups, s.chunk_size, s.expand = int(c["n_groups"]), int(c["chunk_size"]), int(c["expand"])
    d_inner = int(c["mamba_num_heads"]) * s.headdim
    s.d_inner = None if d_inner == s.expand * d_model else d_inner
    t_min, t_max = float(c["time_step_min"]), float(c["time_step_max"])
    s.dt_limit = (t_min, INF)
    if 0 < t_min <= t_max:  # init-only keys (a fine-tune never re-initialises): keep ours when theirs are unusable
        s.dt_min, s.dt_max = t_min, t_max
    s.dt_init_floor = float(c["time_step_floor"])
    s.bias, s.conv_bias, s.norm_before_gate = bool(c["use_bias"]), bool(c["use_conv_bias"]), False
    a = cfg.attn
    a.kind, a.rotary_emb_dim, a.d_conv, a.qkv_proj_bias, a.out_proj_bias = "full", 0, 0, False, False
    a.num_heads = int(c["num_attention_heads"])
    a.num_heads_kv = int(c["num_key_value_heads"] or a.num_heads)
    a.head_dim = int(c["head_dim"] or d_model // a.num_heads)
    return validated(cfg, source)


def export_config(cfg: ModelConfig, allow_full_attention: bool = False) -> dict:
    """ModelConfig -> config.json of an equivalent transformers NemotronHForCausalLM (refuses what it cannot
    express)."""
    pattern, s, a = cfg.layer_pattern, cfg.ssm, cfg.attn
    why = []
    if cfg.d_intermediate > 0:
        why.append(f"d_intermediate = {cfg.d_intermediate} (NemotronH has no MLP after a mixer; use F layers)")
    if "F" in pattern and cfg.mlp_activation != "relu2":
        why.append(f"mlp_activation = {cfg.mlp_activation!r} (NemotronH's MLP is relu2, non-gated)")
    if "M" in pattern:
        if cfg.norm_epsilon != _GATED_NORM_EPS:
            why.append(f"norm_epsilon = {cfg.norm_epsilon} (NemotronH would use it in the Mamba-2 gated norm, "
                       f"where hybridlm uses {_GATED_NORM_EPS})")
        if s.norm_before_gate:
            why.append("ssm.norm_before_gate = true (NemotronH gates before the norm)")
        if s.dt_limit[1] != INF:
            why.append(f"ssm.dt_limit = {tuple(s.dt_limit)} (NemotronH has no upper dt limit)")
    if "A" in pattern:
        if a.rotary_emb_dim != 0:
            why.append(f"attn.rotary_emb_dim = {a.rotary_emb_dim} (NemotronH attention has no RoPE)")
        if a.qkv_proj_bias or a.out_proj_bias:
            why.append("attn.qkv_proj_bias / attn.out_proj_bias (NemotronH attention has no bias)")
        if a.d_conv > 0:
            why.append(f"attn.d_conv = {a.d_conv} (NemotronH attention has no qkv conv)")
        if a.kind != "full" and not allow_full_attention:
            why.append(f"attn.kind = {a.kind!r} (NemotronH attention is full causal; pass allow_full_attention=true "
                       "to export anyway)")
    if why:
        raise CheckpointError("cannot export to hf_nemotron_h: " + "; ".join(why))
    d_inner = s.expand * cfg.d_model if s.d_inner is None else s.d_inner
    return dict(
        architectures=["NemotronHForCausalLM"], model_type=MODEL_TYPE,
        hidden_size=cfg.d_model, vocab_size=cfg.vocab_size,
        layers_block_type=[{"M": "linear_attention", "A": "full_attention", "F": "mlp"}[k] for k in pattern],
        num_attention_heads=a.num_heads, num_key_value_heads=a.num_heads_kv or a.num_heads,
        head_dim=a.head_dim or cfg.d_model // a.num_heads, attention_bias=False,
        intermediate_size=cfg.d_ffn, mlp_hidden_act="relu2", mlp_bias=cfg.mlp_bias,
        ssm_state_size=s.d_state, mamba_num_heads=d_inner // s.headdim, mamba_head_dim=s.headdim,
        mamba_hidden_act="silu", n_groups=s.ngroups, conv_kernel=s.d_conv, expand=s.expand, chunk_size=s.chunk_size,
        # The mixer clamps dt below at time_step_min (0 loads fine; only a fresh init needs it positive).
        time_step_min=s.dt_limit[0], time_step_max=s.dt_max, time_step_floor=s.dt_init_floor,
        time_step_limit=list(s.dt_limit), use_conv_bias=s.conv_bias, use_bias=s.bias, mamba_proj_bias=s.bias,
        layer_norm_epsilon=cfg.norm_epsilon, residual_in_fp32=cfg.residual_in_fp32,
        tie_word_embeddings=False,  # lm_head is written as its own tensor: NemotronH ties nothing
        initializer_range=cfg.initializer_range, num_nextn_predict_layers=0,
        # The tokenizer decides these; transformers' defaults (0, 1, 2) would be arbitrary here.
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


# --------------------------------------------------------------------------------------------- weights

def import_weights(cfg: ModelConfig, sd: StateDict) -> StateDict:
    """NemotronH names -> HybridLM's. Attention q/k/v are fused into in_proj (rows [q, k, v], as Attention
    splits them); an F layer's mixer.up_proj / down_proj become mlp.fc1 / fc2. Unknown names pass through, so
    load_state_dict_checked reports them."""
    out: StateDict = {}
    for key, value in sd.items():
        if key.startswith(("mtp.", "model.mtp.", "backbone.mtp.")):
            continue
        for prefix in ("backbone.", "model."):
            if key.startswith(prefix):
                key = "backbone." + key[len(prefix):]
                break
        if key == "backbone.embeddings.weight":
            key = "backbone.embedding.weight"
        parts = key.split(".")
        if len(parts) >= 5 and parts[:2] == ["backbone", "layers"] and parts[2].isdigit() and parts[3] == "mixer":
            kind = cfg.layer_pattern[int(parts[2])] if int(parts[2]) < cfg.n_layer else None
            head, name = ".".join(parts[:3]), ".".join(parts[4:])
            if kind == "F" and name.split(".")[0] in ("up_proj", "down_proj"):
                key = f"{head}.mlp.{'fc1' if name.startswith('up_proj') else 'fc2'}.{name.split('.', 1)[1]}"
            elif kind == "A" and name.split(".")[0] == "o_proj":
                key = f"{head}.mixer.out_proj.{name.split('.', 1)[1]}"
        out[key] = value
    # Fuse q/k/v: one in_proj.<param> per attention layer, when all three parts are present.
    for i, kind in enumerate(cfg.layer_pattern):
        if kind != "A":
            continue
        for param in ("weight", "bias"):
            names = [f"backbone.layers.{i}.mixer.{p}_proj.{param}" for p in "qkv"]
            if all(n in out for n in names):
                out[f"backbone.layers.{i}.mixer.in_proj.{param}"] = torch.cat([out.pop(n) for n in names], dim=0)
    return out


def export_weights(cfg: ModelConfig, sd: StateDict) -> StateDict:
    """HybridLM state dict (every name, tied lm_head included) -> NemotronH's, on disk under `backbone.`.
    The padded vocabulary rows (never produced by the tokenizer, sliced off our logits) are cut."""
    out: StateDict = {}
    a = cfg.attn
    hd = a.head_dim or cfg.d_model // a.num_heads
    sizes = [a.num_heads * hd, (a.num_heads_kv or a.num_heads) * hd, (a.num_heads_kv or a.num_heads) * hd]
    for key, value in sd.items():
        if key in ("backbone.embedding.weight", "lm_head.weight"):
            # clone: a tied lm_head is the embedding's storage, and safetensors refuses shared tensors
            out[key.replace("embedding.", "embeddings.")] = value[: cfg.vocab_size].clone()
            continue
        parts = key.split(".")
        if parts[:2] == ["backbone", "layers"] and len(parts) >= 5:
            head, kind, sub, rest = ".".join(parts[:3]), cfg.layer_pattern[int(parts[2])], parts[3], parts[4:]
            if kind == "F" and sub == "mlp":
                key = f"{head}.mixer.{'up_proj' if rest[0] == 'fc1' else 'down_proj'}.{'.'.join(rest[1:])}"
            elif kind == "A" and sub == "mixer" and rest[0] == "in_proj":
                for p, part in zip("qkv", torch.split(value, sizes, dim=0)):
                    out[f"{head}.mixer.{p}_proj.{'.'.join(rest[1:])}"] = part.clone()
                continue
            elif kind == "A" and sub == "mixer" and rest[0] == "out_proj":
                key = f"{head}.mixer.o_proj.{'.'.join(rest[1:])}"
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------ directory

def load(directory: Path) -> Checkpoint:
    config_path = directory / "config.json"
    cfg = import_config(read_json(config_path), config_path)
    return Checkpoint(NAME, directory, cfg, import_weights(cfg, read_weights(directory)))


def save(model: HybridLM, cfg: ModelConfig, out: Path, allow_full_attention: bool) -> None:
    """config.json + model.safetensors for `NemotronHForCausalLM.from_pretrained`."""
    config = export_config(cfg, allow_full_attention)  # refuses before anything is written
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(export_weights(cfg, cpu_state_dict(model)), out / "model.safetensors")
    write_json(config, out / "config.json")


FORMAT = Format(NAME, load, save, model_type=MODEL_TYPE)
