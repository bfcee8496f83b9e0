from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AdapterConfig:
    name: str = "none"  # none | full | lora | lora_plus | hylora | longlora
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
