"""Read and convert checkpoints (DESIGN.md §7).

Three formats:
- `hybridlm`: our Lightning `.ckpt` (the model config under `hyper_parameters["cfg"]["model"]` as a plain
  dict, the HybridLM weights under the `model.` prefix of `state_dict`).
- `mamba_ssm`: a directory as `MambaLMHeadModel.save_pretrained` writes it (config.json with `MambaConfig`
  fields + pytorch_model.bin, or model.safetensors). hybridlm's parameter names are mamba_ssm's, so its
  weights load unchanged.
- `hf_mamba2`: a transformers `Mamba2ForCausalLM` directory (config.json with model_type "mamba2"); its
  names differ from ours only in `backbone.embeddings` (plural), and its vocabulary is not padded.

Weights are read with safetensors or `torch.load(weights_only=True)`: opening a checkpoint never runs code.
Every conversion either reproduces the source model's computation or refuses with a message saying why.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import re
import shutil
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from hybridlm.models.config import ModelConfig

log = logging.getLogger(__name__)

StateDict = dict[str, Tensor]
INF = float("inf")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit; the message names the file or the key."""


# ----------------------------------------------------------------------------------------------- files

def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file (UnpicklingError, RuntimeError, EOFError)
        raise CheckpointError(
            f"{path}: cannot read with torch.load(weights_only=True) ({type(e).__name__}: {e}). The file is "
            "truncated or corrupt, or it pickles Python objects other than tensors and plain containers, "
            "which hybridlm refuses to unpickle") from e


def _read_safetensors(path: Path) -> StateDict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError / OSError / ValueError for truncated or garbage files
        raise CheckpointError(f"{path}: cannot read safetensors ({type(e).__name__}: {e})") from e


def _read_weight_file(path: Path) -> StateDict:
    sd = _read_safetensors(path) if path.suffix == ".safetensors" else _torch_load(path)
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a flat dict of tensors")
    return sd


# Preference order; the *.index.json variants list the shards of a large checkpoint.
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "pytorch_model.bin.index.json")


