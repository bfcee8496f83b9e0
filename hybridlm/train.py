"""`python -m hybridlm.train [overrides]`: compose the config, build data, model and callbacks, fit."""
from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from hybridlm.cli import run_cli
from hybridlm.config import register_configs
from hybridlm.runner import run_job, train

register_configs()
log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="pkg://hybridlm.conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return run_cli(run_job, train, cfg)


if __name__ == "__main__":
    main()
