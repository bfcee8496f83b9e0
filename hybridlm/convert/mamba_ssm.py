"""mamba_ssm: a directory as `MambaLMHeadModel.save_pretrained` writes it (config.json with `MambaConfig` fields
+ pytorch_model.bin, or model.safetensors). hybridlm's parameter names are mamba_ssm's, so its weights load
unchanged; only an MLP width that is not a multiple of 128 needs padding on export. Every conversion either
reproduces the source model's computation or refuses with a message saying why."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from hybridlm.checkpointing.io import CheckpointError
from hybridlm.convert.base import INF, Checkpoint, Format, StateDict, json_float, refuse, validated
from hybridlm.convert.files import read_json, read_weights, save_safetensors, write_json
from hybridlm.convert.state_dict import cpu_state_dict, drop_tied
from hybridlm.models.config import ModelConfig
from hybridlm.models.hybrid_lm import HybridLM

NAME = "mamba_ssm"

# MambaConfig (mamba_ssm/models/config_mamba.py) defaults for keys a config.json may omit.
_MAMBA_CONFIG_DEFAULTS = dict(d_model=2560, d_intermediate=0, n_layer=64, vocab_size=50277, ssm_cfg={},
                              attn_layer_idx=[], attn_cfg={}, rms_norm=True, residual_in_fp32=True,
                              fused_add_norm=True, pad_vocab_size_multiple=8, tie_embeddings=True)
# mamba_ssm.modules.mamba2.Mamba2 defaults for the keys we map onto SSMConfig.
_MAMBA2_DEFAULTS = dict(d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256,
                        A_init_range=(1.0, 16.0), dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4,
                        dt_limit=(0.0, INF), bias=False, conv_bias=True, norm_before_gate=False)
# Mamba2 kwargs that only change initialisation, kernels or sharding, never the function computed.
_MAMBA2_NEUTRAL = {"conv_init", "use_mem_eff_path", "sequence_parallel", "process_group"}
# mamba_ssm.modules.mha.MHA defaults (note: biases default to True there, unlike AttentionConfig).
_MHA_DEFAULTS = dict(num_heads=None, num_heads_kv=None, head_dim=None, mlp_dim=0, qkv_proj_bias=True,
                     out_proj_bias=True, softmax_scale=None, causal=False, d_conv=0, rotary_emb_dim=0,
                     rotary_emb_base=10000.0, rotary_emb_interleaved=False)
# mamba_ssm's GatedMLP rounds its hidden size up to this; MHA rounds its fused mlp_dim up to 256.
_MLP_MULTIPLE = 128
# MambaLMHeadModel does not pass norm_epsilon on, so every norm uses the default.
_MAMBA_NORM_EPS = 1e-5


def matches(config: dict) -> bool:
    """A MambaConfig: no transformers model_type, and the two keys every MambaConfig has."""
    return "d_model" in config and "n_layer" in config


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def _with_defaults(section: dict, defaults: dict, source: Path, name: str, extra_ok: set[str] = frozenset()) -> dict:
    unknown = sorted(set(section) - set(defaults) - set(extra_ok))
    if unknown:
        raise CheckpointError(f"{source}: unknown {name} key(s) {unknown}; supported: {sorted(defaults)}")
    return {**defaults, **section}


# ---------------------------------------------------------------------------------------------- config

def import_config(raw: dict, source: Path) -> ModelConfig:
    """config.json of a MambaLMHeadModel -> ModelConfig (refuses what HybridLM cannot compute)."""
    c = _with_defaults(raw, _MAMBA_CONFIG_DEFAULTS, source, "config")
    if not c["rms_norm"]:
        refuse(source, "rms_norm", False, "hybridlm uses RMSNorm; LayerNorm blocks are not implemented")
    n_layer, attn_idx = int(c["n_layer"]), sorted(int(i) for i in c["attn_layer_idx"])
    bad = [i for i in attn_idx if not 0 <= i < n_layer]
    if bad:
        refuse(source, "attn_layer_idx", bad, f"indices must lie in [0, n_layer={n_layer})")
    pattern = "".join("A" if i in attn_idx else "M" for i in range(n_layer))
    cfg = ModelConfig(
        d_model=int(c["d_model"]), layer_pattern=pattern, vocab_size=int(c["vocab_size"]),
        d_intermediate=_round_up(int(c["d_intermediate"]), _MLP_MULTIPLE), norm_epsilon=_MAMBA_NORM_EPS,
        pad_vocab_size_multiple=int(c["pad_vocab_size_multiple"]), tie_embeddings=bool(c["tie_embeddings"]),
        residual_in_fp32=bool(c["residual_in_fp32"]),
    )
    if "M" in pattern:
        _apply_mamba2_cfg(cfg, dict(c["ssm_cfg"]), source)
    if "A" in pattern:
        _apply_mha_cfg(cfg, dict(c["attn_cfg"]), source)
    return validated(cfg, source)


def _apply_mamba2_cfg(cfg: ModelConfig, ssm_cfg: dict, source: Path) -> None:
    layer = ssm_cfg.pop("layer", "Mamba1")  # mamba_ssm's create_block defaults to Mamba-1
    if layer != "Mamba2":
        refuse(source, "ssm_cfg.layer", layer, "hybridlm implements the Mamba-2 mixer only")
    s = _with_defaults(ssm_cfg, _MAMBA2_DEFAULTS, source, "ssm_cfg",
                       extra_ok=_MAMBA2_NEUTRAL | {"rmsnorm", "D_has_hdim", "d_ssm"})
    if not s.get("rmsnorm", True):
        refuse(source, "ssm_cfg.rmsnorm", False, "hybridlm's Mamba-2 always applies the gated RMSNorm")
    if s.get("D_has_hdim", False):
        refuse(source, "ssm_cfg.D_has_hdim", True, "hybridlm's D has one value per head")
    d_inner = int(s["expand"]) * cfg.d_model
    if s.get("d_ssm") not in (None, d_inner):
        refuse(source, "ssm_cfg.d_ssm", s["d_ssm"], f"partial SSM (d_ssm < d_inner = {d_inner}) is not implemented")
    for key in _MAMBA2_DEFAULTS:
        value = s[key]
        value = tuple(json_float(v) for v in value) if isinstance(value, (list, tuple)) else value
        setattr(cfg.ssm, key, value)


def _apply_mha_cfg(cfg: ModelConfig, attn_cfg: dict, source: Path) -> None:
    a = _with_defaults(attn_cfg, _MHA_DEFAULTS, source, "attn_cfg")
    if a["num_heads"] is None:
        raise CheckpointError(f"{source}: attn_cfg.num_heads is required when attn_layer_idx is not empty")
    if not a["causal"]:
        refuse(source, "attn_cfg.causal", a["causal"], "a language model needs causal attention "
               "(mamba_ssm's MHA defaults to causal=False, so the key must be set)")
    if math.ceil(a["mlp_dim"] / 256) * 256 > 0:
        refuse(source, "attn_cfg.mlp_dim", a["mlp_dim"],
               "hybridlm's attention mixer has no MLP branch fused into in_proj/out_proj")
    if a["rotary_emb_interleaved"]:
        refuse(source, "attn_cfg.rotary_emb_interleaved", True, "hybridlm's rotary is non-interleaved (GPT-NeoX)")
    head_dim = a["head_dim"] or cfg.d_model // a["num_heads"]
    if a["softmax_scale"] is not None and not math.isclose(a["softmax_scale"], head_dim ** -0.5, rel_tol=1e-6):
        refuse(source, "attn_cfg.softmax_scale", a["softmax_scale"],
               f"hybridlm uses 1/sqrt(head_dim) = {head_dim ** -0.5}")
    at = cfg.attn
    at.kind = "full"  # MHA is full causal attention; a sliding window can be chosen later as an override
    at.num_heads, at.num_heads_kv, at.head_dim = int(a["num_heads"]), a["num_heads_kv"], a["head_dim"]
    at.qkv_proj_bias, at.out_proj_bias = bool(a["qkv_proj_bias"]), bool(a["out_proj_bias"])
    at.d_conv, at.rotary_emb_dim = int(a["d_conv"]), int(a["rotary_emb_dim"])
    at.rotary_emb_base = float(a["rotary_emb_base"])


def _refuse_unexpressible(cfg: ModelConfig) -> None:
    """MLP-only layers, other MLPs than the bias-free SiLU-gated one, and a Mamba-2 width other than expand *
    d_model (NemotronH imports) have no MambaConfig equivalent."""
    why = []
    if "F" in cfg.layer_pattern:
        why.append(f"layer_pattern {cfg.layer_pattern!r} has MLP-only F layers")
    if cfg.d_intermediate > 0 and (cfg.mlp_activation != "swiglu" or cfg.mlp_bias):
        why.append(f"mlp_activation = {cfg.mlp_activation!r}, mlp_bias = {cfg.mlp_bias} (GatedMLP is swiglu, no bias)")
    if "M" in cfg.layer_pattern and cfg.ssm.d_inner not in (None, cfg.ssm.expand * cfg.d_model):
        why.append(f"ssm.d_inner = {cfg.ssm.d_inner} (Mamba2's is expand * d_model = {cfg.ssm.expand * cfg.d_model})")
    if why:
        raise CheckpointError("cannot export to mamba_ssm: " + "; ".join(why))


def export_config(cfg: ModelConfig, allow_full_attention: bool = False) -> dict:
    """ModelConfig -> the config.json of an equivalent MambaLMHeadModel (refuses what it cannot express)."""
    if cfg.norm_epsilon != _MAMBA_NORM_EPS:
        raise CheckpointError(f"model.norm_epsilon = {cfg.norm_epsilon} cannot be exported to mamba_ssm: "
                              f"MambaLMHeadModel always uses {_MAMBA_NORM_EPS}")
    _refuse_unexpressible(cfg)
    s, a = cfg.ssm, cfg.attn
    ssm_cfg = {"layer": "Mamba2", **{k: getattr(s, k) for k in _MAMBA2_DEFAULTS if k != "dt_limit"}}
    if tuple(s.dt_limit) != (0.0, INF):  # Mamba2 compares with the default tuple; a list would never match
        ssm_cfg["dt_limit"] = list(s.dt_limit)
    attn_cfg: dict = {}
    if "A" in cfg.layer_pattern:
        if a.kind != "full" and not allow_full_attention:
            raise CheckpointError(
                f"model.attn.kind = {a.kind!r}: mamba_ssm's MHA only computes full causal attention, so the "
                "exported model would compute something else; pass allow_full_attention=true to export anyway")
        attn_cfg = dict(num_heads=a.num_heads, qkv_proj_bias=a.qkv_proj_bias, out_proj_bias=a.out_proj_bias,
                        causal=True, d_conv=a.d_conv, rotary_emb_dim=a.rotary_emb_dim,
                        rotary_emb_base=a.rotary_emb_base)
        # None means "derived" in both libraries (num_heads / d_model // num_heads); keep it so.
        attn_cfg.update({k: getattr(a, k) for k in ("num_heads_kv", "head_dim") if getattr(a, k) is not None})
    return dict(
        d_model=cfg.d_model, d_intermediate=_round_up(cfg.d_intermediate, _MLP_MULTIPLE), n_layer=cfg.n_layer,
        vocab_size=cfg.vocab_size, ssm_cfg=ssm_cfg,
        attn_layer_idx=[i for i, k in enumerate(cfg.layer_pattern) if k == "A"], attn_cfg=attn_cfg,
        rms_norm=True, residual_in_fp32=cfg.residual_in_fp32, fused_add_norm=True,
        pad_vocab_size_multiple=cfg.pad_vocab_size_multiple, tie_embeddings=cfg.tie_embeddings,
    )


# --------------------------------------------------------------------------------------------- weights

def export_weights(cfg: ModelConfig, sd: StateDict) -> StateDict:
    """HybridLM state dict -> MambaLMHeadModel's. Names are shared; only an MLP hidden size that is not a
    multiple of 128 needs work: mamba_ssm's GatedMLP rounds it up, so we pad with zero rows/columns, which
    add y = 0 * silu(0) = 0 channels and leave the output unchanged. (Import needs no weight conversion: the
    names are ours and import_config rounds d_intermediate up the same way.)"""
    out = dict(sd)
    pad = _round_up(cfg.d_intermediate, _MLP_MULTIPLE) - cfg.d_intermediate
    if pad:
        for key in [k for k in sd if k.endswith(".mlp.fc1.weight")]:
            y, gate = sd[key].chunk(2, dim=0)  # (d_intermediate, d_model) each
            z = y.new_zeros(pad, y.shape[1])
            out[key] = torch.cat([y, z, gate, z], dim=0)
        for key in [k for k in sd if k.endswith(".mlp.fc2.weight")]:
            w = sd[key]  # (d_model, d_intermediate)
            out[key] = torch.cat([w, w.new_zeros(w.shape[0], pad)], dim=1)
    return out


# ------------------------------------------------------------------------------------------ directory

def load(directory: Path) -> Checkpoint:
    config_path = directory / "config.json"
    return Checkpoint(NAME, directory, import_config(read_json(config_path), config_path), read_weights(directory))


def save(model: HybridLM, cfg: ModelConfig, out: Path, allow_full_attention: bool) -> None:
    """config.json + model.safetensors + pytorch_model.bin, the only weights file
    `MambaLMHeadModel.from_pretrained` reads."""
    config = export_config(cfg, allow_full_attention)  # refuses before anything is written
    out.mkdir(parents=True, exist_ok=True)
    weights = export_weights(cfg, cpu_state_dict(model))
    save_safetensors(drop_tied(weights, model), out / "model.safetensors")
    # mamba_ssm loads strictly: keep every name, tied lm_head included (torch.save keeps the sharing).
    torch.save({k: v.contiguous() for k, v in weights.items()}, out / "pytorch_model.bin")
    write_json(config, out / "config.json")


FORMAT = Format(NAME, load, save, matches=matches)
