"""BatchSource: batch k of rank r as a pure function of (seed, k, r), computed directly (no fast-forwarding).

A batch is {"input_ids": (b, T) int64, "labels": (b, T) int64, "batch_index": int64 scalar tensor}.
The global batch has R = batch_size * world_size rows; rank r takes rows [r*b, (r+1)*b), so ranks never share
a row, and a global batch does not depend on how many workers produce it.
- random: one generator seeded from (seed, k) draws R non-overlapping windows of the training stream.
- contiguous (TBTT): row g reads the stream from g * (len // R) + k * T (see windows.contiguous_starts).
- mix_prob > 0: each row is replaced by a synthetic task row with probability mix_prob (same generator).
- synthetic source: row g of batch k is generated from a generator seeded from (seed, k, g).
Validation is a fixed list of windows of the validation stream (or fixed synthetic rows), batch j of it going
to rank j % world_size.
"""
from __future__ import annotations

import numpy as np
import torch

from hybridlm.data.config import DataConfig
from hybridlm.data.errors import DataError
from hybridlm.data.packed import Corpus, PackedStream
from hybridlm.data.synthetic import synthetic_row
from hybridlm.data.tokenizers import Tokenizer
from hybridlm.data.windows import contiguous_starts, fixed_windows, gather, num_slots, random_windows, segments

# Distinct streams of randomness: the tag is part of every seed so train / val / synthetic rows never coincide.
_TRAIN, _VAL, _SYNTH = 0, 1, 2
SYNTHETIC_BATCHES_PER_EPOCH = 1000


