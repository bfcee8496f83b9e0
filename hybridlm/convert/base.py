"""What a format file provides (a Format) and what reading a checkpoint gives (a Checkpoint), plus the small
helpers the format files share."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

from torch import Tensor

from hybridlm.checkpointing.io import CheckpointError
from hybridlm.models.config import ModelConfig
from hybridlm.models.hybrid_lm import HybridLM

StateDict = dict[str, Tensor]
INF = float("inf")


@dataclass
class Checkpoint:
    """A checkpoint in hybridlm's terms."""
    format: str  # a Format's name
    path: Path  # the file or directory it was read from
    cfg: ModelConfig
    state_dict: StateDict  # HybridLM's parameter names; with tied embeddings, backbone.embedding.weight only
    run_config: Optional[dict] = None  # hybridlm .ckpt only: the whole training config, as a plain dict


@dataclass(frozen=True)
class Format:
    """One checkpoint format; each format file ends by defining one, and formats.FORMATS lists them all.
    A directory format is recognised by its config.json: `model_type` (transformers formats) or `matches`."""
    name: str
    load: Callable[[Path], Checkpoint]  # a file or directory of this format -> Checkpoint
    # (model, its config, output directory, allow_full_attention) -> writes the directory; None: import only.
    # allow_full_attention lets a target that only has full attention export a sliding-window model.
    save: Optional[Callable[[HybridLM, ModelConfig, Path, bool], None]] = None
    model_type: Optional[str] = None
    matches: Optional[Callable[[dict], bool]] = None


def validated(cfg: ModelConfig, source: Any) -> ModelConfig:
    """cfg after ModelConfig.validate(); a config the model cannot take is the checkpoint's fault, so it ends as one
    CheckpointError naming the file (not a bare ValueError)."""
    try:
        cfg.validate()
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from e
    return cfg


def refuse(source: Path, key: str, value: Any, why: str) -> NoReturn:
    raise CheckpointError(f"{source}: {key} = {value!r} is not supported: {why}")


def json_float(v: Any) -> float:
    """transformers writes inf as {"__float__": "Infinity"}; plain JSON readers give floats or strings."""
    if isinstance(v, dict) and "__float__" in v:
        v = v["__float__"]
    return float(v)
