"""Where rows come from in a packed token stream. Every function here is pure: inputs -> window start offsets.

A window is `width` = seq_len + 1 consecutive tokens (inputs = window[:-1], labels = window[1:]).
Segments are the spans a window must stay inside: the whole stream when documents are packed, or each
document (with its trailing EOD) when they are not.
"""
from __future__ import annotations

import numpy as np


def segments(doc_starts: np.ndarray, pack: bool) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the spans windows live in."""
    if pack:
        return doc_starts[:1].copy(), doc_starts[-1:] - doc_starts[:1]
    return doc_starts[:-1].copy(), np.diff(doc_starts)


def num_slots(seg_lengths: np.ndarray, width: int) -> int:
    """Most non-overlapping windows the segments hold (phase 0)."""
    return int((seg_lengths // width).sum())


def random_windows(seg_starts: np.ndarray, seg_lengths: np.ndarray, width: int, n: int,
                   rng: np.random.Generator) -> np.ndarray:
    """n distinct, non-overlapping windows at random: (n,) start offsets.

    Each segment is cut into slots of `width` tokens after a random phase (so windows start anywhere over
    many batches), and n slots are drawn without replacement. Falls back to phase 0 if the phase leaves fewer
    than n slots; the caller checks that phase 0 has at least n."""
    phase = int(rng.integers(width))
    counts = np.maximum(seg_lengths - phase, 0) // width  # (num_segments,)
    if counts.sum() < n:
        phase, counts = 0, seg_lengths // width
    picks = rng.choice(int(counts.sum()), size=n, replace=False)  # (n,) global slot ids
    return _slot_starts(seg_starts, counts, picks, phase, width)


def fixed_windows(seg_starts: np.ndarray, seg_lengths: np.ndarray, width: int, n: int) -> np.ndarray:
    """min(n, slots) evenly spaced non-overlapping windows (phase 0), always the same: validation."""
    counts = seg_lengths // width
    total = int(counts.sum())
    n = min(n, total)
    picks = (np.arange(n, dtype=np.int64) * total) // max(n, 1)  # (n,) evenly spread slot ids
    return _slot_starts(seg_starts, counts, picks, 0, width)


def _slot_starts(seg_starts, counts, picks, phase, width) -> np.ndarray:
    ends = np.cumsum(counts)  # slot ids [ends[s] - counts[s], ends[s]) belong to segment s
    seg = np.searchsorted(ends, picks, side="right")
    within = picks - (ends[seg] - counts[seg])
    return seg_starts[seg] + phase + within * width


def contiguous_starts(stream_len: int, num_rows: int, seq_len: int, k: int) -> np.ndarray:
    """Start of row g in batch k for TBTT: (num_rows,) offsets into the stream, to be read modulo stream_len.

    Row g owns the region starting at g * (stream_len // num_rows) and advances seq_len tokens per batch, so
    batch k+1 starts exactly where batch k's inputs ended (its last label is the next batch's first input).
    After its region a row runs on into the next one and wraps from the end of the stream to its start (the
    stream ends with EOD, so the wrap is a document boundary)."""
    region = stream_len // num_rows
    return (np.arange(num_rows, dtype=np.int64) * region + k * seq_len) % stream_len


def gather(tokens: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    """(n, width) int64 windows; indices wrap modulo len(tokens) (only contiguous mode ever needs it)."""
    idx = (starts[:, None] + np.arange(width, dtype=np.int64)[None, :]) % len(tokens)
    return tokens[idx].astype(np.int64)
