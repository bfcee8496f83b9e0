"""Checkpoint files, and what a resumed run needs beyond Lightning's own state (model, optimizer, LR schedule,
loop counters, data position and callback states are Lightning's).

- AtomicCheckpointIO: write a temporary file, fsync, rename; a crash never leaves a half-written checkpoint
  under the real name. Reading uses torch.load(weights_only=True): a checkpoint is data and never runs code.
- find_resume_checkpoint (resume=auto, over the runs runner.resume_candidates picks) skips an unreadable
  checkpoint with a warning; load_checkpoint_file (resume=<path>, and Lightning's restore) refuses one with an
  error naming the file and the previous one.
- save_final_checkpoint: last.ckpt holds the final step of a finished run.
- StepCheckpoint: a checkpoint due on a step that validation follows is written after that validation.
- RunStateCallback: per-batch seeds for the global RNGs (what makes a resume exact), their states and
  the W&B run id in every checkpoint.
- ResumableCSVLogger + truncate_csv_log: a resumed run continues the CSV log of the run it resumes.
"""
from __future__ import annotations

import csv
import logging
import os
import random
import re
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerStatus

log = logging.getLogger(__name__)


class CheckpointReadError(RuntimeError):
    """A checkpoint that cannot be read; the message names the file and the previous checkpoint."""


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
        return load_checkpoint_file(path, map_location or "cpu")


