"""The packed token corpus every token-stream source produces (text corpora in corpus.py, the synthetic
recall_stream task in recall_stream.py) and the batch code reads windows from."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PackedStream:
    """doc0 EOD doc1 EOD ...: tokens (n,); document i with its EOD is tokens[doc_starts[i]:doc_starts[i+1]]."""

    tokens: np.ndarray
    doc_starts: np.ndarray  # (num_docs + 1,) int64


@dataclass
class Corpus:
    train: PackedStream
    val: PackedStream
