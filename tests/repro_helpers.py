"""What `make repro-*` runs, read from the Makefile itself (`make -n`) and expanded into jobs as Hydra's basic
sweeper expands a multirun; and what a job trains or evaluates with, for comparing those jobs with the jobs of the
scripts the targets replaced."""
from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from helpers import REPO, compose_config
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from hybridlm.runner import explicit_model_keys

VENV = Path(sys.executable).parent.parent  # the Makefile's PY is $(VENV)/bin/python
CKPT_LIST = re.compile(r"\$\(ls (\S+) \| paste -sd, -\)")  # the shell's list of checkpoints in a recipe


@dataclass
class Command:
    env: dict[str, str]  # VAR=value words before the program
    module: str  # python -m <module>
    multirun: bool
    args: list[str]  # Hydra overrides (or the reader's arguments)

    @property
    def config_name(self) -> str:
        return {"hybridlm.train": "train", "hybridlm.evaluate": "evaluate"}[self.module]


def make_commands(target: str, **variables: str) -> list[Command]:
    """The `python -m ...` commands of a Makefile target, in order, as `make -n` prints them. A checkpoint list the
    shell builds with `$(ls GLOB | paste -sd, -)` is left as GLOB."""
    out = subprocess.run(["make", "-n", target, f"VENV={VENV}", *(f"{k}={v}" for k, v in variables.items())],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    commands = []
    for line in out.replace("\\\n", " ").splitlines():
        words = shlex.split(CKPT_LIST.sub(r"\1", line))
        env = {}
        while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        if len(words) >= 3 and words[0] == str(VENV / "bin" / "python") and words[1] == "-m":
            multirun = words[3:4] == ["-m"]
            commands.append(Command(env, words[2], multirun, words[4:] if multirun else words[3:]))
    return commands


def compose_cfg(config_name: str, overrides: list[str], hydra_config: bool = False):
    return _compose(config_name, tuple(overrides), hydra_config)


@functools.cache  # the tests compose the same jobs several times; nothing mutates the result
def _compose(config_name: str, overrides: tuple[str, ...], hydra_config: bool):
    return compose_config(config_name, overrides, hydra_config=hydra_config)


def sweep_jobs(command: Command) -> list[list[str]]:
    """The override lists of the jobs a command runs, as Hydra makes them: a single run has one job; a multirun's
    primary config (its non-sweep overrides) gives hydra.sweeper.params, the command line follows them (a key given
    there replaces the param's values), and the basic sweeper takes every combination, the first key slowest."""
    if not command.multirun:
        return [command.args]
    parser = OverridesParser.create()
    primary = [o.input_line for o in parser.parse_overrides(command.args) if not o.is_sweep_override()]
    params = compose_cfg(command.config_name, primary, hydra_config=True).hydra.sweeper.params or {}
    overrides = parser.parse_overrides([f"{k}={v}" for k, v in params.items()] + command.args)
    (batch,) = BasicSweeper.split_arguments(overrides, max_batch_size=None)
    return batch


def task_overrides(overrides: list[str]) -> list[str]:
    """The job's own overrides: Hydra keeps hydra.* and hydra/* apart (hydra.overrides.hydra)."""
    return [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]


def effective(config_name: str, overrides: list[str]) -> dict:
    """What a job of hybridlm.runner runs with: the resolved config without Hydra's node, the model keys that
    override an init_from / evaluated checkpoint, and whether data settings override an evaluated checkpoint's."""
    task = task_overrides(overrides)
    cfg = compose_cfg(config_name, overrides, hydra_config=True)  # one composition per job (cached) serves all uses
    return {"config": {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
                       for k in cfg if k != "hydra"},
            "explicit model keys": explicit_model_keys(task),
            "data overridden": any(o.lstrip("+~").startswith("data") for o in task)}


def hydra_value(command: Command, job: list[str], key: str):
    """A value of the job's hydra node, resolved, e.g. "launcher.n_jobs" or "sweep.subdir"."""
    return OmegaConf.select(compose_cfg(command.config_name, job, hydra_config=True), f"hydra.{key}")


def job_dir(command: Command, job: list[str]) -> Path:
    h = compose_cfg(command.config_name, job, hydra_config=True).hydra
    return Path(h.sweep.dir) / str(h.sweep.subdir) if command.multirun else Path(h.run.dir)
