"""Loggers: a CSV log always, W&B when enabled. W&B is offline unless an API key is configured (never a login
prompt), and a W&B that cannot start never stops training: one warning, and the run goes on with CSV."""
from __future__ import annotations

import logging
import netrc
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

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
                loggers.append(start_wandb(cfg, mode, save_dir, run_name, run_id))
            except Exception as e:  # noqa: BLE001 - any W&B failure must leave training running
                log.warning("W&B could not start (%s: %s); continuing with the CSV log only.", type(e).__name__, e)
    return loggers


def start_wandb(cfg: LoggerConfig, mode: str, save_dir: Path, run_name: str, run_id: Optional[str]) -> WandbLogger:
    import wandb

    os.environ["WANDB_MODE"] = mode  # also what DDP children and wandb's own threads read

    def start() -> WandbLogger:
        wb = WandbLogger(project=cfg.project, entity=cfg.entity, name=run_name, save_dir=str(save_dir),
                         offline=(mode == "offline"), id=run_id, resume="allow" if run_id else None,
                         tags=list(cfg.tags) or None,
                         settings=wandb.Settings(init_timeout=cfg.wandb_init_timeout, silent=True))
        _ = wb.experiment  # start now, so a failure shows here and not mid-training
        return wb

    try:
        return start()
    except Exception as e:
        # A shared W&B service (`wandb beta core start`, found through WANDB_SERVICE, inherited by child processes)
        # keeps the run of a process that was killed open: resuming that run id there is refused as "in use".
        # A service of this process's own does not know the old stream and resumes the run.
        if not (run_id and "is in use" in str(e) and os.environ.get("WANDB_SERVICE")):
            raise
        log.warning("W&B run %s is still open in the shared W&B service (WANDB_SERVICE), left there by the "
                    "stopped run; resuming it through a W&B service of this process instead", run_id)
        wandb.teardown()
        os.environ.pop("WANDB_SERVICE")
        return start()


@contextmanager
def closing_wandb(loggers: list[Logger]) -> Iterator[None]:
    """Finish the W&B run of `loggers` when the block ends, marked failed if it raised."""
    try:
        yield
    except BaseException:
        finish_wandb(loggers, failed=True)
        raise
    finish_wandb(loggers, failed=False)


def finish_wandb(loggers: list[Logger], failed: bool) -> None:
    """Close the W&B run this process started. Lightning never does, and an open run is reused by the next
    WandbLogger of the process (the jobs of an in-process multirun would all log into the first job's run)."""
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            try:
                lg.experiment.finish(exit_code=1 if failed else 0)  # a no-op on ranks other than 0
            except Exception as e:  # noqa: BLE001 - the run's results are already saved
                log.warning("W&B run did not finish cleanly (%s: %s)", type(e).__name__, e)


def wandb_run_dir(loggers: list[Logger]) -> Optional[str]:
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            try:
                return lg.experiment.dir.removesuffix("/files")
            except Exception:  # noqa: BLE001
                return None
    return None
