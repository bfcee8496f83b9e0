"""LengthEvalCallback: the length report during training, every N validations and when training ends.

Runs on global rank 0 only (the report is a function of the model, identical on every rank; the other ranks wait at
their next collective). Outputs go to {out_dir}/step{global_step}/ and to the trainer's loggers at step =
global_step; progress.json there says how far training was (step, training tokens over all ranks, parameters), so a
curve against tokens per parameter reads each report on its own (hybridlm/results/failure_map.py). The end-of-
training run uses `on_train_end`, while the model is still on its device and the loggers are still open
(`on_fit_end` comes after the strategy's teardown).

Configuration problems (no source of sequences for the selected diagnostics, an eval.attention the model cannot
run) fail in `setup`, before training. An error while a report runs is logged with its traceback and recorded in
`reports`, and training goes on: a diagnostic must not cost the run (or its final checkpoint).
"""
from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback
from torch import Tensor

from hybridlm.eval.attention import check_eval_attention
from hybridlm.eval.config import EvalConfig
from hybridlm.eval.run import SEQUENCE_DIAGNOSTICS, run_length_report
from hybridlm.models.hybrid_lm import HybridLM

log = logging.getLogger(__name__)


class LengthEvalCallback(Callback):
    def __init__(self, cfg: EvalConfig, sequences: Tensor | None = None):
        """sequences: optional LongTensor (n, L) to evaluate on instead of the data module's validation split."""
        cfg.validate()
        self.cfg = cfg
        self.sequences = sequences
        self.validations = 0  # validation runs seen (sanity check excluded); checkpointed
        self.reports: list[dict[str, Any]] = []  # results of this process's runs: {"step", "dir", "results"}

    def setup(self, trainer, pl_module, stage: str) -> None:
        model = getattr(pl_module, "model", None)
        if isinstance(model, HybridLM):  # an attention kind the model cannot run is refused before training
            check_eval_attention(model.cfg, self.cfg.attention)
        needs = sorted(SEQUENCE_DIAGNOSTICS & set(self.cfg.diagnostics))
        if "passkey" in self.cfg.diagnostics and self.cfg.passkey_haystack == "text":
            needs.append("passkey (eval.passkey_haystack=text)")
        if not needs or self.sequences is not None:
            return
        dm = trainer.datamodule
        if dm is None:
            raise ValueError(f"eval.diagnostics: {needs} need evaluation sequences: attach a datamodule to the "
                             "trainer or give LengthEvalCallback(sequences=...)")
        data_cfg = getattr(dm, "cfg", None)
        if data_cfg is not None and not data_cfg.is_token_stream():
            raise ValueError(f"eval.diagnostics: {needs} need validation text (a token stream), but data.source="
                             f"synthetic with task {data_cfg.synthetic.task!r} has none; remove them from "
                             "eval.diagnostics or give LengthEvalCallback(sequences=...)")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        if self.cfg.every_n_val and self.validations % self.cfg.every_n_val == 0:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.cfg.at_fit_end:
            self.run(trainer, pl_module)

    def run(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        source = self.sequences if self.sequences is not None else trainer.datamodule
        out = Path(self.cfg.out_dir)
        if not out.is_absolute():
            out = Path(trainer.default_root_dir) / out
        out = out / f"step{trainer.global_step:07d}"
        report: dict[str, Any] = {"step": trainer.global_step, "dir": str(out)}
        out.mkdir(parents=True, exist_ok=True)
        (out / "progress.json").write_text(json.dumps(training_progress(trainer, pl_module), indent=1))
        try:
            report["results"] = run_length_report(pl_module.model, source, self.cfg, out, trainer.loggers,
                                                  train_len=pl_module.cfg.data.seq_len, step=trainer.global_step)
        except Exception as e:  # noqa: BLE001 - see the module docstring
            log.error("length eval at step %d failed; training continues:\n%s", trainer.global_step,
                      traceback.format_exc())
            report["error"] = f"{type(e).__name__}: {e}"
        self.reports.append(report)

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = state_dict["validations"]


def training_progress(trainer, pl_module) -> dict[str, Any]:
    """Step, training tokens seen over all ranks (every row is data.seq_len tokens) and parameter counts."""
    data = pl_module.cfg.data
    model = pl_module.model
    rows = trainer.global_step * data.batch_size * trainer.world_size * trainer.accumulate_grad_batches
    return {"step": trainer.global_step, "train_tokens": rows * data.seq_len, "seq_len": data.seq_len,
            "parameters": sum(p.numel() for p in model.parameters()),
            "non_embedding_parameters": model.num_params(non_embedding=True)}
