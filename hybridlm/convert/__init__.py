"""Checkpoint conversion (docs/design.md §7): read any supported format into HybridLM's config and parameter
names, and export a HybridLM to the formats other libraries read.

One file per format, each with its config and weight conversions both ways (hybridlm_ckpt.py: our Lightning
.ckpt, import only; mamba_ssm.py; hf_mamba2.py; hf_nemotron_h.py; hf_bamba.py), listed in formats.FORMATS.
Beside them: formats.py (detection, hub download, read / export by format), overrides.py (which model overrides
may apply on top of a checkpoint), state_dict.py (loading with every key and shape checked), tokenizer.py (the
tokenizer stored with a checkpoint).
Every conversion either reproduces the source model's computation or refuses with a CheckpointError saying why.
"""
from hybridlm.checkpointing.io import CheckpointError
from hybridlm.convert.base import Checkpoint, Format, StateDict
from hybridlm.convert.formats import (
    EXPORT_FORMATS,
    FORMATS,
    detect_format,
    export,
    load_pretrained,
    read_checkpoint,
    resolve_checkpoint,
)
from hybridlm.convert.overrides import SHAPE_KEYS, merge_model_config
from hybridlm.convert.state_dict import load_state_dict_checked
from hybridlm.convert.tokenizer import copy_tokenizer_files, find_tokenizer, load_checkpoint_tokenizer

__all__ = [
    "CheckpointError", "Checkpoint", "Format", "StateDict", "FORMATS", "EXPORT_FORMATS", "detect_format", "export",
    "load_pretrained", "read_checkpoint", "resolve_checkpoint", "SHAPE_KEYS", "merge_model_config",
    "load_state_dict_checked", "copy_tokenizer_files", "find_tokenizer", "load_checkpoint_tokenizer",
]
