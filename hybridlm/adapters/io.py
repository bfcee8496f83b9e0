"""Adapter checkpoints and merging.

An adapter file is one safetensors file holding only what the recipe trains: LoRA weights in peft's layout
(`get_peft_model_state_dict`: `...in_proj.lora_A.weight`) and the whole base tensors the recipe trains under
their model names (`backbone.embedding.weight`, norms, ...). The AdapterConfig is stored as JSON in the file's
metadata, so `load_adapter` can apply the recipe to a fresh base model before loading. A file that cannot be
read or does not fit the model raises CheckpointError, naming the file.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import save_file

from hybridlm.adapters.config import AdapterConfig
from hybridlm.adapters.recipes import ADAPTER_NAME, apply_adapter, lora_targets, recipe_base_parameters
from hybridlm.checkpointing.io import CheckpointError
from hybridlm.models.hybrid_lm import HybridLM

_META_KEY = "hybridlm_adapter_config"


def _adapter_cfg(model: HybridLM) -> AdapterConfig:
    cfg = getattr(model, "adapter_cfg", None)
    if cfg is None:
        raise ValueError("model has no adapter (apply_adapter was not called, or adapter.name=none)")
    return cfg


def adapter_state_dict(model: HybridLM) -> dict[str, torch.Tensor]:
    """The tensors an adapter checkpoint holds (detached, contiguous copies)."""
    cfg = _adapter_cfg(model)
    sd = dict(get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)) if lora_targets(model, cfg) else {}
    params = dict(model.named_parameters())
    sd.update({n: params[n] for n in recipe_base_parameters(model, cfg)})
    return {n: t.detach().contiguous().clone() for n, t in sd.items()}


def save_adapter(model: HybridLM, path: str | Path) -> Path:
    """Write the adapter of `model` to `path` (a .safetensors file); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", _META_KEY: json.dumps(asdict(_adapter_cfg(model)))}
    save_file(adapter_state_dict(model), str(path), metadata=meta)
    return path


def _read_file(path: str | Path, tensors: bool) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The file's metadata and (tensors=True) its tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, ({n: f.get_tensor(n) for n in f.keys()} if tensors else {})
    except Exception as e:  # SafetensorError / OSError for a missing, truncated or garbage file
        raise CheckpointError(f"{path}: cannot read safetensors ({type(e).__name__}: {e})") from e


def read_adapter_config(path: str | Path) -> AdapterConfig:
    meta, _ = _read_file(path, tensors=False)
    if _META_KEY not in meta:
        raise CheckpointError(f"{path}: not a hybridlm adapter file (no {_META_KEY!r} metadata)")
    return AdapterConfig(**json.loads(meta[_META_KEY]))


def load_adapter(model: HybridLM, path: str | Path) -> HybridLM:
    """Load an adapter file into `model`: applies its recipe first if the model has no adapter yet (a fresh base),
    otherwise the model's recipe must match the file's. Every tensor of the file must land, and vice versa."""
    cfg = read_adapter_config(path)
    current = getattr(model, "adapter_cfg", None)
    if current is None:
        apply_adapter(model, cfg)
    elif current != cfg:
        raise CheckpointError(f"{path}: adapter {cfg} does not match the model's adapter {current}")
    _, tensors = _read_file(path, tensors=True)
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match the recipe; missing {missing}, unexpected {unexpected}")
    lora = {n: t for n, t in tensors.items() if "lora_" in n}
    if lora:
        result = set_peft_model_state_dict(model, lora, adapter_name=ADAPTER_NAME)
        if result.unexpected_keys:
            raise CheckpointError(f"{path}: LoRA tensors not in the model: {result.unexpected_keys}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in tensors.items():
            if n not in lora:
                params[n].copy_(t)  # in place: tied weights (lm_head = embedding) stay tied
    return model


def merge_adapter(model: HybridLM) -> HybridLM:
    """Fold LoRA into the base weights and remove the adapter, in place: the result is a plain HybridLM with the
    original parameter names (a full checkpoint of it loads into a fresh HybridLM), every parameter trainable."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()  # peft: W += scale * B @ A
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    # peft's only mark on the model object itself (besides the replaced modules).
    if hasattr(model, "peft_config"):
        del model.peft_config
    model.adapter_cfg = None
    for p in model.parameters():
        p.requires_grad_(True)
    return model
