"""Noise initial states: `random_noise` (iid N(0, sigma^2)) and `fitted_noise` (iid N(mean, std^2) with the
mean and std of the final states seen so far in training, per layer and head).

Pooling for fitted_noise (as in the paper: one mean and one std per layer and head):
- SSM state (b, nheads, headdim, d_state): statistics per (layer, head), pooled over batch, headdim, d_state.
- conv state (b, d_conv-1, conv_dim), with include_conv: per (layer, channel), pooled over batch and the
  d_conv-1 positions (a conv channel belongs to one head's x or to B/C, so per channel is the finest analogue).
The std is the unbiased sample std (divisor count-1), i.e. torch.std over every pooled entry seen so far.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hybridlm.interventions.base import InitialStateCallback
from hybridlm.models.state import State

SSM_GROUP_DIM = 1  # heads in (b, nheads, headdim, d_state)
CONV_GROUP_DIM = 2  # channels in (b, d_conv-1, conv_dim)


class RunningMoments:
    """Exact streaming per-group mean and variance: each new tensor's moments are merged into the running ones
    with Chan et al.'s pairwise formula, in float64 (numerically stable, independent of how data is split)."""

    def __init__(self) -> None:
        self.count = 0  # entries pooled per group (the same for every group)
        self.mean: Tensor | None = None  # (groups,) float64
        self.m2: Tensor | None = None  # (groups,) float64: sum of squared deviations from the mean

    def update(self, x: Tensor, group_dim: int) -> None:
        xs = x.detach().to(torch.float64).movedim(group_dim, -1).reshape(-1, x.shape[group_dim])  # (m, groups)
        m = xs.shape[0]
        mean_b = xs.mean(0)
        m2_b = ((xs - mean_b) ** 2).sum(0)
        if self.count == 0:
            self.count, self.mean, self.m2 = m, mean_b, m2_b
            return
        n = self.count + m
        delta = mean_b - self.mean.to(mean_b.device)
        self.mean = self.mean.to(mean_b.device) + delta * (m / n)
        self.m2 = self.m2.to(m2_b.device) + m2_b + delta**2 * (self.count * m / n)
        self.count = n

    def std(self) -> Tensor:
        if self.count < 2:
            return torch.zeros_like(self.mean)
        return (self.m2 / (self.count - 1)).sqrt()

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": None if self.mean is None else self.mean.cpu(),
                "m2": None if self.m2 is None else self.m2.cpu()}

    @classmethod
    def from_state_dict(cls, d: dict) -> RunningMoments:
        r = cls()
        r.count, r.mean, r.m2 = d["count"], d["mean"], d["m2"]
        return r


def _broadcast(v: Tensor, ndim: int, group_dim: int) -> Tensor:
    shape = [1] * ndim
    shape[group_dim] = -1
    return v.view(shape)


class RandomNoiseCallback(InitialStateCallback):
    """Every Mamba-2 layer starts each batch from iid N(0, sigma^2) (one sigma for all layers and heads)."""

    def make_initial_state(self, pl_module, batch_size: int, batch_idx: int) -> State | None:
        model = pl_module.model
        keys = ("ssm", "conv") if self.cfg.include_conv else ("ssm",)
        state: State = [None] * model.cfg.n_layer
        for i, mixer in model.mamba_layers():
            zero = mixer.zero_state(batch_size)
            state[i] = {k: self.cfg.sigma * self.randn(zero[k].shape, zero[k].device, zero[k].dtype) for k in keys}
        return state

    def observe(self, pl_module, final_state: State) -> None:
        pass  # the noise does not depend on what the model produced


class FittedNoiseCallback(InitialStateCallback):
    """Initial state ~ N(mean[l, h], std[l, h]^2) iid, with the running statistics of the final states seen so far
    (zeros before the first step). Statistics are in `state_dict` (checkpointed) and exportable with `export`."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.stats: dict[str, RunningMoments] = {}  # "{layer}.ssm" / "{layer}.conv"

    def entries(self) -> list[tuple[str, int]]:
        return [("ssm", SSM_GROUP_DIM)] + ([("conv", CONV_GROUP_DIM)] if self.cfg.include_conv else [])

    def moments(self, key: str, groups: int, device) -> tuple[Tensor, Tensor]:
        """(mean, std) float64 of shape (groups,); zeros before any statistics exist."""
        r = self.stats.get(key)
        if r is None or r.count == 0:
            z = torch.zeros(groups, dtype=torch.float64, device=device)
            return z, z
        return r.mean.to(device), r.std().to(device)

    def make_initial_state(self, pl_module, batch_size: int, batch_idx: int) -> State | None:
        model = pl_module.model
        state: State = [None] * model.cfg.n_layer
        for i, mixer in model.mamba_layers():
            zero = mixer.zero_state(batch_size)
            state[i] = {}
            for name, gdim in self.entries():
                shape, dt, device = zero[name].shape, zero[name].dtype, zero[name].device
                mean, std = self.moments(f"{i}.{name}", shape[gdim], device)
                noise = self.randn(shape, device, dt)
                state[i][name] = (_broadcast(mean, len(shape), gdim) + _broadcast(std, len(shape), gdim) * noise).to(dt)
        return state

    def observe(self, pl_module, final_state: State) -> None:
        for i, _ in pl_module.model.mamba_layers():
            for name, gdim in self.entries():
                self.stats.setdefault(f"{i}.{name}", RunningMoments()).update(final_state[i][name], gdim)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.cfg.export_path and trainer.is_global_zero:
            path = Path(self.cfg.export_path)
            self.export(path if path.is_absolute() else Path(trainer.default_root_dir) / path)

    # ---- persistence ------------------------------------------------------------------------------------------
    def rank_state_dict(self) -> dict[str, Any]:
        return {**super().rank_state_dict(), "stats": {k: r.state_dict() for k, r in self.stats.items()}}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        super().load_rank_state_dict(state)
        self.stats = {k: RunningMoments.from_state_dict(d) for k, d in state.get("stats", {}).items()}

    def export(self, path) -> Path:
        """Write {"{layer}.{ssm|conv}": {"count", "mean", "std"}} to a .pt (tensors) or .json (lists) file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        table = {k: {"count": r.count, "mean": r.mean.cpu(), "std": r.std().cpu()}
                 for k, r in self.stats.items() if r.count > 0}
        meta = {"pooled": {"ssm": "per (layer, head) over batch, headdim, d_state",
                           "conv": "per (layer, channel) over batch, d_conv-1 positions"},
                "std": "unbiased (divisor count-1)"}
        if path.suffix == ".json":
            js = {k: {"count": v["count"], "mean": v["mean"].tolist(), "std": v["std"].tolist()}
                  for k, v in table.items()}
            path.write_text(json.dumps({"stats": js, **meta}, indent=1))
        elif path.suffix == ".pt":
            torch.save({"stats": table, **meta}, path)
        else:
            raise ValueError(f"intervention.export_path: must end in .pt or .json, got {str(path)!r}")
        return path