def read_weights(directory: Path) -> StateDict:
    """All tensors of a Hugging Face-style checkpoint directory (single file or shards)."""
    for name in _WEIGHT_FILES:
        path = directory / name
        if not path.exists():
            continue
        if not name.endswith(".index.json"):
            return _read_weight_file(path)
        weight_map = _read_json(path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{path}: no 'weight_map' object")
        sd: StateDict = {}
        for shard in sorted(set(weight_map.values())):
            sd.update(_read_weight_file(directory / shard))
        missing = sorted(set(weight_map) - set(sd))
        if missing:
            raise CheckpointError(f"{path}: tensors listed in the index but absent from the shards: {missing}")
        return sd
    found = sorted(p.name for p in directory.iterdir())
    raise CheckpointError(f"{directory}: no weights file (looked for {', '.join(_WEIGHT_FILES)}; found {found})")


# ------------------------------------------------------------------------------------ config <-> dict

def model_config_from_dict(data: dict, where: str = "model") -> ModelConfig:
    """A plain dict (as stored in a Lightning checkpoint) -> ModelConfig. Unknown keys are refused; lists
    become tuples where the dataclass holds a tuple (JSON/YAML have no tuples)."""
    def build(cls: type, values: dict, prefix: str) -> Any:
        defaults = cls()
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise CheckpointError(f"{prefix}: unknown config key(s) {unknown}")
        kwargs = {}
        for key, value in values.items():
            default = getattr(defaults, key)
            if dataclasses.is_dataclass(default):
                value = build(type(default), dict(value), f"{prefix}.{key}")
            elif isinstance(default, tuple):
                value = tuple(value)
            kwargs[key] = value
        return cls(**kwargs)

    return build(ModelConfig, dict(data), where)


def _json_float(v: Any) -> float:
    """transformers writes inf as {"__float__": "Infinity"}; plain JSON readers give floats or strings."""
    if isinstance(v, dict) and "__float__" in v:
        v = v["__float__"]
    return float(v)


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def _refuse(source: Path, key: str, value: Any, why: str) -> NoReturn:
    raise CheckpointError(f"{source}: {key} = {value!r} is not supported: {why}")


# --------------------------------------------------------------------------------------------- mamba_ssm

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


def _with_defaults(section: dict, defaults: dict, source: Path, name: str, extra_ok: set[str] = frozenset()) -> dict:
    unknown = sorted(set(section) - set(defaults) - set(extra_ok))
    if unknown:
        raise CheckpointError(f"{source}: unknown {name} key(s) {unknown}; supported: {sorted(defaults)}")
    return {**defaults, **section}


def from_mamba_ssm_config(raw: dict, source: Path) -> ModelConfig:
    """config.json of a MambaLMHeadModel -> ModelConfig (refuses what HybridLM cannot compute)."""
    c = _with_defaults(raw, _MAMBA_CONFIG_DEFAULTS, source, "config")
    if not c["rms_norm"]:
        _refuse(source, "rms_norm", False, "hybridlm uses RMSNorm; LayerNorm blocks are not implemented")
    n_layer, attn_idx = int(c["n_layer"]), sorted(int(i) for i in c["attn_layer_idx"])
    bad = [i for i in attn_idx if not 0 <= i < n_layer]
    if bad:
        _refuse(source, "attn_layer_idx", bad, f"indices must lie in [0, n_layer={n_layer})")
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
    cfg.validate()
    return cfg


def _apply_mamba2_cfg(cfg: ModelConfig, ssm_cfg: dict, source: Path) -> None:
    layer = ssm_cfg.pop("layer", "Mamba1")  # mamba_ssm's create_block defaults to Mamba-1
    if layer != "Mamba2":
        _refuse(source, "ssm_cfg.layer", layer, "hybridlm implements the Mamba-2 mixer only")
    s = _with_defaults(ssm_cfg, _MAMBA2_DEFAULTS, source, "ssm_cfg",
                       extra_ok=_MAMBA2_NEUTRAL | {"rmsnorm", "D_has_hdim", "d_ssm"})
    if not s.get("rmsnorm", True):
        _refuse(source, "ssm_cfg.rmsnorm", False, "hybridlm's Mamba-2 always applies the gated RMSNorm")
    if s.get("D_has_hdim", False):
        _refuse(source, "ssm_cfg.D_has_hdim", True, "hybridlm's D has one value per head")
    d_inner = int(s["expand"]) * cfg.d_model
    if s.get("d_ssm") not in (None, d_inner):
        _refuse(source, "ssm_cfg.d_ssm", s["d_ssm"], f"partial SSM (d_ssm < d_inner = {d_inner}) is not implemented")
    for key in _MAMBA2_DEFAULTS:
        value = s[key]
        value = tuple(_json_float(v) for v in value) if isinstance(value, (list, tuple)) else value
        setattr(cfg.ssm, key, value)


def _apply_mha_cfg(cfg: ModelConfig, attn_cfg: dict, source: Path) -> None:
    a = _with_defaults(attn_cfg, _MHA_DEFAULTS, source, "attn_cfg")
    if a["num_heads"] is None:
        raise CheckpointError(f"{source}: attn_cfg.num_heads is required when attn_layer_idx is not empty")
    if not a["causal"]:
        _refuse(source, "attn_cfg.causal", a["causal"], "a language model needs causal attention "
                "(mamba_ssm's MHA defaults to causal=False, so the key must be set)")
    if math.ceil(a["mlp_dim"] / 256) * 256 > 0:
        _refuse(source, "attn_cfg.mlp_dim", a["mlp_dim"],
                "hybridlm's attention mixer has no MLP branch fused into in_proj/out_proj")
    if a["rotary_emb_interleaved"]:
        _refuse(source, "attn_cfg.rotary_emb_interleaved", True, "hybridlm's rotary is non-interleaved (GPT-NeoX)")
    head_dim = a["head_dim"] or cfg.d_model // a["num_heads"]
    if a["softmax_scale"] is not None and not math.isclose(a["softmax_scale"], head_dim ** -0.5, rel_tol=1e-6):
        _refuse(source, "attn_cfg.softmax_scale", a["softmax_scale"],
                f"hybridlm uses 1/sqrt(head_dim) = {head_dim ** -0.5}")
    at = cfg.attn
    at.kind = "full"  # MHA is full causal attention; a sliding window can be chosen later as an override
    at.num_heads, at.num_heads_kv, at.head_dim = int(a["num_heads"]), a["num_heads_kv"], a["head_dim"]
    at.qkv_proj_bias, at.out_proj_bias = bool(a["qkv_proj_bias"]), bool(a["out_proj_bias"])
    at.d_conv, at.rotary_emb_dim = int(a["d_conv"]), int(a["rotary_emb_dim"])
    at.rotary_emb_base = float(a["rotary_emb_base"])


def to_mamba_ssm_config(cfg: ModelConfig, allow_full_attention: bool = False) -> dict:
    """ModelConfig -> the config.json of an equivalent MambaLMHeadModel (refuses what it cannot express)."""
    if cfg.norm_epsilon != _MAMBA_NORM_EPS:
        raise CheckpointError(f"model.norm_epsilon = {cfg.norm_epsilon} cannot be exported to mamba_ssm: "
                              f"MambaLMHeadModel always uses {_MAMBA_NORM_EPS}")
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


def to_mamba_ssm_weights(cfg: ModelConfig, sd: StateDict) -> StateDict:
    """HybridLM state dict -> MambaLMHeadModel's. Names are shared; only an MLP hidden size that is not a
    multiple of 128 needs work: mamba_ssm's GatedMLP rounds it up, so we pad with zero rows/columns, which
    add y = 0 * silu(0) = 0 channels and leave the output unchanged."""
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


# -------------------------------------------------------------------------------------------- hf_mamba2

# transformers Mamba2Config defaults for the keys we read.
_HF_DEFAULTS = dict(num_heads=128, head_dim=64, vocab_size=32768, hidden_size=4096, state_size=128,
                    num_hidden_layers=64, layer_norm_epsilon=1e-5, expand=2, conv_kernel=4, n_groups=8,
                    use_bias=False, use_conv_bias=True, hidden_act="silu", initializer_range=0.1,
                    residual_in_fp32=True, time_step_min=0.001, time_step_max=0.1, time_step_floor=1e-4,
                    time_step_limit=(0.0, INF), chunk_size=256, tie_word_embeddings=False)
# hybridlm's Mamba-2 gated norm uses eps 1e-5 (as mamba_ssm); HF uses layer_norm_epsilon there.
_GATED_NORM_EPS = 1e-5


def from_hf_mamba2_config(raw: dict, source: Path) -> ModelConfig:
    """config.json of a transformers Mamba2ForCausalLM -> ModelConfig. Other PretrainedConfig keys (token
    ids, use_cache, legacy `rms_norm` / `norm_before_gate`, which transformers' Mamba-2 ignores) are unused."""
    c = {**_HF_DEFAULTS, **raw}
    if c["hidden_act"] != "silu":
        _refuse(source, "hidden_act", c["hidden_act"], "the Mamba-2 conv activation is SiLU in hybridlm")
    if c["layer_norm_epsilon"] != _GATED_NORM_EPS:
        _refuse(source, "layer_norm_epsilon", c["layer_norm_epsilon"],
                f"transformers uses it inside the Mamba-2 gated norm, where hybridlm uses {_GATED_NORM_EPS}")
    d_model, expand, head_dim = int(c["hidden_size"]), int(c["expand"]), int(c["head_dim"])
    if int(c["num_heads"]) * head_dim != expand * d_model:
        raise CheckpointError(f"{source}: num_heads * head_dim = {c['num_heads']} * {head_dim} != "
                              f"expand * hidden_size = {expand * d_model}")
    cfg = ModelConfig(
        d_model=d_model, layer_pattern="M" * int(c["num_hidden_layers"]), vocab_size=int(c["vocab_size"]),
        d_intermediate=0, pad_vocab_size_multiple=1,  # HF embeddings hold exactly vocab_size rows
        tie_embeddings=bool(c["tie_word_embeddings"]), norm_epsilon=float(c["layer_norm_epsilon"]),
        residual_in_fp32=bool(c["residual_in_fp32"]), initializer_range=float(c["initializer_range"]),
    )
    s = cfg.ssm
    s.d_state, s.d_conv, s.expand, s.headdim = int(c["state_size"]), int(c["conv_kernel"]), expand, head_dim
    s.ngroups, s.chunk_size = int(c["n_groups"]), int(c["chunk_size"])
    s.dt_min, s.dt_max = float(c["time_step_min"]), float(c["time_step_max"])
    s.dt_init_floor = float(c["time_step_floor"])
    s.dt_limit = tuple(_json_float(v) for v in c["time_step_limit"])
    s.bias, s.conv_bias, s.norm_before_gate = bool(c["use_bias"]), bool(c["use_conv_bias"]), False
    cfg.validate()
    return cfg


def to_hf_mamba2_config(cfg: ModelConfig) -> dict:
    """ModelConfig -> config.json of an equivalent transformers Mamba2ForCausalLM (pure Mamba-2 only)."""
    why = []
    if "A" in cfg.layer_pattern:
        why.append(f"layer_pattern {cfg.layer_pattern!r} has attention layers")
    if cfg.d_intermediate > 0:
        why.append(f"d_intermediate = {cfg.d_intermediate} (Mamba2ForCausalLM has no MLP blocks)")
    if cfg.ssm.norm_before_gate:
        why.append("ssm.norm_before_gate = true (transformers always gates before the norm)")
    if cfg.norm_epsilon != _GATED_NORM_EPS:
        why.append(f"norm_epsilon = {cfg.norm_epsilon} (transformers would use it in the gated norm too, "
                   f"where hybridlm uses {_GATED_NORM_EPS})")
    if why:
        raise CheckpointError("cannot export to hf_mamba2 (transformers' Mamba2ForCausalLM is pure Mamba-2): "
                              + "; ".join(why) + ". Use format=mamba_ssm for hybrid models")
    s = cfg.ssm
    return dict(
        architectures=["Mamba2ForCausalLM"], model_type="mamba2",
        hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer, vocab_size=cfg.vocab_size,
        state_size=s.d_state, expand=s.expand, head_dim=s.headdim, num_heads=s.expand * cfg.d_model // s.headdim,
        n_groups=s.ngroups, conv_kernel=s.d_conv, chunk_size=s.chunk_size, use_bias=s.bias,
        use_conv_bias=s.conv_bias, hidden_act="silu", layer_norm_epsilon=cfg.norm_epsilon,
        residual_in_fp32=cfg.residual_in_fp32, tie_word_embeddings=cfg.tie_embeddings,
        time_step_min=s.dt_min, time_step_max=s.dt_max, time_step_floor=s.dt_init_floor,
        time_step_limit=list(s.dt_limit), initializer_range=cfg.initializer_range,
        # The tokenizer decides these; transformers' defaults (0, 1, 2) would be arbitrary here.
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def _hf_name(ours: str) -> str:
    return ours.replace("backbone.embedding.", "backbone.embeddings.", 1)


def from_hf_mamba2_weights(sd: StateDict) -> StateDict:
    # transformers' own load hook also accepts the singular name, so both spellings can occur.
    return {k.replace("backbone.embeddings.", "backbone.embedding.", 1): v for k, v in sd.items()}


def to_hf_mamba2_weights(cfg: ModelConfig, sd: StateDict) -> StateDict:
    """HybridLM state dict -> Mamba2ForCausalLM's: rename, and cut the padded vocabulary rows (never
    produced by the tokenizer, and sliced off our logits) so HF's vocab_size is the tokenizer's."""
    out = {}
    for key, value in sd.items():
        if key in ("backbone.embedding.weight", "lm_head.weight"):
            value = value[: cfg.vocab_size]
        out[_hf_name(key)] = value
    return out


# --------------------------------------------------------------------------------------------- hybridlm

def _load_hybridlm(path: Path) -> tuple[ModelConfig, StateDict]:
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict' entry)")
    cfg_dict = (ckpt.get("hyper_parameters") or {}).get("cfg")
    if not isinstance(cfg_dict, dict) or not isinstance(cfg_dict.get("model"), dict):
        raise CheckpointError(f"{path}: no model config at hyper_parameters['cfg']['model'] "
                              "(HybridLMModule saves its config there as a plain dict)")
    cfg = model_config_from_dict(cfg_dict["model"], where=f"{path}: model")
    cfg.validate()
    sd = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if not sd:
        raise CheckpointError(f"{path}: state_dict has no 'model.' entries (HybridLMModule keeps HybridLM in .model)")
    adapter = cfg_dict.get("adapter") or {}
    if any(".lora_A." in k for k in sd):
        sd = _merged_adapter_weights(cfg, sd, adapter, path)
    return cfg, sd


def _merged_adapter_weights(cfg: ModelConfig, sd: StateDict, adapter: dict, path: Path) -> StateDict:
    """A run trained with a LoRA recipe saved the injected layers; fold them so callers get plain names."""
    from hybridlm.adapters import AdapterConfig, apply_adapter, merge_adapter
    from hybridlm.models.hybrid_lm import HybridLM

    model = apply_adapter(HybridLM(cfg), AdapterConfig(**adapter))
    load_state_dict_checked(model, sd, source=str(path))
    return merge_adapter(model).state_dict()


# ------------------------------------------------------------------------------------------ public API

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_FILES = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"]


def resolve_checkpoint(path_or_id: str | Path) -> Path:
    """A local file/directory, or a Hugging Face hub id (owner/name) downloaded with snapshot_download."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        return path
    if _HUB_ID.match(str(path_or_id)):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(repo_id=str(path_or_id), allow_patterns=_HUB_FILES))
        except Exception as e:  # offline, unknown repo, gated repo, ...: all end the same way for the user
            raise CheckpointError(f"{path_or_id}: not a local path, and downloading it from the Hugging Face hub "
                                  f"failed ({type(e).__name__}: {e})") from e
    raise CheckpointError(f"{path_or_id}: no such file or directory")


def detect_format(path: str | Path) -> str:
    """'hybridlm' for a Lightning .ckpt file; for a directory, read config.json: 'hf_mamba2' (model_type
    "mamba2") or 'mamba_ssm' (MambaConfig fields)."""
    path = Path(path)
    if path.is_file() and path.suffix in (".json", ".safetensors", ".bin"):
        raise CheckpointError(f"{path}: pass the checkpoint directory, not one of its files")
    if path.is_file():
        return "hybridlm"
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or directory")
    config_path = path / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{path}: no config.json; expected a mamba_ssm or transformers checkpoint directory "
                              "(or pass a hybridlm .ckpt file)")
    raw = _read_json(config_path)
    if raw.get("model_type") == "mamba2":
        return "hf_mamba2"
    if "model_type" in raw:
        raise CheckpointError(f"{config_path}: model_type {raw['model_type']!r} is not supported (only 'mamba2')")
    if "d_model" in raw and "n_layer" in raw:
        return "mamba_ssm"
    raise CheckpointError(f"{config_path}: neither a transformers config (model_type) nor a mamba_ssm MambaConfig "
                          "(d_model, n_layer)")


def load_pretrained(path_or_id: str | Path) -> tuple[ModelConfig, StateDict]:
    """Any supported checkpoint -> (ModelConfig, state dict in HybridLM's names). With tied embeddings the
    state dict holds only backbone.embedding.weight."""
    path = resolve_checkpoint(path_or_id)
    fmt = detect_format(path)
    if fmt == "hybridlm":
        cfg, sd = _load_hybridlm(path)
    elif fmt == "mamba_ssm":
        cfg, sd = from_mamba_ssm_config(_read_json(path / "config.json"), path / "config.json"), read_weights(path)
    else:
        cfg = from_hf_mamba2_config(_read_json(path / "config.json"), path / "config.json")
        sd = from_hf_mamba2_weights(read_weights(path))
    if cfg.tie_embeddings and "lm_head.weight" in sd:
        emb = sd.get("backbone.embedding.weight")
        if emb is None or not torch.equal(emb, sd["lm_head.weight"]):
            raise CheckpointError(f"{path}: the config ties embeddings but lm_head.weight differs from "
                                  "backbone.embedding.weight")
        del sd["lm_head.weight"]
    log.info("loaded %s checkpoint %s (%d tensors)", fmt, path, len(sd))
    return cfg, sd


# Overrides that would change a parameter's shape or name; everything else is a compatible change.
SHAPE_KEYS = {
    "d_model", "layer_pattern", "vocab_size", "d_intermediate", "pad_vocab_size_multiple", "tie_embeddings",
    "ssm.d_state", "ssm.d_conv", "ssm.expand", "ssm.headdim", "ssm.ngroups", "ssm.bias", "ssm.conv_bias",
    "attn.num_heads", "attn.num_heads_kv", "attn.head_dim", "attn.qkv_proj_bias", "attn.out_proj_bias", "attn.d_conv",
}


def _get(cfg: ModelConfig, key: str) -> Any:
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _set(cfg: ModelConfig, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    obj = cfg
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def _shape_value(cfg: ModelConfig, key: str) -> Any:
    """The value a shape key effectively takes (None means 'derived' for these two)."""
    if key == "attn.num_heads_kv":
        return cfg.attn.num_heads_kv or cfg.attn.num_heads
    if key == "attn.head_dim":
        return cfg.attn.head_dim or cfg.d_model // cfg.attn.num_heads
    return _get(cfg, key)


def _has_key(key: str) -> bool:
    obj: Any = ModelConfig()
    for part in key.split("."):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            return False
        obj = getattr(obj, part)
    return True


def merge_model_config(ckpt_cfg: ModelConfig, user_cfg: ModelConfig, explicit_keys: set[str]) -> ModelConfig:
    """The checkpoint's architecture, plus the user's explicit overrides (dotted keys, e.g. "attn.kind",
    "ssm.chunk_size"; a leading "model." is accepted). An override that would change a weight's shape is
    refused, naming the key and both values; one that only changes the computation (attention kind, window,
    SE-Attn sizes, chunk_size, dt_limit, rotary base...) is applied and logged."""
    merged = copy.deepcopy(ckpt_cfg)
    for key in sorted(k.removeprefix("model.") for k in explicit_keys):
        if not _has_key(key):
            raise CheckpointError(f"model.{key}: not a model config key")
        ckpt_value, user_value = _get(ckpt_cfg, key), _get(user_cfg, key)
        irrelevant = (key.startswith("attn.") and "A" not in ckpt_cfg.layer_pattern) or (
            key.startswith("ssm.") and "M" not in ckpt_cfg.layer_pattern)
        if key in SHAPE_KEYS and not irrelevant:
            trial = copy.deepcopy(ckpt_cfg)
            _set(trial, key, user_value)
            if _shape_value(trial, key) != _shape_value(ckpt_cfg, key):
                raise CheckpointError(
                    f"model.{key} = {user_value!r} conflicts with the checkpoint, whose weights have "
                    f"model.{key} = {ckpt_value!r}; drop the override or train from scratch")
        if user_value != ckpt_value:
            log.info("model.%s: checkpoint has %r, using override %r", key, ckpt_value, user_value)
        _set(merged, key, copy.deepcopy(user_value))
    merged.validate()
    return merged


def load_state_dict_checked(model: nn.Module, sd: StateDict, source: str = "checkpoint") -> None:
    """Load sd into model after checking every key and shape; all problems are reported in one error.
    A parameter shared under several names (tied embeddings) needs only one of them in sd."""
    expected = model.state_dict()
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    aliases = {name: group for group in groups.values() if len(group) > 1 for name in group}
    problems = []
    for key, value in expected.items():
        if key not in sd:
            if not any(a in sd for a in aliases.get(key, ())):
                problems.append(f"missing from the checkpoint: {key} {tuple(value.shape)}")
        elif sd[key].shape != value.shape:
            problems.append(f"shape mismatch: {key}: checkpoint {tuple(sd[key].shape)} vs model {tuple(value.shape)}")
    problems += [f"unexpected in the checkpoint: {k} {tuple(v.shape)}" for k, v in sd.items() if k not in expected]
    for group in {tuple(g) for g in aliases.values()}:
        present = [k for k in group if k in sd]
        if len(present) > 1 and not all(torch.equal(sd[present[0]], sd[k]) for k in present[1:]):
            problems.append(f"tied parameters differ in the checkpoint: {present}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model ({len(problems)} problem(s)):\n  "
                              + "\n  ".join(problems))
    # strict=False only because tied aliases may be absent; every key and shape was checked above.
    model.load_state_dict(sd, strict=False)


# ------------------------------------------------------------------------------------------- tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model")


def copy_tokenizer_files(src_dir: Path, out_dir: Path) -> list[str]:
    """Copy the Hugging Face tokenizer files found in src_dir; returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src_dir) / name).is_file():
            shutil.copy2(Path(src_dir) / name, Path(out_dir) / name)
            copied.append(name)
    return copied


def find_tokenizer(path: str | Path) -> Path | None:
    """The tokenizer stored with a checkpoint: its directory (or, for a .ckpt file, the file's directory)
    holding tokenizer.json or tokenizer_config.json; None when there is none."""
    path = Path(path)
    if not path.exists():
        return None
    directory = path if path.is_dir() else path.parent
    if (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file():
        return directory
    return None


def load_checkpoint_tokenizer(path: str | Path, eod_token: str | None = None):
    """The checkpoint's tokenizer through the data package's loader (hybridlm.data.tokenizers.Tokenizer),
    or None when the checkpoint has none."""
    from hybridlm.data.tokenizers import load_tokenizer

    directory = find_tokenizer(resolve_checkpoint(path))
    return None if directory is None else load_tokenizer(str(directory), eod_token)
