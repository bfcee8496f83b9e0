"""`eval.attention`: evaluate a model with another attention kind than the one it was trained with (docs/design.md
§4). The paper's protocol (Nunez et al. 2025, Table 1) fine-tunes with an efficient attention and evaluates with
full attention; `same` evaluates with the trained kind.

Every attention kind (ATTENTION_MIXERS) holds the same parameters under the same names, so the evaluation model is
a new HybridLM of the other kind loaded with the trained weights (LoRA folded in). A kind whose layers hold other
parameters is refused, naming eval.attention.
"""
from __future__ import annotations

import dataclasses
import logging

import torch

from hybridlm.models.config import ModelConfig
from hybridlm.models.hybrid_lm import ATTENTION_MIXERS, HybridLM

log = logging.getLogger(__name__)
SAME = "same"


def eval_attention_choices() -> tuple[str, ...]:
    return (SAME, *ATTENTION_MIXERS)


def check_setting(setting: str) -> None:
    """Refuse an eval.attention that names no attention kind (ValueError naming the key)."""
    if setting not in eval_attention_choices():
        raise ValueError(f"eval.attention: unknown attention {setting!r}; use one of {list(eval_attention_choices())}")


def _with_kind(cfg: ModelConfig, kind: str) -> ModelConfig:
    return dataclasses.replace(cfg, attn=dataclasses.replace(cfg.attn, kind=kind))


def _attention_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{name: shape} of what one attention layer of `cfg` holds (built on the meta device: no memory)."""
    with torch.device("meta"):
        mixer = ATTENTION_MIXERS[cfg.attn.kind](cfg.d_model, cfg.attn, cfg.layer_pattern.index("A"))
    return {n: tuple(t.shape) for n, t in mixer.state_dict().items()}


def check_eval_attention(cfg: ModelConfig, setting: str) -> str | None:
    """The attention kind a model of `cfg` is evaluated with under eval.attention=`setting`; None when it has no
    attention layer (the setting then changes nothing). Raises ValueError naming eval.attention for a kind the
    model cannot run: unknown, refused by the model config, or holding other parameters than the trained kind."""
    check_setting(setting)
    if "A" not in cfg.layer_pattern:
        return None
    kind = cfg.attn.kind if setting == SAME else setting
    if kind == cfg.attn.kind:
        return kind
    swapped = _with_kind(cfg, kind)
    try:
        swapped.validate()
    except ValueError as e:
        raise ValueError(f"eval.attention: the model cannot run attention {kind!r}: {e}") from e
    trained, other = _attention_tensors(cfg), _attention_tensors(swapped)
    if trained != other:
        diff = sorted(set(trained.items()) ^ set(other.items()))
        raise ValueError(f"eval.attention: attention {kind!r} holds other parameters than the model's "
                         f"{cfg.attn.kind!r} layers (differing: {diff}), so the trained weights cannot run it; "
                         f"use eval.attention=same or a kind with the same parameters")
    return kind


def attention_label(model) -> str:
    """The attention kind `model` runs, for the records: "none" without attention layers (or for a stand-in
    model that is not a HybridLM)."""
    if not isinstance(model, HybridLM) or not model.attention_layers():
        return "none"
    return model.cfg.attn.kind


@torch.no_grad()
def with_eval_attention(model, setting: str):
    """The model to evaluate under eval.attention=`setting`: `model` itself for "same", for the trained kind, for a
    model without attention layers, or for a stand-in that is not a HybridLM; otherwise a new HybridLM of the
    other kind on the same device, in the same train/eval mode, holding `model`'s weights (LoRA folded in;
    tensors that LoRA does not change are shared, not copied) with gradients off. `model` is not modified."""
    if not isinstance(model, HybridLM):
        check_setting(setting)
        return model
    kind = check_eval_attention(model.cfg, setting)
    if kind is None or kind == model.cfg.attn.kind:
        return model
    if getattr(model, "adapter_cfg", None) is not None:
        from hybridlm.adapters import merged_state_dict  # imports peft: only for adapted models

        sd = merged_state_dict(model)
    else:
        sd = model.state_dict()
    with torch.device(next(model.parameters()).device):
        other = HybridLM(_with_kind(model.cfg, kind))
    other.load_state_dict(sd, strict=True, assign=True)  # the trained tensors themselves, in their dtype
    if other.cfg.tie_embeddings:
        other.lm_head.weight = other.backbone.embedding.weight  # assign gave each name its own Parameter
    other.requires_grad_(False)
    log.info("eval.attention=%s: evaluating the %s-trained model with %s attention", setting, model.cfg.attn.kind,
             kind)
    return other.train(model.training)
