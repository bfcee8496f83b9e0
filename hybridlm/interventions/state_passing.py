"""`state_passing`: row i of this batch starts from the detached final state of row i of the previous batch
(an unrelated sequence), with an optional per-row reset probability (reset rows start from zeros).

What is passed: the SSM state of every Mamba-2 layer; with include_conv its conv state; with include_attention
the whole state of every attention layer (its key/value window, position counter and qkv conv state).
Batch-size changes: a smaller batch takes the first rows; in a larger batch the extra rows start from zeros and,
because an attention cache is one dense tensor with no per-row mask, attention layers start empty for that batch.
Under DDP every rank passes its own states; checkpoints hold every rank's buffer (see base.py), so a resumed run
continues exactly on every rank.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hybridlm.interventions.base import InitialStateCallback, module_device, state_to_cpu
from hybridlm.models.state import State, detach_state, map_state, select_rows


def batch_size_of(state: State) -> int:
    for s in state:
        for v in (s or {}).values():
            if isinstance(v, Tensor):
                return v.shape[0]
    raise ValueError("state holds no tensors")


class StatePassingCallback(InitialStateCallback):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.prev: State | None = None  # the kept part of the previous micro-batch's final state, detached

    def kept(self, pl_module, final_state: State) -> State:
        model = pl_module.model
        keys = ("ssm", "conv") if self.cfg.include_conv else ("ssm",)
        out: State = [None] * len(final_state)
        for i, _ in model.mamba_layers():
            out[i] = {k: final_state[i][k] for k in keys}
        if self.cfg.include_attention:
            for i, _ in model.attention_layers():
                out[i] = dict(final_state[i])
        return detach_state(out)

    def observe(self, pl_module, final_state: State) -> None:
        self.prev = self.kept(pl_module, final_state)

    def make_initial_state(self, pl_module, batch_size: int, batch_idx: int) -> State | None:
        if self.prev is None:
            return None
        device = module_device(pl_module)
        prev = map_state(self.prev, lambda t: t.to(device))  # a no-op unless just loaded from a checkpoint
        prev_b = batch_size_of(prev)
        if batch_size <= prev_b:
            state = select_rows(prev, slice(0, batch_size))
        else:  # Mamba-2 layers gain zero rows; attention layers start empty
            mamba = {i for i, _ in pl_module.model.mamba_layers()}
            state = [self._grow(s, batch_size - prev_b) if i in mamba else None for i, s in enumerate(prev)]
        if self.cfg.reset_prob > 0:
            reset = torch.rand(batch_size, generator=self.generator(device), device=device) < self.cfg.reset_prob
            state = map_state(state, lambda t: torch.where(reset.view(-1, *[1] * (t.ndim - 1)), torch.zeros_like(t), t))
        return state

    @staticmethod
    def _grow(s: dict, extra: int) -> dict:
        """Append `extra` zero rows to every tensor of a Mamba-2 layer state, each in its own dtype."""
        return {k: torch.cat([v, v.new_zeros(extra, *v.shape[1:])]) for k, v in s.items()}

    def rank_state_dict(self) -> dict[str, Any]:
        return {**super().rank_state_dict(), "prev": state_to_cpu(self.prev)}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        super().load_rank_state_dict(state)
        self.prev = state.get("prev")
