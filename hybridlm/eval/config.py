from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EvalConfig:
    name: str = "default"
    max_len: int = 0  # 0: 16x the training length
