"""Streaming evaluation through the state contract: a sequence is fed in chunks with the state passed along,
so activation memory depends on the chunk length, not on the sequence length (docs/design.md §2)."""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from hybridlm.models.state import State


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def chunks(ids: Tensor, chunk_len: int) -> Iterator[tuple[int, Tensor]]:
    """(start, ids[:, start:start+chunk_len]) over the columns of ids (b, L)."""
    if chunk_len <= 0:
        raise ValueError(f"chunk_len must be > 0, got {chunk_len}")
    for s in range(0, ids.shape[1], chunk_len):
        yield s, ids[:, s:s + chunk_len]


@torch.no_grad()
def prefill(model, ids: Tensor, chunk_len: int, state: State | None = None) -> tuple[Tensor, State]:
    """Run ids (b, L >= 1) through the model in chunks -> (logits at the last position (b, V), final state)."""
    if ids.shape[1] == 0:
        raise ValueError("prefill needs at least one token")
    ids = ids.to(model_device(model))
    for _, piece in chunks(ids, chunk_len):
        logits, state = model(piece, state)
    return logits[:, -1], state


@torch.no_grad()
def greedy_generate(model, prompt: Tensor, n_new: int, chunk_len: int) -> Tensor:
    """Greedy decoding: prompt (b, L) -> the next n_new argmax tokens (b, n_new), one token per step through the
    recurrent state (no re-reading of the prompt)."""
    last, state = prefill(model, prompt, chunk_len)
    if n_new == 0:
        return prompt.new_zeros(prompt.shape[0], 0)
    out = []
    for i in range(n_new):
        tok = last.argmax(-1)  # (b,)
        out.append(tok)
        if i + 1 < n_new:
            logits, state = model(tok[:, None], state)
            last = logits[:, -1]
    return torch.stack(out, dim=1)
