"""HybridDataModule: the Lightning side of the data subsystem (loaders, rank, exact resume).

Exact resume: the training stream is endless and batch k is computed directly from (seed, k, rank) by
`BatchSource.train_batch`, so restarting at batch n costs nothing. The main process records the last batch
it handed to the model (`on_before_batch_transfer`, from the batch's "batch_index"; worker processes never
count), `state_dict()` returns {"next_batch": n}, and Lightning stores it in every checkpoint and gives it
back to `load_state_dict()` before the train DataLoader is iterated. `len(train_dataloader())` is
`batches_per_epoch`: Lightning ends an epoch after that many batches and, on a mid-epoch resume, restores how
many it had already seen, so epochs stay aligned with batch indices.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hybridlm.data.batches import BatchSource
from hybridlm.data.config import DataConfig
from hybridlm.data.corpus import load_corpus
from hybridlm.data.errors import DataError
from hybridlm.data.packed import Corpus
from hybridlm.data.recall_stream import recall_vocab_size
from hybridlm.data.tokenizers import check_vocab, load_tokenizer


class _Cursor:
    """The next training batch index; shared by the datamodule and its train loader (copied into workers when
    the loader is iterated, which is when a run or an epoch starts)."""

    def __init__(self) -> None:
        self.next_batch = 0


class _BatchStream(IterableDataset):
    """Yields make_batch(i) for the given indices; worker w of W takes every W-th one. DataLoader collects
    worker results round-robin, so the main process sees the indices in order."""

    def __init__(self, make_batch: Callable[[int], dict], indices: Callable[[], Iterator[int]], length: int):
        self.make_batch, self.indices, self.length = make_batch, indices, length

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for n, i in enumerate(self.indices()):
            if n % workers == worker:
                yield self.make_batch(i)

    def __len__(self) -> int:
        return self.length


class _TrainIndices:
    """next_batch, next_batch + 1, ... read from the cursor when iteration starts (picklable, unlike a lambda)."""

    def __init__(self, cursor: _Cursor):
        self.cursor = cursor

    def __call__(self) -> Iterator[int]:
        k = self.cursor.next_batch
        while True:
            yield k
            k += 1


class _ResumableLoader(DataLoader):
    """The loader is resumable on its own too: Lightning saves and restores the state of loaders that have
    state_dict/load_state_dict. Without them it warns on every mid-epoch resume that the data order is lost,
    which is not true here."""

    def state_dict(self) -> dict[str, int]:
        return {"next_batch": self.dataset.indices.cursor.next_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.dataset.indices.cursor.next_batch = int(state["next_batch"])


class HybridDataModule(L.LightningDataModule):
    """Batches {"input_ids": (b, T), "labels": (b, T), "batch_index": scalar} with T = cfg.seq_len.

    rank/world_size are used when no Trainer is attached; under a Trainer its global_rank/world_size win.
    checkpoint / checkpoint_tokenizer: the checkpoint that fixes model_vocab_size ("init_from=PATH") and its
    tokenizer, when there is one; they only shape the advice of a vocabulary error (see check_vocab)."""

    def __init__(self, cfg: DataConfig, model_vocab_size: int | None = None, rank: int = 0,
                 world_size: int = 1, checkpoint: str | None = None, checkpoint_tokenizer: str | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self._rank, self._world_size = rank, world_size
        self.tokenizer = load_tokenizer(cfg.tokenizer, cfg.eod_token)
        recall = cfg.source == "synthetic" and cfg.synthetic.task == "recall_stream"
        if recall:  # token ids of its own; the tokenizer is never used
            if model_vocab_size is not None and recall_vocab_size(cfg.synthetic) > model_vocab_size:
                raise DataError(f"data.synthetic: recall_stream uses 2*num_keys+2*num_values="
                                f"{recall_vocab_size(cfg.synthetic)} ids, more than the model's vocab_size "
                                f"{model_vocab_size}; lower num_keys / num_values or raise model.vocab_size")
        else:
            check_vocab(self.tokenizer, model_vocab_size, checkpoint, checkpoint_tokenizer)
        uses_ids = cfg.synthetic.task in ("mqar", "copy") and (cfg.source == "synthetic" or cfg.mix_prob > 0)
        if uses_ids and model_vocab_size is not None and cfg.synthetic.vocab_size > model_vocab_size:
            raise DataError(f"data.synthetic.vocab_size: {cfg.synthetic.vocab_size} exceeds the model's "
                            f"vocab_size {model_vocab_size}; lower it or raise model.vocab_size")
        self.corpus: Corpus | None = None
        self._cursor = _Cursor()
        self._sources: dict[tuple[int, int], BatchSource] = {}

    # ----- state ---------------------------------------------------------------------------------------------
    @property
    def next_batch(self) -> int:
        return self._cursor.next_batch

    @next_batch.setter
    def next_batch(self, value: int) -> None:
        self._cursor.next_batch = int(value)

    def state_dict(self) -> dict[str, Any]:
        return {"next_batch": self.next_batch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.next_batch = state_dict["next_batch"]

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Main process, just before the step that consumes the batch; read on CPU (no device sync).
        trainer = self.trainer
        if trainer is not None and trainer.training and isinstance(batch, dict) and "batch_index" in batch:
            self.next_batch = int(batch["batch_index"]) + 1
        return batch

    # ----- data ----------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Read the corpus (cached in memory) and check seq_len / batch_size against it."""
        self.batch_source()

    def rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return self._rank, self._world_size

    def batch_source(self) -> BatchSource:
        """The BatchSource of this rank (built once per (rank, world_size); checks sizes against the corpus)."""
        if self.corpus is None and self.cfg.is_token_stream():
            self.corpus = load_corpus(self.cfg, self.tokenizer)  # text, or the recall_stream task
        key = self.rank_world()
        if key not in self._sources:
            self._sources[key] = BatchSource(self.cfg, self.tokenizer, self.corpus, *key)
        return self._sources[key]

    def train_batch(self, k: int) -> dict:
        return self.batch_source().train_batch(k)

    def val_batch(self, j: int) -> dict:
        return self.batch_source().val_batch(j)

    def train_dataloader(self) -> DataLoader:
        src = self.batch_source()
        stream = _BatchStream(src.train_batch, _TrainIndices(self._cursor), src.batches_per_epoch())
        return _ResumableLoader(stream, batch_size=None, num_workers=self.cfg.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        src = self.batch_source()
        ids = src.val_batch_ids()
        if not ids:
            return []  # Lightning skips validation
        stream = _BatchStream(src.val_batch, partial(iter, ids), len(ids))
        return DataLoader(stream, batch_size=None, num_workers=min(self.cfg.num_workers, len(ids)))
