"""`python -m hybridlm.evaluate ckpt_path=... [eval=length_report|block_recall]`: validation loss and the length
diagnostics (or the SE-Attn scorer diagnostic) of any checkpoint — a hybridlm .ckpt, or an official mamba_ssm /
Hugging Face Mamba-2 directory — with the attention kind eval.attention names (full by default; same: as
trained; docs/design.md §4)."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from hybridlm.cli import run_cli
from hybridlm.config import register_configs
from hybridlm.runner import evaluate, run_job

register_configs()


@hydra.main(version_base="1.3", config_path="pkg://hybridlm.conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    return run_cli(run_job, evaluate, cfg)


if __name__ == "__main__":
    main()
