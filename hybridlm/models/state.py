"""The recurrent-state contract (docs/design.md §2): `model(ids, state) -> (logits, state)`.

A model state is a list with one entry per layer; each entry is a dict of tensors (or None = the zero /
empty initial state). Mamba-2 layers hold "ssm" and "conv"; attention layers hold their key/value cache.
A missing key means zeros, so an intervention may set only the "ssm" entries. Each mixer builds its own
explicit initial state with `zero_state(batch, device, dtype)` (shapes in its docstring), and
`HybridLM.zero_state` collects them; the gated MLP after a mixer holds no state.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

LayerState = Optional[dict]
State = list[LayerState]


def map_state(state: Optional[State], fn: Callable[[Tensor], Tensor]) -> Optional[State]:
    """Apply fn to every tensor in a state (ints such as attention positions are kept)."""
    if state is None:
        return None
    return [None if s is None else {k: fn(v) if isinstance(v, Tensor) else v for k, v in s.items()} for s in state]


def detach_state(state: Optional[State]) -> Optional[State]:
    return map_state(state, lambda t: t.detach())


def select_rows(state: Optional[State], rows) -> Optional[State]:
    return map_state(state, lambda t: t[rows])


def device_dtype(module: nn.Module, device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """`device` and `dtype`, each defaulting to that of the module's first parameter."""
    p = next(module.parameters())
    return (p.device if device is None else torch.device(device)), (p.dtype if dtype is None else dtype)
