"""Fine-tuning recipes. The config is imported eagerly; the rest on first use (PEP 562), so loading the
top-level config (hybridlm/config.py imports adapters.config) does not import peft."""
from importlib import import_module

from hybridlm.adapters.config import RECIPES, AdapterConfig

_LAZY = {
    "apply_adapter": "recipes", "recipe_attention_kind": "recipes",
    "trainable_parameter_table": "params", "format_parameter_table": "params",
    "save_adapter": "io", "load_adapter": "io", "read_adapter_config": "io", "merge_adapter": "io",
    "merged_state_dict": "merged",
}

__all__ = ["AdapterConfig", "RECIPES", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"hybridlm.adapters.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'hybridlm.adapters' has no attribute {name!r}")
