"""recall_stream: endless "recent recall" streams of (key, value) token pairs, served as a token corpus.

Each stream is a sequence of pairs. With probability p_set a pair is a SET: a uniform key k in [0, K) and a fresh
uniform value v in [0, V), which becomes k's binding. Otherwise it is a GET: the key of a SET drawn uniformly from
the SET pairs among the last D pairs (D = recall_window), followed by that key's current binding. A pair with no
SET in the last D pairs is always a SET. Token ids (vocabulary 2K + 2V):

    SET key k -> k          GET key k -> K + k
    SET value v -> 2K + v   GET answer v -> 2K + V + v   (the only tokens that need memory: "recall targets")

A model trained on windows of T tokens from a zero state needs memory across its whole window (D = T/2 pairs =
T tokens by default) but never sees what a state holding more than T tokens of pairs looks like; that is the
length-generalization failure this task is built to show (Buitrago Ruiz & Gu 2025).

The streams are a pure function of (seed, split): `recall_corpus` packs `num_streams` training streams and
`val_streams` validation streams as documents, so random windows, contiguous (TBTT) rows and evaluation sequences
all come from the same code paths as a text corpus. Streams are packed back to back without a delimiter; a window
that straddles two streams (rare: about seq_len / stream_len of them) has GETs whose answers it cannot know.
"""
from __future__ import annotations

import numpy as np

from hybridlm.data.config import DataConfig, SyntheticConfig
from hybridlm.data.packed import Corpus, PackedStream

_TRAIN, _VAL = 0, 1  # part of the seed, so training and validation streams never coincide


def recall_vocab_size(syn: SyntheticConfig) -> int:
    return 2 * syn.num_keys + 2 * syn.num_values


def answer_id_range(syn: SyntheticConfig) -> tuple[int, int]:
    """[lo, hi) of the GET-answer ids (for eval.target_id_range)."""
    lo = 2 * syn.num_keys + syn.num_values
    return lo, lo + syn.num_values


def recall_streams(n_streams: int, n_tokens: int, num_keys: int, num_values: int, p_set: float, window: int,
                   rng: np.random.Generator) -> np.ndarray:
    """(n_streams, n_tokens) int64 independent streams, generated pair by pair, vectorized over the streams."""
    K, V, S = num_keys, num_values, n_streams
    rows = np.arange(S)
    binding = np.zeros((S, K), dtype=np.int64)  # every key's current value (only read for keys SET recently)
    recent = np.full((S, window), -1, dtype=np.int64)  # ring buffer: the key SET at each of the last D pairs, or -1
    out = np.empty((S, n_tokens), dtype=np.int64)
    for j in range(n_tokens // 2):
        valid = recent >= 0  # (S, D)
        n_valid = valid.sum(1)  # (S,)
        # the u-th valid slot, u uniform in [0, n_valid): a uniform SET event among the last D pairs
        u = np.floor(rng.random(S) * n_valid).astype(np.int64)  # (S,)
        slot = np.argmax(np.cumsum(valid, 1) > u[:, None], axis=1)  # (S,)
        get_key = recent[rows, slot]
        is_set = (rng.random(S) < p_set) | (n_valid == 0)
        key = np.where(is_set, rng.integers(K, size=S), get_key)
        binding[rows, key] = np.where(is_set, rng.integers(V, size=S), binding[rows, key])
        recent[:, j % window] = np.where(is_set, key, -1)
        out[:, 2 * j] = np.where(is_set, key, K + key)
        out[:, 2 * j + 1] = np.where(is_set, 2 * K, 2 * K + V) + binding[rows, key]
    return out


def _packed(streams: np.ndarray) -> PackedStream:
    n, length = streams.shape
    dtype = np.uint8 if streams.max() < 256 else np.int32
    return PackedStream(tokens=streams.reshape(-1).astype(dtype),
                        doc_starts=np.arange(n + 1, dtype=np.int64) * length)


def recall_corpus(cfg: DataConfig) -> Corpus:
    syn = cfg.synthetic
    window = syn.recall_window or max(1, cfg.seq_len // 2)

    def make(n: int, split: int) -> PackedStream:
        rng = np.random.default_rng([cfg.seed, split])
        return _packed(recall_streams(n, syn.stream_len, syn.num_keys, syn.num_values, syn.p_set, window, rng))

    return Corpus(train=make(syn.num_streams, _TRAIN), val=make(syn.val_streams, _VAL))
