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

key_gap = G > 0 (G >= D, K > G): a SET never reuses a key SET in the last G pairs. With G = T/2 no training
window ever overwrites a binding, so a model that stores every pair and forgets nothing is optimal at T; past T
keys come back with new values and old bindings interfere unless the model learned to forget (the "keys that
do not repeat inside a window" of issue 13, Stuffed Mamba's "state overflow").

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


def _nth_true(mask: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Per row, the column of the u-th (0-based) True of `mask` (S, N); u < mask.sum(1)."""
    return np.argmax(np.cumsum(mask, 1) > u[:, None], axis=1)


def recall_streams(n_streams: int, n_tokens: int, num_keys: int, num_values: int, p_set: float, window: int,
                   rng: np.random.Generator, key_gap: int = 0) -> np.ndarray:
    """(n_streams, n_tokens) int64 independent streams, generated pair by pair, vectorized over the streams.

    key_gap > 0: a SET's key is uniform among the keys NOT SET in the last key_gap pairs (needs num_keys >
    key_gap), so within any key_gap pairs every key has at most one binding and nothing is ever overwritten."""
    K, V, S = num_keys, num_values, n_streams
    rows = np.arange(S)
    binding = np.zeros((S, K), dtype=np.int64)  # every key's current value (only read for keys SET recently)
    recent = np.full((S, window), -1, dtype=np.int64)  # ring buffer: the key SET at each of the last D pairs, or -1
    gap_ring = np.full((S, max(key_gap, 1)), -1, dtype=np.int64)  # the key SET at each of the last key_gap pairs
    gap_count = np.zeros((S, K + 1), dtype=np.int64)  # SETs of each key in the last key_gap pairs (column K: -1)
    out = np.empty((S, n_tokens), dtype=np.int64)
    for j in range(n_tokens // 2):
        valid = recent >= 0  # (S, D)
        n_valid = valid.sum(1)  # (S,)
        # the u-th valid slot, u uniform in [0, n_valid): a uniform SET event among the last D pairs
        u = np.floor(rng.random(S) * n_valid).astype(np.int64)  # (S,)
        get_key = recent[rows, _nth_true(valid, u)]
        is_set = (rng.random(S) < p_set) | (n_valid == 0)
        if key_gap:
            free = gap_count[:, :K] == 0  # (S, K): keys not SET in the last key_gap pairs
            set_key = _nth_true(free, np.floor(rng.random(S) * free.sum(1)).astype(np.int64))
        else:
            set_key = rng.integers(K, size=S)
        key = np.where(is_set, set_key, get_key)
        binding[rows, key] = np.where(is_set, rng.integers(V, size=S), binding[rows, key])
        recent[:, j % window] = np.where(is_set, key, -1)
        if key_gap:
            leaving = gap_ring[:, j % key_gap]  # the pair key_gap back leaves the gap window (-1 -> column K)
            gap_count[rows, np.where(leaving >= 0, leaving, K)] -= 1
            gap_ring[:, j % key_gap] = np.where(is_set, key, -1)
            gap_count[rows, np.where(is_set, key, K)] += 1
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
        return _packed(recall_streams(n, syn.stream_len, syn.num_keys, syn.num_values, syn.p_set, window, rng,
                                      key_gap=syn.key_gap))

    return Corpus(train=make(syn.num_streams, _TRAIN), val=make(syn.val_streams, _VAL))
