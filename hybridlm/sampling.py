"""Choosing the next token from a model's logits: greedy, or sampling after temperature, top-k and top-p.

The filters apply in that order (temperature, then top-k, then top-p, as transformers' sampling does), each
setting the logits of removed tokens to -inf:
- temperature t > 0 divides the logits by t; t = 0 means greedy decoding (argmax; top-k and top-p then
  change nothing).
- top-k keeps the k largest logits (every token tied with the k-th is kept too); 0 turns it off.
- top-p (nucleus) keeps the smallest set of most likely tokens whose probabilities sum to at least p: a token
  is removed when the tokens more likely than it already reach p. 1.0 turns it off; the most likely token is
  always kept.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from hybridlm.validation import need


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Raise ValueError naming the key of a setting outside its range."""
    need(temperature >= 0, "temperature", f"must be >= 0 (0: greedy), got {temperature}")
    need(top_k >= 0, "top_k", f"must be >= 0 (0: off), got {top_k}")
    need(0 < top_p <= 1, "top_p", f"must be in (0, 1] (1: off), got {top_p}")


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """logits (..., V) with all but the k largest set to -inf (ties with the k-th kept); k = 0: unchanged."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """logits (..., V) with every token outside the nucleus of mass p set to -inf; p = 1: unchanged."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the tokens more likely than each one
    remove_sorted = before >= p
    remove_sorted[..., 0] = False  # the most likely token always stays
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def filter_logits(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Temperature, then top-k, then top-p, in float32: the logits whose softmax is sampled from (temperature > 0)."""
    logits = logits.float() / temperature
    return top_p_filter(top_k_filter(logits, top_k), top_p)


def next_token(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               generator: Optional[torch.Generator] = None) -> Tensor:
    """logits (b, V) -> next token ids (b,): argmax when temperature is 0, else one draw per row from the
    filtered distribution (with `generator`, on the logits' device, for reproducible draws)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
