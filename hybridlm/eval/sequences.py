"""Evaluation sequences from the data module's validation split.

Windows of `length` tokens are taken inside single validation documents when at least n documents are that long
(so position p really has p tokens of one document as context); otherwise from the packed validation stream
(documents joined by EOD), which is what the model sees in training. Windows are evenly spread and fixed, so
repeated evaluations (every N validations) compare the same tokens.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from hybridlm.data.windows import fixed_windows, gather, num_slots, segments

log = logging.getLogger(__name__)


def eval_sequences(datamodule, n: int, length: int, key: str = "eval.max_len") -> tuple[Tensor, str]:
    """-> (LongTensor (m, length) with m <= n, a description of where the windows come from). `key` is the setting
    that asked for `length`, named when the validation split is too short."""
    datamodule.setup("validate")
    corpus = getattr(datamodule, "corpus", None)
    if corpus is None:
        raise ValueError(f"eval: length diagnostics need a text corpus for their sequences; data.source="
                         f"{datamodule.cfg.source!r} has none (pass a LongTensor of sequences instead)")
    val = corpus.val
    for pack, what in ((False, "single validation documents"), (True, "the packed validation stream")):
        starts, lengths = segments(val.doc_starts, pack)
        if num_slots(lengths, length) >= n or (pack and num_slots(lengths, length) > 0):
            offsets = fixed_windows(starts, lengths, length, n)
            if len(offsets) < n:
                log.warning("eval: only %d windows of %d tokens in %s (asked for %d)", len(offsets), length, what, n)
            return torch.from_numpy(gather(val.tokens, offsets, length)), f"{len(offsets)} windows of {what}"
    raise ValueError(f"{key}: the validation split has {int(val.doc_starts[-1])} tokens, fewer than one "
                     f"sequence of {length}; lower {key} or use more validation data")
