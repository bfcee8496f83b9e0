from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BackendConfig:
    name: str = "auto"  # auto | torch | triton | mamba_ssm
