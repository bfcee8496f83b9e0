"""Which checkpoint a run continues from, and what it resumes.

resume=<path> continues that checkpoint. resume=auto continues the newest readable checkpoint of an earlier run
of the same experiment launched with the same overrides (resume_candidates), skipping an unreadable one with a
warning; under DDP the ranks rank 0 launches continue what rank 0 chose. A resumed run continues in the
directory of the run it resumes.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from hybridlm.checkpointing.callbacks import RunStateCallback
from hybridlm.checkpointing.io import CheckpointError, load_checkpoint_file
from hybridlm.config import Config

log = logging.getLogger(__name__)

RESUME_ENV = "HYBRIDLM_RESUME_CHECKPOINT"  # rank 0's resume=auto choice, inherited by the DDP ranks it launches
# Overrides a resumed run may change without becoming another run: where it writes, how long it trains, resume.
RESUME_FREE_KEYS = ("resume", "trainer.max_steps", "trainer.enable_progress_bar")


def choose_resume_checkpoint(cfg: Config, out_dir: Path, local_rank: int) -> Optional[Path]:
    """The checkpoint cfg.resume asks for (None: start fresh); local_rank is this process's rank on its node.
    Raises CheckpointError when resume=<path> does not exist."""
    if not cfg.resume:
        return None
    if cfg.resume != "auto":
        if not Path(cfg.resume).is_file():
            raise CheckpointError(f"checkpoint {cfg.resume} does not exist")
        return Path(cfg.resume)
    if local_rank > 0 and RESUME_ENV in os.environ:
        # A DDP rank launched by rank 0 continues what rank 0 chose: a search of its own could choose otherwise
        # (it runs with other Hydra settings, and later), and ranks that disagree wait for each other forever.
        return Path(os.environ[RESUME_ENV]) if os.environ[RESUME_ENV] else None
    same_run, others = resume_candidates(out_dir)
    ckpt = find_resume_checkpoint(same_run)
    os.environ[RESUME_ENV] = str(ckpt or "")
    if ckpt is not None:
        log.info("resume=auto: continuing from %s", ckpt)
    else:
        log.info("resume=auto: no checkpoint of an earlier run of experiment %r with these overrides, starting "
                 "fresh%s", cfg.experiment_name,
                 f" ({len(others)} run(s) of it with other overrides left alone; resume=<checkpoint> continues "
                 "one of them)" if others else "")
    return ckpt


def run_identity(overrides: list[str]) -> list[str]:
    """What makes two launches the same run for resume=auto: their overrides, minus hydra.* and RESUME_FREE_KEYS."""
    def free(ov: str) -> bool:
        key = ov.lstrip("+~").partition("=")[0]
        return key.startswith(("hydra.", "hydra/")) or key in RESUME_FREE_KEYS

    return sorted(ov for ov in overrides if not free(ov))


def resume_candidates(out_dir: Path) -> tuple[list[Path], list[Path]]:
    """(run directories resume=auto may continue, other runs of the experiment). Under Hydra: the earlier single
    runs and multirun jobs of this experiment launched with the same overrides (each run's .hydra/overrides.yaml),
    so a multirun job continues its own earlier job, never a sibling's. Called directly (no Hydra): the runs
    beside out_dir."""
    if not HydraConfig.initialized():
        return ([d for d in out_dir.parent.iterdir() if d.is_dir()] if out_dir.parent.is_dir() else []), []
    hc = HydraConfig.get()
    identity = run_identity(list(hc.overrides.task))
    runs = [d for d in [*Path(hc.run.dir).parent.glob("*"), *Path(hc.sweep.dir).parent.glob("*/*")]
            if (d / "checkpoints").is_dir() and d.resolve() != out_dir.resolve()]
    same, others = [], []
    for d in runs:
        recorded = d / str(hc.output_subdir) / "overrides.yaml"
        same_run = recorded.is_file() and run_identity(list(OmegaConf.load(recorded))) == identity
        (same if same_run else others).append(d)
    return same, others


def find_resume_checkpoint(run_dirs: Iterable[Path]) -> Optional[Path]:
    """The newest readable checkpoint in run_dir/checkpoints/ of the given runs (last.ckpt is written right after
    the step checkpoint it copies, so it is normally the newest). Unreadable ones are skipped with a warning,
    so a corrupt last.ckpt falls back to the same run's previous step checkpoint, then to older runs."""
    candidates = sorted((c for d in run_dirs for c in (Path(d) / "checkpoints").glob("*.ckpt")),
                        key=lambda p: p.stat().st_mtime, reverse=True)
    for ckpt in candidates:
        try:
            load_checkpoint_file(ckpt, mmap=True)
            return ckpt
        except CheckpointError as e:
            log.warning("resume=auto: skipping %s", e)
    return None


@dataclass
class ResumePoint:
    global_step: int  # optimizer steps done; the resumed run logs its first training row at this step
    wandb_run_id: Optional[str]


def resume_point(path: Path) -> ResumePoint:
    ckpt = load_checkpoint_file(path, mmap=True)
    run_state = (ckpt.get("callbacks") or {}).get(RunStateCallback.__qualname__) or {}
    return ResumePoint(int(ckpt["global_step"]), run_state.get("wandb_run_id"))
