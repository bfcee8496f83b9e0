"""hybridlm's own checkpoint: the Lightning .ckpt file a training run writes. HybridLMModule saves the whole
training config as a plain dict under hyper_parameters["cfg"] (the model's under ["cfg"]["model"]) and HybridLM
under the `model.` prefix of state_dict. Lightning writes it (trainer.save_checkpoint), so this format is
import-only here. A run trained with a LoRA recipe saved the injected layers: they are merged on import, so
callers get plain HybridLM names."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from hybridlm.checkpointing.io import CheckpointError, load_checkpoint_file
from hybridlm.convert.base import Checkpoint, Format, StateDict
from hybridlm.convert.state_dict import load_state_dict_checked
from hybridlm.models.config import ModelConfig
from hybridlm.models.hybrid_lm import HybridLM

NAME = "hybridlm"
PREFIX = "model."  # HybridLMModule keeps HybridLM in .model


def import_config(data: dict, where: str = "model") -> ModelConfig:
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


def import_weights(cfg: ModelConfig, state_dict: StateDict, adapter: dict, source: Path) -> StateDict:
    """The module's state_dict -> HybridLM's: the `model.` entries, LoRA layers (if any) merged."""
    sd = {k[len(PREFIX):]: v for k, v in state_dict.items() if k.startswith(PREFIX)}
    if not sd:
        raise CheckpointError(f"{source}: state_dict has no 'model.' entries (HybridLMModule keeps HybridLM in .model)")
    if any(".lora_A." in k for k in sd):
        sd = _merged_adapter_weights(cfg, sd, adapter, source)
    return sd


def _merged_adapter_weights(cfg: ModelConfig, sd: StateDict, adapter: dict, source: Path) -> StateDict:
    """A run trained with a LoRA recipe saved the injected layers; fold them so callers get plain names."""
    from hybridlm.adapters import AdapterConfig, apply_adapter, merge_adapter  # imports peft: only when needed

    model = apply_adapter(HybridLM(cfg), AdapterConfig(**adapter))
    load_state_dict_checked(model, sd, source=str(source))
    return merge_adapter(model).state_dict()


def load(path: Path) -> Checkpoint:
    ckpt = load_checkpoint_file(path)
    run_config = (ckpt.get("hyper_parameters") or {}).get("cfg")
    if not isinstance(run_config, dict) or not isinstance(run_config.get("model"), dict):
        raise CheckpointError(f"{path}: no model config at hyper_parameters['cfg']['model'] "
                              "(HybridLMModule saves its config there as a plain dict)")
    cfg = import_config(run_config["model"], where=f"{path}: model")
    cfg.validate()
    sd = import_weights(cfg, ckpt["state_dict"], run_config.get("adapter") or {}, path)
    return Checkpoint(NAME, path, cfg, sd, run_config=run_config)


FORMAT = Format(NAME, load)
