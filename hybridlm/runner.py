"""What `python -m hybridlm.train` does, kept apart from the Hydra entry point so tests can call it."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from hybridlm.checkpointing import AtomicCheckpointIO, find_resume_checkpoint
from hybridlm.config import Config, to_config
from hybridlm.lit import HybridLMModule
from hybridlm.logging import build_loggers, wandb_run_dir
from hybridlm.models.hybrid_lm import HybridLM

log = logging.getLogger("hybridlm")


class ConfigError(ValueError):
    pass


def typed_config(cfg: DictConfig) -> Config:
    try:
        return to_config(cfg)
    except (ValueError, OmegaConfBaseException) as e:
        raise ConfigError(str(e)) from e


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def build_model(cfg: Config) -> HybridLM:
    return HybridLM(cfg.model)


def build_callbacks(cfg: Config, ckpt_dir: Path) -> list[Callback]:
    c = cfg.checkpoint
    callbacks: list[Callback] = [
        ModelCheckpoint(dirpath=str(ckpt_dir), filename="step{step:06d}", auto_insert_metric_name=False,
                        save_last=True, save_top_k=c.keep_last, monitor="step", mode="max",
                        every_n_train_steps=c.every_n_steps or None,
                        train_time_interval=timedelta(minutes=c.every_n_minutes) if c.every_n_minutes else None),
    ]
    if c.save_best:
        callbacks.append(ModelCheckpoint(dirpath=str(ckpt_dir), filename="best", monitor=c.monitor, mode="min",
                                         save_top_k=1, auto_insert_metric_name=False))
    return callbacks


def train(cfg: DictConfig, out_dir: Path) -> dict:
    typed = typed_config(cfg)
    resume_ckpt: Optional[Path] = None
    if typed.resume == "auto":
        resume_ckpt = find_resume_checkpoint(out_dir.parent)
        if resume_ckpt is not None:
            out_dir = resume_ckpt.parent.parent  # continue in the run's own directory
            log.info("resume=auto: continuing from %s", resume_ckpt)
        else:
            log.info("resume=auto: no checkpoint of experiment %r found, starting fresh", typed.experiment_name)
    elif typed.resume:
        resume_ckpt = Path(typed.resume)
        if not resume_ckpt.is_file():
            raise ConfigError(f"resume: checkpoint {resume_ckpt} does not exist")
    ensure_writable(out_dir)
    L.seed_everything(typed.seed, workers=True, verbose=False)

    from hybridlm.data import HybridDataModule

    datamodule = HybridDataModule(typed.data, model_vocab_size=typed.model.vocab_size)
    module = HybridLMModule(typed, model=build_model(typed))
    loggers = build_loggers(typed.logger, out_dir, run_name=f"{typed.experiment_name}/{out_dir.name}")
    ckpt_dir = out_dir / "checkpoints"
    t = typed.trainer
    trainer = L.Trainer(
        default_root_dir=str(out_dir),
        max_steps=t.max_steps,
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val or None,
        precision=resolve_precision(t.precision),
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        num_nodes=t.num_nodes,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.enable_progress_bar,
        fast_dev_run=t.fast_dev_run,
        deterministic=t.deterministic,
        logger=loggers or False,
        callbacks=build_callbacks(typed, ckpt_dir),
        plugins=[AtomicCheckpointIO()],
        num_sanity_val_steps=0,
    )
    start = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_ckpt) if resume_ckpt else None)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    result = {"out_dir": str(out_dir), "metrics": metrics, "seconds": round(time.time() - start, 1),
              "checkpoint": str(ckpt_dir / "last.ckpt") if (ckpt_dir / "last.ckpt").exists() else None,
              "csv": str(out_dir / "csv" / "metrics.csv") if (out_dir / "csv" / "metrics.csv").exists() else None,
              "wandb": wandb_run_dir(loggers)}
    if trainer.is_global_zero:
        report(result)
    return result


def ensure_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output directory {out_dir} is not writable ({e}); set hydra.run.dir") from e


def report(result: dict) -> None:
    m = result["metrics"]
    parts = [f"val/loss {m['val/loss']:.4f}" if "val/loss" in m else None,
             f"checkpoint {result['checkpoint']}" if result["checkpoint"] else None,
             f"CSV log {result['csv']}" if result["csv"] else None,
             (f"W&B run {result['wandb']}" + (" (offline: upload with `wandb sync " + result["wandb"] + "`)"
                                             if "offline-run" in result["wandb"] else "")) if result["wandb"] else None]
    print(f"hybridlm: done in {result['seconds']:.0f}s; outputs in {result['out_dir']}: "
          + "; ".join(p for p in parts if p), flush=True)


def run_job(fn: Callable[[DictConfig, Path], dict], cfg: DictConfig) -> float:
    """Runs one job. In a multirun a failure is recorded in the job's result.json and the sweep goes on;
    in a single run it stops the program with the error (config errors without a traceback)."""
    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    record = {"overrides": list(hc.overrides.task), "status": "ok", "error": None, "metrics": {}}
    try:
        result = fn(cfg, out_dir)
        record["metrics"] = result.get("metrics", {})
        out_dir = Path(result.get("out_dir", out_dir))
    except Exception as e:  # noqa: BLE001
        record.update(status="failed", error=f"{type(e).__name__}: {e}")
        if not multirun:
            if isinstance(e, ConfigError):
                sys.exit(f"hybridlm: config error: {e}")
            raise
        log.error("job %s failed:\n%s", hc.job.num, traceback.format_exc())
    finally:
        if int(os.environ.get("LOCAL_RANK", "0")) == 0 and out_dir.exists():
            (out_dir / "result.json").write_text(json.dumps(record, indent=2))
    return float(record["metrics"].get("val/loss", float("nan")))
