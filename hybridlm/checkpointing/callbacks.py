"""What Lightning calls to checkpoint a run. Lightning's own state (model, optimizer, LR schedule, loop counters,
data position, callback states) is saved by Lightning; these add what an exact resume needs beyond it.

- AtomicCheckpointIO: checkpoints are written atomically and read with the safe reader of io.py.
- StepCheckpoint: a checkpoint due on a step that validation follows is written after that validation.
- save_final_checkpoint: last.ckpt holds the final step of a finished run.
- RunStateCallback: per-batch seeds for the global RNGs (what makes a resume exact), their states and the
  W&B run id in every checkpoint.
"""
from __future__ import annotations

import logging
import random
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerStatus

from hybridlm.checkpointing.io import load_checkpoint_file, save_atomically

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        save_atomically(checkpoint, path)

    def load_checkpoint(self, path: _PATH, map_location: Optional[Any] = None, weights_only: Optional[bool] = None):
        return load_checkpoint_file(path, map_location or "cpu")


def save_final_checkpoint(trainer, path: Path) -> None:
    """Write last.ckpt at the end of a finished fit unless it already holds the final step: ModelCheckpoint
    writes it only when a periodic checkpoint is due, so with max_steps not a multiple of every_n_steps the
    run would end with a last.ckpt some steps behind its final weights."""
    if trainer.state.status != TrainerStatus.FINISHED or trainer.fast_dev_run:
        return
    stale = not path.is_file() or load_checkpoint_file(path, mmap=True)["global_step"] != trainer.global_step
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
