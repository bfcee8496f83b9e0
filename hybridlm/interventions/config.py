from __future__ import annotations

from dataclasses import dataclass


@dataclass
class InterventionConfig:
    name: str = "none"  # none | random_noise | fitted_noise | state_passing | tbtt
    sigma: float = 1.0
    reset_prob: float = 0.0
    include_conv: bool = False
    include_attention: bool = False
