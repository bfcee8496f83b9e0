"""Shared mechanics of the initial-state callbacks.

A callback sets `pl_module.initial_state` in `on_train_batch_start` (the module's training_step consumes it) and
reads the step's final state from `outputs["final_state"]` in `on_train_batch_end`. Lightning calls both hooks
once per micro-batch, so under gradient accumulation every micro-batch hands its state to the next one. Callbacks
are per process: under DDP every rank keeps its own buffers and RNG (seeded with seed + global rank) and nothing is
reduced across ranks.

Checkpoints: Lightning writes rank 0's callback state only, so `state_dict` (which Lightning calls on every rank
when it saves) gathers each rank's own state to rank 0 as {"ranks": [state of rank 0, state of rank 1, ...]}, and
`load_state_dict` (every rank reads the same file) restores the entry of its own rank. A rank the checkpoint has no
entry for (a resume with more processes) starts afresh, with a warning.

Drawn states (noise) take the device, shapes and dtypes of the layer's `Mamba2.zero_state`: SSM float32 (float64
for a float64 model), the precision the scan computes and returns states in; conv the model's dtype, like the
activations it is made of. Passed states keep the dtype the model produced them in.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from hybridlm.interventions.config import InterventionConfig
from hybridlm.models.state import State, map_state


def module_device(pl_module) -> torch.device:
    return next(pl_module.model.parameters()).device


def state_to_cpu(state: State | None) -> State | None:
    return map_state(state, lambda t: t.detach().cpu())


def data_config(trainer, pl_module) -> Any:
    """The data config of this run: the module's top config first, then the datamodule's own config."""
    cfg = getattr(pl_module, "cfg", None)
    if cfg is not None and getattr(cfg, "data", None) is not None:
        return cfg.data
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    return getattr(dm, "cfg", None)


class InitialStateCallback(Callback):
    """Base class: subclasses implement `make_initial_state` and `observe`."""

    def __init__(self, cfg: InterventionConfig):
        self.cfg = cfg
        self.rank, self.world_size = 0, 1
        self._gen: torch.Generator | None = None
        self._pending_rng: dict | None = None  # RNG state loaded from a checkpoint, applied on first use

    # ---- Lightning hooks -------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        self.rank, self.world_size = trainer.global_rank, trainer.world_size
        model_cfg = getattr(getattr(pl_module, "cfg", None), "model", None) or pl_module.model.cfg
        self.cfg.validate(data=data_config(trainer, pl_module), model=model_cfg)

    def on_train_batch_start(self, trainer, pl_module, batch: dict, batch_idx: int) -> None:
        batch_size = batch["input_ids"].shape[0]
        pl_module.initial_state = self.make_initial_state(pl_module, batch_size, batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: dict, batch_idx: int) -> None:
        self.observe(pl_module, outputs["final_state"])

    # ---- to implement ----------------------------------------------------------------------------------------
    def make_initial_state(self, pl_module, batch_size: int, batch_idx: int) -> State | None:
        raise NotImplementedError

    def observe(self, pl_module, final_state: State) -> None:
        raise NotImplementedError

    # ---- the callback's own RNG, checkpointed so a resumed run draws the same noise / resets ------------------
    def generator(self, device: torch.device) -> torch.Generator:
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device)
            self._gen.manual_seed(self.cfg.seed + self.rank)
            pending, self._pending_rng = self._pending_rng, None
            if pending is not None:
                if pending["device_type"] == device.type:
                    self._gen.set_state(pending["state"])
                else:
                    warnings.warn(f"intervention RNG state saved on {pending['device_type']} cannot be restored "
                                  f"on {device.type}; reseeding", stacklevel=2)
        return self._gen

    def rng_state_dict(self) -> dict | None:
        if self._gen is None:
            return self._pending_rng
        return {"state": self._gen.get_state(), "device_type": self._gen.device.type}

    def randn(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
        return torch.randn(shape, generator=self.generator(device), device=device, dtype=dtype)

    # ---- checkpointing: every rank's own state (see the module docstring) -------------------------------------
    def rank_state_dict(self) -> dict[str, Any]:
        """This rank's state; subclasses add their buffers."""
        return {"rng": self.rng_state_dict()}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        """Restore this rank's state; {} means nothing was saved for this rank: start afresh."""
        self._gen, self._pending_rng = None, state.get("rng")

    def state_dict(self) -> dict[str, Any]:
        """Collective under DDP (Lightning calls it on every rank when it saves). Rank 0 returns every rank's
        state; the other ranks return {"ranks": None} (Lightning writes rank 0's copy only)."""
        own = self.rank_state_dict()
        if self.world_size == 1:
            return {"ranks": [own]}
        gathered = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(own, gathered, dst=0)
        return {"ranks": gathered}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "ranks" in state_dict:
            saved = dict(enumerate(state_dict["ranks"]))
        else:  # a checkpoint from before every rank was saved: one rank's state, with its rank
            saved = {state_dict["rank"]: state_dict}
        if self.rank in saved:
            self.load_rank_state_dict(saved[self.rank])
            return
        warnings.warn(f"{type(self).__name__}: the checkpoint holds the intervention state of rank(s) "
                      f"{sorted(saved)} only; rank {self.rank} starts afresh (zero passed states, its RNG reseeded)",
                      stacklevel=2)
        self.load_rank_state_dict({})
