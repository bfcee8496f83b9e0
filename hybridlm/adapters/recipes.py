"""Fine-tuning recipes (see adapters/config.py) applied in place to a HybridLM.

LoRA layers come from peft (`inject_adapter_in_model`), which keeps the model a plain HybridLM whose forward the
training code calls unchanged. Every recipe puts LoRA on the attention in_proj/out_proj Linears only (HyLoRA as
Nunez et al. 2025 define it: no LoRA on the SSM projections, docs/design.md §5). The Mamba-2 conv1d that hylora
trains is trained whole (its weight is read by the conv op directly, so a LoRA on it would never run).
"""
from __future__ import annotations

from peft import LoraConfig, inject_adapter_in_model

from hybridlm.adapters.config import AdapterConfig
from hybridlm.models.hybrid_lm import HybridLM
from hybridlm.models.norm import RMSNorm, RMSNormGated

ADAPTER_NAME = "default"
_PROJECTIONS = ("in_proj", "out_proj")


def recipe_attention_kind(cfg: AdapterConfig) -> str | None:
    """The attention kind a recipe trains with: "s2" for longlora (LongLoRA's S2-Attn), else None (unchanged)."""
    return "s2" if cfg.name == "longlora" else None


def lora_targets(model: HybridLM, cfg: AdapterConfig) -> list[str]:
    """Full module names that get LoRA under the recipe."""
    if cfg.name not in ("lora", "lora_plus", "hylora", "longlora"):
        return []
    return [f"backbone.layers.{i}.mixer.{p}" for i, _ in model.attention_layers() for p in _PROJECTIONS]


def recipe_base_parameters(model: HybridLM, cfg: AdapterConfig) -> list[str]:
    """Names of the base (non-LoRA) parameters the recipe trains whole. Their names are the same with or without
    LoRA injected, since LoRA never wraps them."""
    if cfg.name == "full":
        return [n for n, _ in model.named_parameters() if "lora_" not in n]
    if cfg.name not in ("lora_plus", "hylora", "longlora"):
        return []
    # Embeddings and norms (LongLoRA trains `embed,norm`). "Norms" = every RMSNorm weight: block norms, norm_f and
    # the Mamba-2 gated norm. A separate lm_head (untied) is an output layer, not an embedding: it stays frozen.
    names = ["backbone.embedding.weight"]
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (RMSNorm, RMSNormGated)):
            names.append(f"{mod_name}.weight")
    if cfg.name == "hylora":  # + the Mamba-2 1-D convolutions; A_log, dt_bias, D and the SSM projections stay frozen
        for i, mixer in model.mamba_layers():
            names += [f"backbone.layers.{i}.mixer.conv1d.{n}" for n, _ in mixer.conv1d.named_parameters()]
    return names


def apply_adapter(model: HybridLM, cfg: AdapterConfig) -> HybridLM:
    """Apply recipe `cfg.name` in place and return the model; `model.adapter_cfg` records it (None for "none").

    Afterwards exactly the recipe's parameters have requires_grad: LoRA A/B of the targets plus
    `recipe_base_parameters`. LoRA B starts at zero (peft's default), so the model's outputs are unchanged."""
    cfg.validate()
    if getattr(model, "adapter_cfg", None) is not None:
        raise ValueError(f"model already has adapter {model.adapter_cfg.name!r}; merge_adapter it first")
    if cfg.name == "none":
        return model
    for p in model.parameters():
        p.requires_grad_(False)
    targets = lora_targets(model, cfg)
    if cfg.name != "full":
        if not targets:
            raise ValueError(f"adapter.name={cfg.name}: no layer to put LoRA on in layer_pattern "
                             f"{model.cfg.layer_pattern!r} (it needs attention layers 'A')")
        lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                          bias="none")
        inject_adapter_in_model(lora, model, adapter_name=ADAPTER_NAME)
    params = dict(model.named_parameters())
    for n in recipe_base_parameters(model, cfg):
        params[n].requires_grad_(True)
    for n, p in params.items():
        if "lora_" in n:
            p.requires_grad_(True)
    model.adapter_cfg = cfg
    return model