class BatchSource:
    """Everything needed to build any batch; picklable, so DataLoader workers get a copy."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, corpus: Corpus | None, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"data: rank {rank} is outside world_size {world_size}")
        self.cfg, self.tokenizer, self.corpus = cfg, tokenizer, corpus
        self.rank, self.world_size = rank, world_size
        self.rows = cfg.batch_size * world_size  # R: rows of one global batch
        self.width = cfg.seq_len + 1
        if corpus is not None:
            self._seg_starts, self._seg_lengths = segments(corpus.train.doc_starts, cfg.pack)
            self._check_train(corpus.train)
            self.val_starts = self._val_windows(corpus.val)
        else:
            self.val_starts = None
        if (cfg.source == "synthetic" and corpus is None) or cfg.mix_prob > 0:  # rows from synthetic_row
            self._check_synthetic()

    # ----- checks that need the corpus -----------------------------------------------------------------------
    def _check_train(self, train: PackedStream) -> None:
        w, n = self.width, len(train.tokens)
        if n < w:
            raise DataError(f"data.seq_len: a window of seq_len+1={w} tokens is longer than the whole training "
                            f"stream ({n} tokens); lower seq_len or add documents")
        if not self.cfg.pack and self._seg_lengths.max() < w:
            raise DataError(f"data.seq_len: a window of seq_len+1={w} tokens is longer than every training "
                            f"document (longest: {int(self._seg_lengths.max())} tokens with its EOD); lower "
                            "seq_len or set pack=true")
        if self.cfg.stream_mode == "contiguous":
            if n // self.rows < w:
                raise DataError(f"data.batch_size: contiguous mode gives each of the batch_size*world_size="
                                f"{self.rows} rows a region of {n // self.rows} tokens of the {n}-token stream, "
                                f"shorter than a window of seq_len+1={w}; lower batch_size or seq_len, or add "
                                "documents")
        elif num_slots(self._seg_lengths, w) < self.rows:
            raise DataError(f"data.batch_size: the training stream holds only {num_slots(self._seg_lengths, w)} "
                            f"non-overlapping windows of seq_len+1={w} tokens, fewer than the "
                            f"batch_size*world_size={self.rows} rows of one batch; lower batch_size or seq_len, or "
                            "add documents")

    def _val_windows(self, val: PackedStream) -> np.ndarray | None:
        cfg = self.cfg
        if cfg.val_fraction == 0 or cfg.val_batches == 0:
            return None
        starts, lengths = segments(val.doc_starts, cfg.pack)
        if num_slots(lengths, self.width) == 0:
            what = "the whole validation stream" if cfg.pack else "every validation document"
            raise DataError(f"data.seq_len: a window of seq_len+1={self.width} tokens is longer than {what} "
                            f"(longest: {int(lengths.max())} tokens); lower seq_len or raise val_fraction")
        return fixed_windows(starts, lengths, self.width, cfg.val_batches * cfg.batch_size)

    def _check_synthetic(self) -> None:
        try:  # a passkey row needs room for the needle and question: fail now, not at batch 1000
            self._synthetic_row(np.random.default_rng(0))
        except ValueError as e:
            raise DataError(f"data.seq_len: {self.cfg.seq_len} is too short for synthetic.task="
                            f"{self.cfg.synthetic.task!r}: {e}") from e

    # ----- batches ---------------------------------------------------------------------------------------------
    def batches_per_epoch(self) -> int:
        """Lightning's epoch length (len of the train DataLoader); the stream itself never ends."""
        cfg = self.cfg
        if cfg.batches_per_epoch:
            return cfg.batches_per_epoch
        if self.corpus is None:
            return SYNTHETIC_BATCHES_PER_EPOCH
        n = len(self.corpus.train.tokens)
        if cfg.stream_mode == "contiguous":
            return max(1, (n // self.rows) // cfg.seq_len)  # every row has crossed its own region once
        return max(1, n // (self.rows * cfg.seq_len))  # about one pass over the training tokens

    def train_batch(self, k: int) -> dict[str, torch.Tensor]:
        cfg, b, T = self.cfg, self.cfg.batch_size, self.cfg.seq_len
        first = self.rank * b  # global index of this rank's first row
        rng = np.random.default_rng([cfg.seed, _TRAIN, k])
        inputs = np.zeros((b, T), dtype=np.int64)
        labels = np.zeros((b, T), dtype=np.int64)
        synthetic = np.ones(b, dtype=bool)
        if self.corpus is not None:
            tokens = self.corpus.train.tokens
            if cfg.stream_mode == "contiguous":
                starts = contiguous_starts(len(tokens), self.rows, T, k)  # (R,)
            else:
                starts = random_windows(self._seg_starts, self._seg_lengths, self.width, self.rows, rng)  # (R,)
            windows = gather(tokens, starts[first:first + b], self.width)  # (b, T+1)
            inputs, labels = windows[:, :-1].copy(), windows[:, 1:].copy()
            synthetic = (rng.random(self.rows) < cfg.mix_prob)[first:first + b]  # all False when mix_prob == 0
        for i in np.flatnonzero(synthetic):
            inputs[i], labels[i] = self._synthetic_row(np.random.default_rng([cfg.seed, _SYNTH, k, first + i]))
        return _as_batch(inputs, labels, k)

    def _synthetic_row(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        syn = self.cfg.synthetic
        filler = None
        corpus = syn.passkey_filler == "corpus" or (syn.passkey_filler == "mixed" and rng.random() < 0.5)
        if syn.task == "passkey" and corpus:
            tokens = self.corpus.train.tokens
            start = np.array([int(rng.integers(len(tokens)))])
            filler = gather(tokens, start, self.width)[0].tolist()  # enough corpus text for the whole row
        return synthetic_row(syn.task, self.cfg.seq_len, rng, vocab_size=syn.vocab_size,
                             num_kv_pairs=syn.num_kv_pairs, copy_len=syn.copy_len, tokenizer=self.tokenizer,
                             digits=syn.passkey_digits, filler=filler)

    def num_val_batches(self) -> int:
        """Global number of validation batches (all ranks together)."""
        if self.val_starts is not None:
            return -(-len(self.val_starts) // self.cfg.batch_size)
        return self.cfg.val_batches if self.corpus is None else 0

    def val_batch_ids(self) -> list[int]:
        return list(range(self.rank, self.num_val_batches(), self.world_size))

    def val_batch(self, j: int) -> dict[str, torch.Tensor]:
        cfg, b = self.cfg, self.cfg.batch_size
        if self.val_starts is not None:
            windows = gather(self.corpus.val.tokens, self.val_starts[j * b:(j + 1) * b], self.width)
            return _as_batch(windows[:, :-1], windows[:, 1:], j)
        rows = [self._synthetic_row(np.random.default_rng([cfg.seed, _VAL, j, i])) for i in range(b)]
        return _as_batch(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]), j)


def _as_batch(inputs: np.ndarray, labels: np.ndarray, index: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.int64)),
            "labels": torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
            "batch_index": torch.tensor(index, dtype=torch.long)}
