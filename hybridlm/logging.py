"""Loggers: a CSV log always, W&B when enabled. W&B is offline unless an API key is configured (never a login
prompt), and a W&B that cannot start never stops training: one warning, and the run goes on with CSV."""
from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Optional

from lightning.pytorch.loggers import Logger, WandbLogger

from hybridlm.checkpointing import ResumableCSVLogger
from hybridlm.config import LoggerConfig

log = logging.getLogger(__name__)


def wandb_has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(cfg: LoggerConfig) -> str:
    if os.environ.get("WANDB_MODE") in ("offline", "online", "disabled"):
        return os.environ["WANDB_MODE"]
    if cfg.wandb_mode != "auto":
        return cfg.wandb_mode
    return "online" if wandb_has_api_key() else "offline"


def build_loggers(cfg: LoggerConfig, save_dir: Path, run_name: str, run_id: Optional[str] = None) -> list[Logger]:
    loggers: list[Logger] = []
    if cfg.csv:
        loggers.append(ResumableCSVLogger(str(save_dir), name="csv", version=""))  # continues a resumed run's log
    if cfg.wandb:
        mode = resolve_wandb_mode(cfg)
        if mode != "disabled":
            try:
                import wandb

                os.environ["WANDB_MODE"] = mode  # also what DDP children and wandb's own threads read
                wb = WandbLogger(project=cfg.project, entity=cfg.entity, name=run_name, save_dir=str(save_dir),
                                 offline=(mode == "offline"), id=run_id, resume="allow" if run_id else None,
                                 tags=list(cfg.tags) or None,
                                 settings=wandb.Settings(init_timeout=cfg.wandb_init_timeout, silent=True))
                _ = wb.experiment  # start now, so a failure shows here and not mid-training
                loggers.append(wb)
            except Exception as e:  # noqa: BLE001 - any W&B failure must leave training running
                log.warning("W&B could not start (%s: %s); continuing with the CSV log only.", type(e).__name__, e)
    return loggers


def wandb_run_dir(loggers: list[Logger]) -> Optional[str]:
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            try:
                return lg.experiment.dir.removesuffix("/files")
            except Exception:  # noqa: BLE001
                return None
    return None
