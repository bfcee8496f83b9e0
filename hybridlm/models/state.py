"""The recurrent-state contract: `model(ids, state) -> (logits, state)`.

A model state is a list with one entry per layer; each entry is a dict of tensors (or None = the zero /
empty initial state). Mamba-2 layers hold "ssm" and "conv"; attention layers hold their key/value cache.
A missing key means zeros, so an intervention may set only the "ssm" entries.
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor

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
