"""Numerical guard: a training step whose loss or gradient norm is not finite is never applied.

Detected the step it happens: the loss in `on_before_backward`, the total gradient 2-norm in
`on_before_optimizer_step` (after backward and the DDP all-reduce, before clipping and the optimizer update).
A bad step is skipped by clearing every gradient: torch optimizers pass over parameters whose .grad is None,
so the weights and the optimizer state (moments, step counts) stay exactly as they were. Lightning still
counts the step (global_step and the LR schedule advance), as when a GradScaler skips one.

guard.on_nonfinite=skip goes on after a warning naming the step and the batch; guard.max_consecutive bad steps
in a row end the run. guard.on_nonfinite=stop ends it at the first. Ending the run raises NonFiniteError before
any checkpoint of that step is written, and no checkpoint is ever written with non-finite weights, so the
newest checkpoint on disk is the last good one.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from hybridlm.config import GuardConfig

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    pass


class NonFiniteGuard(Callback):
    def __init__(self, cfg: GuardConfig):
        self.cfg = cfg
        self.consecutive = 0  # bad steps in a row (checkpointed, so a resume keeps counting)
        self.total = 0  # bad steps in the whole run
        self._loss_ok: Optional[Tensor] = None  # () bool: every loss of this optimizer step was finite
        self._batches: list[tuple[int, Any]] = []  # (batch_idx, data "batch_index") of this step's micro-batches

    # ---- detection ------------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        index = batch.get("batch_index") if isinstance(batch, dict) else None
        self._batches.append((batch_idx, index))  # read only if reported: no device sync on good steps

    def on_before_backward(self, trainer, pl_module, loss: Tensor) -> None:
        ok = torch.isfinite(loss.detach()).all()
        self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        loss_ok, self._loss_ok = self._loss_ok, None
        batches, self._batches = self._batches, []
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        checks: list[tuple[str, Tensor]] = []  # (what, () bool: finite)
        if loss_ok is not None:
            checks.append(("loss", loss_ok))
        # fp16 mixed precision: overflowing gradients are routine and GradScaler already skips those steps.
        if params and not str(trainer.precision).startswith("16"):
            checks.append(("gradient norm", torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in params]))))
        finite = torch.stack([ok.to(checks[0][1].device) for _, ok in checks]).tolist() if checks else []  # 1 sync
        bad = [what for (what, _), ok in zip(checks, finite) if not ok]
        # Under DDP the loss is per rank: skip on every rank if any rank saw a bad step, or weights diverge.
        if not trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            self.consecutive = 0
            return
        for p in params:
            p.grad = None
        self.consecutive += 1
        self.total += 1
        what = " and ".join(bad) or "loss or gradient norm on another rank"
        where = ", ".join(f"batch_idx {i}" + (f" (data batch {int(k)})" if k is not None else "") for i, k in batches)
        log.warning("numerical guard: non-finite %s at step %d, %s: update skipped (%d in a row, %d in the run)",
                    what, trainer.global_step, where, self.consecutive, self.total)
        if self.cfg.on_nonfinite == "stop" or self.consecutive >= self.cfg.max_consecutive:
            reason = ("guard.on_nonfinite=stop" if self.cfg.on_nonfinite == "stop"
                      else f"{self.consecutive} non-finite steps in a row (guard.max_consecutive)")
            raise NonFiniteError(f"numerical guard: stopping at step {trainer.global_step} after {reason}; the "
                                 f"last good checkpoint is {last_checkpoint(trainer) or 'none (none was written)'}")

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        bad = [k for k, v in checkpoint["state_dict"].items()
               if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise NonFiniteError(f"numerical guard: refusing to write a checkpoint at step {trainer.global_step}: "
                                 f"non-finite weights in {bad[:5]}{' ...' if len(bad) > 5 else ''}; the last good "
                                 f"checkpoint is {last_checkpoint(trainer) or 'none'}")

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.consecutive, self.total = int(state_dict["consecutive"]), int(state_dict["total"])


def last_checkpoint(trainer) -> Optional[str]:
    cb = trainer.checkpoint_callback  # the first ModelCheckpoint: the periodic one, which writes last.ckpt
    if cb is None:
        return None
    return getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "") or None
