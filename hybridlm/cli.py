"""How every command (train, evaluate, export, generate) ends on a user's mistake: one line on stderr that names
the key or file and says what to do, exit status 1, no traceback. `HYDRA_FULL_ERROR=1` keeps the traceback, for
debugging (the variable Hydra itself reads).

    @hydra.main(...)
    def main(cfg):
        return run_cli(run_job, train, cfg)   # a Hydra command

    if __name__ == "__main__":
        run_cli(main)                         # any other command

A user's mistake is one of the three error classes below; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from hybridlm.checkpointing.io import CheckpointError
from hybridlm.data.errors import DataError

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value that cannot work (a bad key or value, a backend that cannot run here, an output directory
    that is not writable); the message starts with the key."""


# Each user error class and the words its line starts with. CheckpointError: a checkpoint file that is missing,
# unreadable or does not fit (hybridlm/checkpointing/io.py); DataError: data, tokenizer or corpus files
# (hybridlm/data/errors.py).
USER_ERRORS: dict[type[Exception], str] = {
    ConfigError: "config error",
    CheckpointError: "checkpoint error",
    DataError: "data error",
}


def error_line(e: BaseException) -> str | None:
    """The line a command ends with for a user error (`hybridlm: data error: data.paths: ...`); None for others."""
    for cls, what in USER_ERRORS.items():
        if isinstance(e, cls):
            return f"hybridlm: {what}: {e}"
    return None


def full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def run_cli(main_fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """main_fn(*args, **kwargs); a user error ends the program with its one line and exit status 1 (a traceback
    too with HYDRA_FULL_ERROR=1). Under Hydra call it inside the task function: Hydra prints a traceback for
    any exception that leaves it."""
    try:
        return main_fn(*args, **kwargs)
    except tuple(USER_ERRORS) as e:
        if full_error():
            raise
        sys.exit(error_line(e))


def ensure_writable(out_dir: Path, key: str = "hydra.run.dir") -> None:
    """Create out_dir and write a file in it, or raise a ConfigError naming the directory and the key to change."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output directory {out_dir} is not writable ({e}); set {key}") from e


class OutputDirCheck(Callback):
    """Hydra creates the output directory (and writes its log and config there) before the task function runs,
    so a directory it cannot create would end in Hydra's traceback; this callback checks it first and ends with
    one line. Listed in conf/hydra/default.yaml."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        # ${now:...} in the path resolves once per config (a cached resolver): Hydra then uses this same path.
        run_cli(ensure_writable, Path(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_cli(ensure_writable, Path(config.hydra.sweep.dir), "hydra.sweep.dir")
