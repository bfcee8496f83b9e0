"""Checkpoint files: atomic writes (temporary file + rename, so a crash never leaves a half-written
checkpoint under the real name) and finding the checkpoint to resume from."""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
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

    def load_checkpoint(self, path: _PATH, map_location: Optional[Any] = None, weights_only: Optional[bool] = None):
        return load_checkpoint_file(path, map_location)


def load_checkpoint_file(path: _PATH, map_location: Any = "cpu") -> dict:
    """torch.load with an error that names the file and points at the previous checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        # Our own checkpoints hold optimizer and RNG state; nothing here needs arbitrary pickled classes.
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001
        older = sorted((p for p in path.parent.glob("*.ckpt") if p != path), key=lambda p: p.stat().st_mtime)
        hint = f"; the previous checkpoint is {older[-1]}" if older else ""
        raise RuntimeError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {e}){hint}") from e


def find_resume_checkpoint(experiment_root: Path) -> Optional[Path]:
    """Newest readable last.ckpt under experiment_root/*/checkpoints/; a corrupt newest one is skipped."""
    candidates = sorted(experiment_root.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for ckpt in candidates:
        try:
            load_checkpoint_file(ckpt)
            return ckpt
        except RuntimeError as e:
            log.warning("resume=auto: skipping %s", e)
    return None
