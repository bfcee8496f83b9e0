"""The weights of an adapted model with its LoRA folded in, leaving the model as it is.

merge_adapter (io.py) folds LoRA into the model in place and removes it: the end of fine-tuning. Evaluation during
training (eval.attention, docs/design.md §4) needs the same merged weights in another model while the adapted one
goes on training, so here the merge is computed into a state dict instead.
"""
from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from hybridlm.adapters.recipes import ADAPTER_NAME
from hybridlm.models.hybrid_lm import HybridLM


@torch.no_grad()
def merged_state_dict(model: HybridLM) -> dict[str, torch.Tensor]:
    """The state dict of the plain HybridLM that merge_adapter would make of `model` (original parameter names,
    W + scale * B @ A for every LoRA-wrapped Linear), without modifying `model`. Tensors that LoRA does not change
    are the model's own (detached, sharing storage); a model without LoRA gives its plain state_dict()."""
    sd = {}
    for name, t in model.state_dict().items():
        if ".lora_" in name:
            continue
        sd[name.replace(".base_layer.", ".")] = t
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            weight = module.get_base_layer().weight
            sd[f"{name}.weight"] = weight + module.get_delta_weight(ADAPTER_NAME).to(weight.dtype)
    return sd