def load_checkpoint_file(path: _PATH, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """torch.load(weights_only=True) with an error that names the file and points at the previous checkpoint.
    Our checkpoints hold only tensors and plain containers (RunStateCallback stores numpy's RNG as a tensor),
    so nothing needs the unrestricted unpickler. mmap=True reads the structure without reading tensor data:
    enough to find a truncated file (its zip directory, at the end, is missing) and read metadata cheaply."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if not (mmap and "mmap can only be used" in str(e)):
                raise
            ckpt = torch.load(path, map_location=map_location, weights_only=True)  # not a zip file: no mmap
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        refused = re.search(r"[^.]*\bGLOBAL [\w.]+[^.]*", str(e))  # weights_only names the global it refused
        what = ("holds Python objects other than tensors and plain containers, which hybridlm refuses to unpickle"
                if refused else "is truncated or corrupt")
        unpickler = re.search(r"WeightsUnpickler error:\s*(.*?)\s*Check the documentation", str(e), re.S)
        detail = (refused.group(0) if refused else unpickler.group(1) if unpickler else str(e)[:300]).strip()
        raise CheckpointReadError(f"checkpoint {path} {what} ({type(e).__name__}: {detail})"
                                  f"{previous_checkpoint_hint(path)}") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointReadError(f"checkpoint {path} is not a Lightning checkpoint (no 'state_dict')"
                                  f"{previous_checkpoint_hint(path)}")
    return ckpt


def previous_checkpoint_hint(path: Path) -> str:
    """'; the previous checkpoint is X': the newest other checkpoint in path's directory not newer than it."""
    mtime = path.stat().st_mtime
    older = [p for p in path.parent.glob("*.ckpt") if p.resolve() != path.resolve() and p.stat().st_mtime <= mtime]
    if not older:
        return "; there is no older checkpoint in that directory"
    return f"; the previous checkpoint is {max(older, key=lambda p: p.stat().st_mtime)}"


def find_resume_checkpoint(run_dirs: Iterable[Path]) -> Optional[Path]:
    """The newest readable checkpoint in run_dir/checkpoints/ of the given runs (last.ckpt is written right after
    the step checkpoint it copies, so it is normally the newest). Unreadable ones are skipped with a warning,
    so a corrupt last.ckpt falls back to the same run's previous step checkpoint, then to older runs."""
    candidates = sorted((c for d in run_dirs for c in (Path(d) / "checkpoints").glob("*.ckpt")),
                        key=lambda p: p.stat().st_mtime, reverse=True)
    for ckpt in candidates:
        try:
            load_checkpoint_file(ckpt, mmap=True)
            return ckpt
        except CheckpointReadError as e:
            log.warning("resume=auto: skipping %s", e)
    return None


@dataclass
class ResumePoint:
    global_step: int  # optimizer steps done; the resumed run logs its first training row at this step
    wandb_run_id: Optional[str]


def resume_point(path: Path) -> ResumePoint:
    ckpt = load_checkpoint_file(path, mmap=True)
    run_state = (ckpt.get("callbacks") or {}).get(RunStateCallback.__qualname__) or {}
    return ResumePoint(int(ckpt["global_step"]), run_state.get("wandb_run_id"))


def save_final_checkpoint(trainer, path: Path) -> None:
    """Write last.ckpt at the end of a finished fit unless it already holds the final step: ModelCheckpoint
    writes it only when a periodic checkpoint is due, so with max_steps not a multiple of every_n_steps the
    run would end with a last.ckpt some steps behind its final weights."""
    if trainer.state.status != TrainerStatus.FINISHED or trainer.fast_dev_run:
        return
    stale = not path.is_file() or resume_point(path).global_step != trainer.global_step
    if trainer.strategy.broadcast(stale):  # rank 0 decides: save_checkpoint is collective under DDP
        trainer.save_checkpoint(path)


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint by steps and/or wall time that never resumes past a validation that did not run. Lightning
    saves a step checkpoint before the validation due on the same step, and a run resumed from it skips that
    validation: killed in between, the run would lose it. Such a save is deferred to the end of the validation;
    a run resumed from there goes on after the validation."""

    def __init__(self, *args: Any, every_n_train_steps: Optional[int] = None,
                 train_time_interval: Optional[timedelta] = None, **kwargs: Any) -> None:
        # Both triggers at once (every N steps, and at least every T minutes): Lightning's constructor refuses the
        # pair, though its batch-end test handles both, so the time trigger is set after it.
        super().__init__(*args, every_n_train_steps=every_n_train_steps,
                         train_time_interval=None if every_n_train_steps else train_time_interval, **kwargs)
        self._train_time_interval = train_time_interval
        self._validation_follows = False
        self._deferred = False  # a save is waiting for the end of the validation that follows its step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._validation_follows = validation_follows(trainer)
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self._validation_follows = False

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._deferred:
            self._deferred = False
            candidates = self._monitor_candidates(trainer)
            super()._save_topk_checkpoint(trainer, candidates)
            super()._save_last_checkpoint(trainer, candidates)
        super().on_validation_end(trainer, pl_module)  # skips this step: it is saved

    def _save_topk_checkpoint(self, trainer, monitor_candidates) -> None:
        if self._validation_follows:
            self._deferred = True
        else:
            super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        if self._validation_follows:
            self._deferred = True
        else:
            super()._save_last_checkpoint(trainer, monitor_candidates)


def validation_follows(trainer) -> bool:
    """Whether a validation with at least one batch runs right after the current training batch (the test the
    training loop makes after on_train_batch_end)."""
    loop = trainer.fit_loop.epoch_loop
    if not (trainer.enable_validation and not getattr(loop, "_skip_next_val", False)
            and loop._should_check_val_fx(trainer.fit_loop._data_fetcher)):
        return False
    loop.val_loop.setup_data()  # what the validation does first (once); tells whether it has batches to run
    return not loop.val_loop.skip


# ------------------------------------------------------------------------------------------------ RNG + run id

def collect_rng_states() -> dict:
    keys, pos, has_gauss, cached = np.random.get_state()[1:]  # ('MT19937', uint32 (624,), int, int, float)
    return {
        "python": random.getstate(),  # (version, tuple of 625 ints, gauss_next): plain types
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},  # a tensor, not an ndarray, so weights_only can read it
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    cuda = states["cuda"]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    elif cuda or torch.cuda.is_available():
        log.warning("CUDA RNG states of %d device(s) in the checkpoint cannot be restored on %d device(s); "
                    "CUDA random numbers will differ from the original run", len(cuda), torch.cuda.device_count())


class RunStateCallback(Callback):
    """Makes the global RNGs (python, numpy, torch CPU and CUDA) a function of the position in training, and
    saves the W&B run id in every checkpoint.

    At the start of every training batch the global RNGs are reseeded from (seed, batch counter, rank). Saving
    their state in the checkpoint alone would not make a resume exact: between the end of the batch a checkpoint
    is written at and the next batch, an uninterrupted run draws from the torch RNG whenever a DataLoader
    iterator is created (validation, a new epoch), and a resumed run draws at other moments. With per-batch
    seeds, batch k draws the same numbers however the run got there, validation schedules and restarts cannot
    shift training's randomness, and DDP ranks draw independently. The states at checkpoint time are saved too
    and restored on load, for whatever runs between the restore and the first batch."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._loggers: list = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._loggers = trainer.loggers

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        # total_batch_idx counts every batch (micro-batches under accumulation) over all epochs; it is restored
        # from the checkpoint on resume.
        seed_global_rngs(self.seed, trainer.fit_loop.total_batch_idx, trainer.global_rank)

    def state_dict(self) -> dict[str, Any]:
        run_ids = [lg.version for lg in self._loggers if isinstance(lg, WandbLogger)]
        return {"rng": collect_rng_states(), "wandb_run_id": run_ids[0] if run_ids else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        restore_rng_states(state_dict["rng"])


def seed_global_rngs(seed: int, batch: int, rank: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device) from (seed, batch, rank) through numpy's
    SeedSequence, which mixes the three integers into well-separated streams."""
    words = np.random.SeedSequence([seed, batch, rank]).generate_state(2, np.uint32)
    random.seed(int(words[0]))
    np.random.seed(int(words[0]))
    torch.manual_seed(int(words[0]) << 32 | int(words[1]))


# --------------------------------------------------------------------------------------------------- CSV log

class _AppendingWriter(ExperimentWriter):
    """Lightning's writer deletes an existing metrics.csv when it starts; this one keeps it and appends with
    the same columns (a new column rewrites the file with the union header, as Lightning does)."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        # Lightning rewrites the file in place; a kill in the middle would lose the log.
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        write_csv_atomically(Path(self.metrics_file_path), fieldnames, rows)


class ResumableCSVLogger(CSVLogger):
    """A CSVLogger that continues an existing metrics.csv (see truncate_csv_log) and writes every logged row
    at once (flush_logs_every_n_steps=1), so a killed run loses no row logged before its last checkpoint.
    Local paths only (the writer uses the os module, for the atomic rename)."""

    def __init__(self, *args: Any, flush_logs_every_n_steps: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, flush_logs_every_n_steps=flush_logs_every_n_steps, **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def truncate_csv_log(path: Path, from_step: int) -> int:
    """Drop the rows a resumed run will log again (step >= from_step) and any row a kill cut short; atomic.
    Returns the number of rows kept."""
    if not path.is_file():
        return 0
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames or [], list(reader)

    def kept(row: dict) -> bool:
        try:
            return int(row["step"]) < from_step and None not in row.values()  # None: a truncated last line
        except (KeyError, TypeError, ValueError):
            return False

    rows = [r for r in rows if kept(r)]
    write_csv_atomically(path, header, rows)
    return len(rows)


def write_csv_atomically(path: Path, header: list[str], rows: list[dict]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
