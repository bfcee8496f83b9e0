"""The LightningModule: builds the model from the config, asks interventions for initial states, trains with
next-token loss. Interventions are callbacks: they set `self.initial_state` before a step and read
`outputs["final_state"]` after it, so this module knows nothing about any particular intervention."""
from __future__ import annotations

import math
import time
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from hybridlm.config import Config, to_config
from hybridlm.models.hybrid_lm import HybridLM
from hybridlm.models.state import State, detach_state


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


class HybridLMModule(L.LightningModule):
    def __init__(self, cfg: Any, model: Optional[HybridLM] = None):
        """cfg: a Config, OmegaConf node or plain dict. `model` lets callers pass a model already built
        (e.g. loaded from an official checkpoint, with adapters applied); otherwise one is built from cfg."""
        super().__init__()
        typed = cfg if isinstance(cfg, Config) else to_config(cfg)
        # Stored as a plain dict so checkpoints load without this package's classes being pickled.
        self.save_hyperparameters({"cfg": OmegaConf.to_container(OmegaConf.structured(typed), resolve=True)})
        self.cfg = typed
        self.model = model if model is not None else HybridLM(typed.model)
        self._compiled_forward = None  # cfg.compile: see train_forward
        self.initial_state: Optional[State] = None
        self._last_batch_time: Optional[float] = None

    def forward(self, input_ids: torch.Tensor, state: Optional[State] = None):
        return self.model(input_ids, state)

    def train_forward(self, input_ids: torch.Tensor, state: Optional[State]):
        """The model's forward as training steps run it: through torch.compile (inductor) with cfg.compile.
        Compiled is the bound method, not the module: an attribute holding a compiled module would join the
        module tree and rename the checkpoint's parameters; it is built at the first step, in the process that
        trains (a DDP spawn pickles the module before). Validation and evaluation stay eager (other shapes)."""
        if not self.cfg.compile:
            return self.model(input_ids, state)
        if self._compiled_forward is None:
            self._compiled_forward = torch.compile(self.model.forward)
        return self._compiled_forward(input_ids, state)

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        state, self.initial_state = self.initial_state, None
        logits, final_state = self.train_forward(batch["input_ids"], state)
        loss = lm_loss(logits, batch["labels"])
        self.log("train/loss", loss, prog_bar=True)
        return {"loss": loss, "final_state": detach_state(final_state)}

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_batch_time is not None:
            tokens = batch["input_ids"].numel() * self.trainer.world_size
            self.log("train/tokens_per_s", tokens / (now - self._last_batch_time), prog_bar=True)
        self._last_batch_time = now
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])

    def on_validation_start(self) -> None:
        self._last_batch_time = None  # validation time is not training throughput

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits, _ = self.model(batch["input_ids"])
        loss = lm_loss(logits, batch["labels"])
        # The epoch mean weighs batches by their size, which Lightning cannot tell from a dict that also holds the
        # scalar batch_index (it warns, then takes the first tensor's length: this same number).
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def on_fit_start(self) -> None:
        n_total = sum(p.numel() for p in self.model.parameters())
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        for logger in self.loggers:
            logger.log_hyperparams({"params/total": n_total, "params/trainable": n_train,
                                    "params/non_embedding": self.model.num_params(non_embedding=True)})

    def configure_optimizers(self):
        o = self.cfg.optim
        decay, no_decay = [], []
        for p in self.model.parameters():
            if not p.requires_grad:
                continue
            # 1-D params are A_log, D, dt_bias, norm weights and biases: weight decay would pull them to 0.
            (no_decay if p.ndim < 2 or getattr(p, "_no_weight_decay", False) else decay).append(p)
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        total = max(1, self.cfg.trainer.max_steps)

        def lr_factor(step: int) -> float:
            if step < o.warmup_steps:
                return (step + 1) / (o.warmup_steps + 1)
            progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
            return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
