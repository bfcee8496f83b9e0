"""Reading and writing the files of a Hugging Face-style checkpoint directory (config.json, safetensors or
pytorch_model.bin, shards with an index). Weights are read with safetensors or torch_load: never code."""
from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from hybridlm.checkpointing.io import CheckpointError, torch_load
from hybridlm.convert.base import StateDict

# Preference order; the *.index.json variants list the shards of a large checkpoint.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def write_json(data: dict, path: Path) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)  # float("inf") is written as Infinity, which Python's json reads back


def read_safetensors(path: Path) -> StateDict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError / OSError / ValueError for truncated or garbage files
        raise CheckpointError(f"{path}: cannot read safetensors ({type(e).__name__}: {e})") from e


def save_safetensors(sd: StateDict, path: Path) -> None:
    from safetensors.torch import save_file

    # transformers checks metadata["format"] == "pt" when loading.
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})


def read_weight_file(path: Path) -> StateDict:
    sd = read_safetensors(path) if path.suffix == ".safetensors" else torch_load(path)
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a flat dict of tensors")
    return sd


def read_weights(directory: Path) -> StateDict:
    """All tensors of a checkpoint directory (single file or shards)."""
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.exists():
            continue
        if not name.endswith(".index.json"):
            return read_weight_file(path)
        weight_map = read_json(path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{path}: no 'weight_map' object")
        sd: StateDict = {}
        for shard in sorted(set(weight_map.values())):
            sd.update(read_weight_file(directory / shard))
        missing = sorted(set(weight_map) - set(sd))
        if missing:
            raise CheckpointError(f"{path}: tensors listed in the index but absent from the shards: {missing}")
        return sd
    found = sorted(p.name for p in directory.iterdir())
    raise CheckpointError(f"{directory}: no weights file (looked for {', '.join(WEIGHT_FILES)}; found {found})")
