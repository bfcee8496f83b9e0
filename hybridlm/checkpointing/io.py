"""Checkpoint files: one reader for every checkpoint hybridlm opens, and atomic writes.

Reading is always torch.load(weights_only=True): a checkpoint is data and never runs code. hybridlm's own
checkpoints hold only tensors and plain containers (RunStateCallback stores numpy's RNG as a tensor), so
nothing needs the unrestricted unpickler. A file that is missing, cannot be read or is not what the caller
expects raises CheckpointError, whose message names the file (or the config key) and what is wrong.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Union

import torch

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint that is missing, cannot be read, or does not fit; the message names the file or the key."""


def torch_load(path: PathLike, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """torch.load(weights_only=True), with an error that says what is wrong with the file. mmap=True reads the
    structure without reading tensor data: enough to find a truncated file (its zip directory, at the end, is
    missing) and to read metadata cheaply."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; give the checkpoint file inside it")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if not (mmap and "mmap can only be used" in str(e)):
                raise
            return torch.load(path, map_location=map_location, weights_only=True)  # not a zip file: no mmap
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise CheckpointError(f"checkpoint {path} {_diagnosis(path, e)}") from e


def _diagnosis(path: Path, e: Exception) -> str:
    """What is wrong with a file torch.load(weights_only=True) refused, in one line. Only torch's diagnosis, never
    its advice: retrying with weights_only=False is the one thing not to do with a file of unknown origin."""
    refused = re.search(r"[^.]*\bGLOBAL [\w.]+[^.]*", str(e))  # weights_only names the global it refused
    if refused:
        return ("holds Python objects other than tensors and plain containers, which hybridlm refuses to unpickle "
                f"(torch.load(weights_only=True) raised {type(e).__name__}: {refused.group(0).strip()})")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "is truncated or corrupt (the file is empty)"
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save writes a zip, or a pickle
        return "is truncated or corrupt (not a PyTorch file: neither a zip archive nor a pickle)"
    unpickler = re.search(r"WeightsUnpickler error:\s*(.*?)\s*Check the documentation", str(e), re.S)
    detail = unpickler.group(1) if unpickler else str(e)
    first_sentence = " ".join(detail.split()).split(". ")[0].rstrip(".")
    return (f"is truncated or corrupt (torch.load(weights_only=True) raised {type(e).__name__}: "
            f"{first_sentence[:200]})")


def load_checkpoint_file(path: PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """A Lightning checkpoint (a run's own, or one given as init_from / ckpt_path), read with torch_load. An
    error also names the previous checkpoint in the same directory: the one to fall back to."""
    path = Path(path)
    try:
        ckpt = torch_load(path, map_location, mmap)
    except CheckpointError as e:
        if not path.is_file():
            raise
        raise CheckpointError(f"{e}{previous_checkpoint_hint(path)}") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"checkpoint {path} is not a Lightning checkpoint (no 'state_dict')"
                              f"{previous_checkpoint_hint(path)}")
    return ckpt


def previous_checkpoint_hint(path: Path) -> str:
    """'; the previous checkpoint is X': the newest other readable checkpoint in path's directory not newer than
    it (read with mmap: the structure only)."""
    mtime = path.stat().st_mtime
    older = [p for p in path.parent.glob("*.ckpt") if p.resolve() != path.resolve() and p.stat().st_mtime <= mtime]
    for candidate in sorted(older, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            torch_load(candidate, mmap=True)
        except CheckpointError:
            continue
        return f"; the previous checkpoint is {candidate}"
    return "; there is no older readable checkpoint in that directory: write or download it again"


def save_atomically(checkpoint: dict[str, Any], path: PathLike) -> None:
    """torch.save to a temporary file, fsync, rename: a crash never leaves a half-written checkpoint under the
    real name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
