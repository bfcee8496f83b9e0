"""Adapter (fine-tuning recipe) configuration, Hydra group `adapter`. Recipes (docs/design.md §5):

  none       leave the model as built (every parameter keeps its requires_grad; pre-training)
  full       every parameter trainable
  lora       LoRA(r, alpha, dropout) on the attention in_proj (fused q/k/v) and out_proj; nothing else trains
  lora_plus  lora + input embedding and every norm weight trainable (LongLoRA's recipe)
  hylora     lora_plus + the Mamba-2 conv1d (weight, bias) trainable (Nunez et al. 2025's HyLoRA: no LoRA on the
             Mamba-2 in_proj / out_proj; A_log, dt_bias, D frozen)
  longlora   lora_plus, trained with S2-Attn (the attention kind is switched to "s2" for training)
"""
from __future__ import annotations

from dataclasses import dataclass

from hybridlm.validation import need

RECIPES = ("none", "full", "lora", "lora_plus", "hylora", "longlora")


@dataclass
class AdapterConfig:
    name: str = "none"  # none | full | lora | lora_plus | hylora | longlora
    r: int = 8  # LoRA rank
    alpha: float = 16.0  # LoRA scaling is alpha / r
    dropout: float = 0.0  # dropout on the LoRA branch input

    def validate(self) -> None:
        """Raise ValueError naming the offending key."""
        need(self.name in RECIPES, "adapter.name", f"unknown recipe {self.name!r}; use one of {RECIPES}")
        need(self.r > 0, "adapter.r", f"must be positive, got {self.r}")
        need(self.alpha > 0, "adapter.alpha", f"must be positive, got {self.alpha}")
        need(0.0 <= self.dropout < 1.0, "adapter.dropout", f"must be in [0, 1), got {self.dropout}")
