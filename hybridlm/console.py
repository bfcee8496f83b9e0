"""What a run prints besides hybridlm's own log lines: a progress bar counted in optimizer steps, and Lightning's
messages that are false or not actionable for a hybridlm run, filtered by their exact text and the library
module that emits them (every other warning still shows)."""
from __future__ import annotations

import logging
import re
import sys
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

# (category, message regex, emitting module regex, why it says nothing to act on in a hybridlm run)
LIBRARY_WARNINGS: tuple[tuple[type[Warning], str, str, str], ...] = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities\._pytree",
     "Lightning's own use of a torch API that torch deprecated; raised for every loader, fixed only in Lightning"),
    (UserWarning, r"Your `IterableDataset` has `__len__` defined", r"lightning\.pytorch\.utilities\.data",
     "a caution about workers duplicating data; each worker of hybridlm's loaders takes every W-th batch index "
     "(data/datamodule.py _BatchStream), so the length is exact with any num_workers"),
)

# Lightning logs this at INFO on every fit and validate; it advertises a product and says nothing about the run.
_ADVERT = "💡 Tip:"
_LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropAdvert(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_ADVERT)


_DROP_ADVERT = _DropAdvert()


def filter_library_messages() -> None:
    """Install the filters above; called by the entry points before they build a Trainer. Idempotent (the warnings
    module replaces an identical filter; a logger keeps one copy of a filter object)."""
    for category, message, module, _why in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name in _LIGHTNING_INFO_LOGGERS:
        logging.getLogger(name).addFilter(_DROP_ADVERT)


def is_library_message(text: str) -> bool:
    """Whether one of the filtered messages appears in `text` (for tests of the console)."""
    return any(re.search(message, text) for _, message, _, _ in LIBRARY_WARNINGS) or _ADVERT in text


class StepProgressBar(TQDMProgressBar):
    """`step: 40%|####      | 120/300` in optimizer steps over trainer.max_steps, one bar for the whole run.

    Lightning's bar counts batches of the current epoch and titles it `Epoch 0/-2` (max_epochs is -1 when
    max_steps bounds training); an epoch here is data.batches_per_epoch batches, which tells the user nothing.
    After a resume the bar starts at the restored step and its rate counts only the steps of this session."""

    def init_train_tqdm(self) -> Tqdm:
        t = self.trainer
        return Tqdm(desc="step", total=t.max_steps if t.max_steps > 0 else None, initial=t.global_step, unit="step",
                    position=2 * self.process_position, disable=self.is_disabled, leave=True, dynamic_ncols=True,
                    file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT)

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # one bar across epochs (Lightning's resets it to the epoch's batch count)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is not None and self._should_update(step, bar.total):
            if not bar.disable:
                bar.n = step
                bar.refresh()
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version (a W&B run id fragment): the run directory names the run
        return metrics
