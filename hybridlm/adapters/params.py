"""Trainable-parameter report: counts per module group, printed at the start of training."""
from __future__ import annotations

import re

from torch import nn

from hybridlm.models.norm import RMSNorm, RMSNormGated

# Report order; a group appears only if the model has parameters in it.
GROUPS = (
    "embedding", "lm_head", "norms", "attention", "mamba in_proj", "mamba conv1d", "mamba out_proj",
    "mamba ssm params (A_log, D, dt_bias)", "mlp", "lora_A", "lora_B", "other",
)
_MAMBA_PARTS = {"in_proj": "mamba in_proj", "conv1d": "mamba conv1d", "out_proj": "mamba out_proj",
                "A_log": GROUPS[7], "D": GROUPS[7], "dt_bias": GROUPS[7]}
_LAYER = re.compile(r"backbone\.layers\.(\d+)\.(\w+)\.(\w+)")


def parameter_group(name: str, owner: nn.Module, layer_pattern: str) -> str:
    """Group of parameter `name` whose owning module is `owner`."""
    if ".lora_A." in name:
        return "lora_A"
    if ".lora_B." in name:
        return "lora_B"
    if name.startswith("backbone.embedding."):
        return "embedding"
    if name.startswith("lm_head."):
        return "lm_head"
    if isinstance(owner, (RMSNorm, RMSNormGated)):
        return "norms"
    m = _LAYER.match(name)
    if m:
        kind, sub, part = layer_pattern[int(m.group(1))], m.group(2), m.group(3)
        if sub == "mlp":
            return "mlp"
        if sub == "mixer":
            return "attention" if kind == "A" else _MAMBA_PARTS.get(part, "other")
    return "other"


def trainable_parameter_table(model: nn.Module) -> list[tuple[str, int, int]]:
    """Rows (group, trainable count, total count). Tied weights count once (named_parameters deduplicates)."""
    modules = dict(model.named_modules())
    trainable: dict[str, int] = {}
    total: dict[str, int] = {}
    for name, p in model.named_parameters():
        g = parameter_group(name, modules[name.rpartition(".")[0]], model.cfg.layer_pattern)
        total[g] = total.get(g, 0) + p.numel()
        trainable[g] = trainable.get(g, 0) + (p.numel() if p.requires_grad else 0)
    return [(g, trainable[g], total[g]) for g in GROUPS if g in total]


def format_parameter_table(rows: list[tuple[str, int, int]]) -> str:
    """Fixed-width text table with a percentage column and a total row."""
    tt, tn = sum(r[1] for r in rows), sum(r[2] for r in rows)
    width = max(len(g) for g, _, _ in rows + [("total", 0, 0)])
    lines = [f"{'group':<{width}}  {'trainable':>12}  {'total':>12}  {'%':>6}"]
    for g, t, n in rows + [("total", tt, tn)]:
        lines.append(f"{g:<{width}}  {t:>12,}  {n:>12,}  {100.0 * t / max(n, 1):>6.1f}")
    return "\n".join(lines)
