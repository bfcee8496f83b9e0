"""With init_from / ckpt_path the architecture comes from the checkpoint: which of the user's model overrides
apply on top of it, and which are refused because they would change a weight's shape."""
from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any

from hybridlm.checkpointing.io import CheckpointError
from hybridlm.models.config import ModelConfig

log = logging.getLogger(__name__)

# Overrides that would change a parameter's shape or name; everything else is a compatible change.
SHAPE_KEYS = {
    "d_model", "layer_pattern", "vocab_size", "d_intermediate", "pad_vocab_size_multiple", "tie_embeddings",
    "ssm.d_state", "ssm.d_conv", "ssm.expand", "ssm.headdim", "ssm.ngroups", "ssm.bias", "ssm.conv_bias",
    "attn.num_heads", "attn.num_heads_kv", "attn.head_dim", "attn.qkv_proj_bias", "attn.out_proj_bias", "attn.d_conv",
    "d_ffn", "mlp_activation", "mlp_bias", "ssm.d_inner",
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
