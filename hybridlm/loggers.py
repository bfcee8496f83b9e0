"""Loggers: a CSV log always, W&B when enabled. W&B is offline unless an API key is configured (never a login
prompt), and a W&B that cannot start never stops training: one warning, and the run goes on with CSV.
A resumed run continues the CSV log of the run it resumes (ResumableCSVLogger + truncate_csv_log) and its W&B
run (the run id is in the checkpoint: hybridlm.checkpointing.callbacks.RunStateCallback)."""
from __future__ import annotations

import csv
import logging
import netrc
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

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


# --------------------------------------------------------------------------------------------------- CSV log

class _AppendingWriter(ExperimentWriter):
    """Lightning's writer deletes an existing metrics.csv when it starts; this one keeps it and appends with
    the same columns (a new column rewrites the file with the union header, as Lightning does)."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        # Lightning rewrites the file in place; a kill in the middle would lose the log.
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        write_csv_atomically(Path(self.metrics_file_path), fieldnames, rows)


class ResumableCSVLogger(CSVLogger):
    """A CSVLogger that continues an existing metrics.csv (see truncate_csv_log) and writes every logged row
    at once (flush_logs_every_n_steps=1), so a killed run loses no row logged before its last checkpoint.
    Local paths only (the writer uses the os module, for the atomic rename)."""

    def __init__(self, *args: Any, flush_logs_every_n_steps: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, flush_logs_every_n_steps=flush_logs_every_n_steps, **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def truncate_csv_log(path: Path, from_step: int) -> int:
    """Drop the rows a resumed run will log again (step >= from_step) and any row a kill cut short; atomic.
    Returns the number of rows kept."""
    if not path.is_file():
        return 0
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames or [], list(reader)

    def kept(row: dict) -> bool:
        try:
            return int(row["step"]) < from_step and None not in row.values()  # None: a truncated last line
        except (KeyError, TypeError, ValueError):
            return False

    rows = [r for r in rows if kept(r)]
    write_csv_atomically(path, header, rows)
    return len(rows)


def write_csv_atomically(path: Path, header: list[str], rows: list[dict]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
