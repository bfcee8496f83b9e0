"""The supported checkpoint formats, and reading or writing a checkpoint of any of them (docs/design.md §7).

Adding a format: write a file beside hybridlm_ckpt.py / mamba_ssm.py / hf_mamba2.py / hf_nemotron_h.py /
hf_bamba.py that ends with its `FORMAT = Format(...)`, and list it in FORMATS.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from hybridlm.checkpointing.io import CheckpointError
from hybridlm.convert import hf_bamba, hf_mamba2, hf_nemotron_h, hybridlm_ckpt, mamba_ssm
from hybridlm.convert.base import Checkpoint, Format, StateDict
from hybridlm.convert.files import read_json
from hybridlm.models.config import ModelConfig
from hybridlm.models.hybrid_lm import HybridLM

log = logging.getLogger(__name__)

FORMATS: tuple[Format, ...] = (hybridlm_ckpt.FORMAT, mamba_ssm.FORMAT, hf_mamba2.FORMAT, hf_nemotron_h.FORMAT,
                               hf_bamba.FORMAT)
EXPORT_FORMATS = tuple(f.name for f in FORMATS if f.save is not None)
_BY_NAME = {f.name: f for f in FORMATS}

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
            first_line = next((line for line in str(e).splitlines() if line.strip()), "")  # one line, no trace
            raise CheckpointError(f"{path_or_id}: not a local path, and downloading it from the Hugging Face hub "
                                  f"failed ({type(e).__name__}: {first_line.strip()}); check the path or the hub "
                                  "id") from e
    raise CheckpointError(f"{path_or_id}: no such file or directory; give a hybridlm .ckpt file, a mamba_ssm or "
                          "transformers checkpoint directory, or a Hugging Face hub id (owner/name)")


def detect_format(path: str | Path) -> str:
    """'hybridlm' for a Lightning .ckpt file; for a directory, the format its config.json describes: a
    transformers `model_type` (hf_mamba2: "mamba2", hf_nemotron_h: "nemotron_h", hf_bamba: "bamba"), or
    mamba_ssm's MambaConfig fields."""
    path = Path(path)
    if path.is_file() and path.suffix in (".json", ".safetensors", ".bin"):
        raise CheckpointError(f"{path}: pass the checkpoint directory, not one of its files")
    if path.is_file():
        return hybridlm_ckpt.NAME  # the one single-file format
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or directory")
    config_path = path / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{path}: no config.json; expected a mamba_ssm or transformers checkpoint directory "
                              "(or pass a hybridlm .ckpt file)")
    raw = read_json(config_path)
    if "model_type" in raw:
        for fmt in FORMATS:
            if fmt.model_type is not None and fmt.model_type == raw["model_type"]:
                return fmt.name
        supported = ", ".join(repr(f.model_type) for f in FORMATS if f.model_type is not None)
        raise CheckpointError(f"{config_path}: model_type {raw['model_type']!r} is not supported (only {supported})")
    for fmt in FORMATS:
        if fmt.matches is not None and fmt.matches(raw):
            return fmt.name
    raise CheckpointError(f"{config_path}: neither a transformers config (model_type) nor a mamba_ssm MambaConfig "
                          "(d_model, n_layer)")


def read_checkpoint(path_or_id: str | Path) -> Checkpoint:
    """Any supported checkpoint (a path or a hub id), read once: config, weights in HybridLM's names and, for
    a hybridlm .ckpt, the training config it was saved with."""
    path = resolve_checkpoint(path_or_id)
    ckpt = _BY_NAME[detect_format(path)].load(path)
    sd = ckpt.state_dict
    if ckpt.cfg.tie_embeddings and "lm_head.weight" in sd:
        emb = sd.get("backbone.embedding.weight")
        if emb is None or not torch.equal(emb, sd["lm_head.weight"]):
            raise CheckpointError(f"{path}: the config ties embeddings but lm_head.weight differs from "
                                  "backbone.embedding.weight")
        del sd["lm_head.weight"]
    log.info("loaded %s checkpoint %s (%d tensors)", ckpt.format, path, len(sd))
    return ckpt


def load_pretrained(path_or_id: str | Path) -> tuple[ModelConfig, StateDict]:
    """Any supported checkpoint -> (ModelConfig, state dict in HybridLM's names). With tied embeddings the
    state dict holds only backbone.embedding.weight."""
    ckpt = read_checkpoint(path_or_id)
    return ckpt.cfg, ckpt.state_dict


def export(model: HybridLM, cfg: ModelConfig, out_dir: str | Path, format: str = "mamba_ssm",
           allow_full_attention: bool = False) -> Path:
    """Write model (whose config is cfg) to out_dir in `format`; returns out_dir. What the target cannot
    compute is refused before anything is written."""
    if format not in EXPORT_FORMATS:
        raise CheckpointError(f"format={format!r}: choose one of {EXPORT_FORMATS}")
    if getattr(model, "cfg", cfg) != cfg:
        raise ValueError("cfg differs from model.cfg: the exported config would not describe the weights")
    out = Path(out_dir)
    try:
        _BY_NAME[format].save(model, cfg, out, allow_full_attention)
    except OSError as e:  # a directory that cannot be created or written; a refusal stays a CheckpointError
        raise CheckpointError(f"{out}: cannot write the exported checkpoint there ({e}); choose another output "
                              "directory") from e
    log.info("exported %s model to %s", format, out)
    return out
