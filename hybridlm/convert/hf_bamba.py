"""hf_bamba: a transformers `BambaForCausalLM` directory (config.json with model_type "bamba" + safetensors),
IBM's Mamba-2 hybrid.

Each Bamba layer is a Mamba-2 mixer, or attention at `attn_layer_indices`, then a gated MLP, each with its own
pre-norm and residual: exactly a HybridLM block (layer_pattern M / A, d_intermediate > 0). What transformers
5.24 computes, and so what is imported:
- Mamba-2 as ours: nheads = mamba_n_heads, headdim = mamba_d_head ("auto": expand * hidden_size / nheads),
  the gated RMSNorm over mamba_n_groups groups with eps rms_norm_eps, in_proj / out_proj bias mamba_proj_bias,
  dt clamped to time_step_limit (its torch decode step skips the clamp; the chunked forward applies it).
- Attention: separate q/k/v/o projections, all with bias `attention_bias`; grouped KV heads; head_dim =
  config's head_dim or hidden_size / num_attention_heads; non-interleaved RoPE on the first
  int(head_dim * partial_rotary_factor) channels of each head, partial_rotary_factor from `rope_parameters`
  (0.5 when absent: BambaConfig hard-codes it for older configs), base rope_theta; only the default rope_type.
- MLP: down_proj(silu(gate_proj x) * up_proj x), bias mlp_bias: our GatedMLP with fc1 = [up_proj; gate_proj].
- Norms: RMSNorm with eps rms_norm_eps; residual in the activations' dtype; lm_head tied when
  tie_word_embeddings.
`z_loss_coefficient` only adds to transformers' training loss, and the embedding's padding_idx only stops its
row's gradient there; neither changes the forward.
"""
from __future__ import annotations

from pathlib import Path

import torch

from hybridlm.checkpointing.io import CheckpointError
from hybridlm.convert.base import INF, Checkpoint, Format, StateDict, json_float, refuse, validated
from hybridlm.convert.files import read_json, read_weights, save_safetensors, write_json
from hybridlm.convert.state_dict import cpu_state_dict, drop_tied
from hybridlm.models.config import ModelConfig
from hybridlm.models.hybrid_lm import HybridLM

NAME = "hf_bamba"
MODEL_TYPE = "bamba"

# transformers BambaConfig defaults for the keys we read.
_HF_DEFAULTS = dict(vocab_size=128000, tie_word_embeddings=False, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_act="silu",
                    initializer_range=0.02, rms_norm_eps=1e-5, attn_layer_indices=None, mamba_n_heads=128,
                    mamba_d_head="auto", mamba_n_groups=1, mamba_d_state=256, mamba_d_conv=4, mamba_expand=2,
                    mamba_chunk_size=256, mamba_conv_bias=True, mamba_proj_bias=False,
                    time_step_limit=(0.0, INF), attention_bias=False, mlp_bias=False, head_dim=None)
_PARTIAL_ROTARY = 0.5  # BambaConfig's value when rope_parameters does not set one
_ROPE_THETA = 10000.0
# hybridlm's Mamba-2 gated norm uses eps 1e-5 (as mamba_ssm); Bamba uses rms_norm_eps there too.
_GATED_NORM_EPS = 1e-5
# HF sub-module names <-> ours, per layer (the attention projections and MLP fc1 are handled apart).
_RENAMES = {"input_layernorm": "norm", "pre_ff_layernorm": "norm2", "mamba": "mixer", "self_attn": "mixer"}


# ---------------------------------------------------------------------------------------------- config

def _rope(c: dict, source: Path) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) as BambaConfig resolves them: transformers 5's `rope_parameters`, or
    an older config's top-level rope_theta / rope_scaling."""
    rp = dict(c.get("rope_parameters") or {})
    scaling = c.get("rope_scaling")
    rope_type = rp.get("rope_type", rp.get("type")) or (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if rope_type not in (None, "default"):
        key = "rope_parameters.rope_type" if rp else "rope_scaling"
        refuse(source, key, rope_type, "hybridlm implements the default RoPE only (no scaling)")
    theta = float(rp.get("rope_theta", c.get("rope_theta", _ROPE_THETA)))
    return theta, float(rp.get("partial_rotary_factor", _PARTIAL_ROTARY))


def import_config(raw: dict, source: Path) -> ModelConfig:
    """config.json of a transformers BambaForCausalLM -> ModelConfig (refuses what HybridLM cannot compute).
    Other keys (token ids, dropout, max_position_embeddings, num_logits_to_keep) change nothing in the forward."""
    c = {**_HF_DEFAULTS, **raw}
    if c["hidden_act"] != "silu":
        refuse(source, "hidden_act", c["hidden_act"], "hybridlm's Mamba-2 conv and gated MLP use SiLU")
    if float(c["rms_norm_eps"]) != _GATED_NORM_EPS:
        refuse(source, "rms_norm_eps", c["rms_norm_eps"],
               f"Bamba uses it inside the Mamba-2 gated norm, where hybridlm uses {_GATED_NORM_EPS}")
    if c["time_step_limit"] is None:
        refuse(source, "time_step_limit", None, "transformers' torch path needs a (min, max) pair")
    d_model, n_layer = int(c["hidden_size"]), int(c["num_hidden_layers"])
    attn_idx = sorted(int(i) for i in (c["attn_layer_indices"] or []))
    bad = [i for i in attn_idx if not 0 <= i < n_layer]
    if bad:
        refuse(source, "attn_layer_indices", bad, f"indices must lie in [0, num_hidden_layers={n_layer})")
    pattern = "".join("A" if i in attn_idx else "M" for i in range(n_layer))
    cfg = ModelConfig(
        d_model=d_model, layer_pattern=pattern, vocab_size=int(c["vocab_size"]),
        d_intermediate=int(c["intermediate_size"]), mlp_activation="swiglu", mlp_bias=bool(c["mlp_bias"]),
        pad_vocab_size_multiple=1,  # HF embeddings hold exactly vocab_size rows
        tie_embeddings=bool(c["tie_word_embeddings"]), norm_epsilon=float(c["rms_norm_eps"]), residual_in_fp32=False,
        initializer_range=float(c["initializer_range"]),
    )
    s = cfg.ssm
    expand = float(c["mamba_expand"])
    d_inner = int(expand * d_model)
    nheads = int(c["mamba_n_heads"])
    headdim = d_inner // nheads if c["mamba_d_head"] == "auto" else int(c["mamba_d_head"])
    if nheads * headdim != d_inner:
        raise CheckpointError(f"{source}: mamba_n_heads * mamba_d_head = {nheads} * {headdim} != "
                              f"mamba_expand * hidden_size = {d_inner}")
    s.expand = int(expand) if expand.is_integer() else s.expand
    s.d_inner = None if s.expand * d_model == d_inner else d_inner
    s.d_state, s.d_conv, s.headdim = int(c["mamba_d_state"]), int(c["mamba_d_conv"]), headdim
    s.ngroups, s.chunk_size = int(c["mamba_n_groups"]), int(c["mamba_chunk_size"])
    s.dt_limit = tuple(json_float(v) for v in c["time_step_limit"])
    s.bias, s.conv_bias, s.norm_before_gate = bool(c["mamba_proj_bias"]), bool(c["mamba_conv_bias"]), False
    a = cfg.attn
    a.kind, a.d_conv = "full", 0
    a.num_heads = int(c["num_attention_heads"])
    a.num_heads_kv = int(c["num_key_value_heads"] or a.num_heads)
    a.head_dim = int(c["head_dim"] or d_model // a.num_heads)
    a.qkv_proj_bias = a.out_proj_bias = bool(c["attention_bias"])
    if "A" in pattern:
        theta, partial = _rope(c, source)
        rotary = int(a.head_dim * partial)
        if rotary % 2:
            refuse(source, "rope_parameters.partial_rotary_factor", partial,
                   f"head_dim * partial_rotary_factor = {rotary} is odd; hybridlm's rotary needs an even width")
        a.rotary_emb_dim, a.rotary_emb_base = rotary, theta
    return validated(cfg, source)


def export_config(cfg: ModelConfig, allow_full_attention: bool = False) -> dict:
    """ModelConfig -> config.json of an equivalent transformers BambaForCausalLM (refuses what it cannot
    express)."""
    pattern, s, a = cfg.layer_pattern, cfg.ssm, cfg.attn
    why = []
    if "F" in pattern:
        why.append(f"layer_pattern {pattern!r} has F layers (a Bamba layer is a mixer and its MLP)")
    if cfg.d_intermediate == 0:
        why.append("d_intermediate = 0 (every Bamba layer has an MLP after its mixer)")
    if cfg.mlp_activation != "swiglu":
        why.append(f"mlp_activation = {cfg.mlp_activation!r} (Bamba's MLP is the SiLU-gated one)")
    if cfg.norm_epsilon != _GATED_NORM_EPS:
        why.append(f"norm_epsilon = {cfg.norm_epsilon} (Bamba would use it in the Mamba-2 gated norm, "
                   f"where hybridlm uses {_GATED_NORM_EPS})")
    d_inner = s.expand * cfg.d_model if s.d_inner is None else s.d_inner
    if "M" in pattern:
        if s.norm_before_gate:
            why.append("ssm.norm_before_gate = true (Bamba gates before the norm)")
        if d_inner % cfg.d_model:
            why.append(f"ssm.d_inner = {d_inner} (Bamba's is mamba_expand * hidden_size, an integer multiple)")
    hd = a.head_dim or cfg.d_model // a.num_heads
    partial = a.rotary_emb_dim / hd
    if "A" in pattern:
        if int(hd * partial) != a.rotary_emb_dim:
            why.append(f"attn.rotary_emb_dim = {a.rotary_emb_dim} (not int(head_dim * partial_rotary_factor) for "
                       f"head_dim = {hd})")
        if a.qkv_proj_bias != a.out_proj_bias:
            why.append("attn.qkv_proj_bias != attn.out_proj_bias (Bamba's attention_bias sets both)")
        if a.d_conv > 0:
            why.append(f"attn.d_conv = {a.d_conv} (Bamba attention has no qkv conv)")
        if a.kind != "full" and not allow_full_attention:
            why.append(f"attn.kind = {a.kind!r} (Bamba attention is full causal; pass allow_full_attention=true "
                       "to export anyway)")
    if why:
        raise CheckpointError("cannot export to hf_bamba: " + "; ".join(why))
    config = dict(
        architectures=["BambaForCausalLM"], model_type=MODEL_TYPE,
        hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer, vocab_size=cfg.vocab_size,
        attn_layer_indices=[i for i, k in enumerate(pattern) if k == "A"],
        num_attention_heads=a.num_heads, num_key_value_heads=a.num_heads_kv or a.num_heads,
        attention_bias=a.qkv_proj_bias,
        rope_parameters=dict(rope_type="default", rope_theta=a.rotary_emb_base, partial_rotary_factor=partial),
        intermediate_size=cfg.d_intermediate, hidden_act="silu", mlp_bias=cfg.mlp_bias,
        mamba_n_heads=d_inner // s.headdim, mamba_d_head=s.headdim, mamba_n_groups=s.ngroups,
        mamba_d_state=s.d_state, mamba_d_conv=s.d_conv, mamba_expand=d_inner // cfg.d_model,
        mamba_chunk_size=s.chunk_size, mamba_conv_bias=s.conv_bias, mamba_proj_bias=s.bias,
        time_step_limit=list(s.dt_limit), rms_norm_eps=cfg.norm_epsilon,
        tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.initializer_range,
        # The tokenizer decides these; transformers' defaults (0, 1, 2) would be arbitrary here.
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    if hd != cfg.d_model // a.num_heads:
        config["head_dim"] = hd  # BambaAttention reads it when present, else hidden_size // num_attention_heads
    return config


# --------------------------------------------------------------------------------------------- weights

def _qkv_sizes(cfg: ModelConfig) -> list[int]:
    a = cfg.attn
    hd, kv = a.head_dim or cfg.d_model // a.num_heads, a.num_heads_kv or a.num_heads
    return [a.num_heads * hd, kv * hd, kv * hd]


def import_weights(cfg: ModelConfig, sd: StateDict) -> StateDict:
    """Bamba names -> HybridLM's. q/k/v are fused into in_proj (rows [q, k, v], as Attention splits them) and
    up/gate into fc1 (rows [up, gate]: GatedMLP computes fc1's first half * silu(second half)). Unknown names
    pass through, so load_state_dict_checked reports them."""
    out: StateDict = {}
    for key, value in sd.items():
        if key == "model.embed_tokens.weight":
            key = "backbone.embedding.weight"
        elif key == "model.final_layernorm.weight":
            key = "backbone.norm_f.weight"
        elif key.startswith("model.layers."):
            _, _, i, sub, *rest = key.split(".")
            if sub == "self_attn" and rest[0] == "o_proj":
                rest[0] = "out_proj"
            elif sub == "feed_forward":
                sub, rest[0] = "mlp", {"down_proj": "fc2"}.get(rest[0], rest[0])
            key = ".".join(["backbone", "layers", i, _RENAMES.get(sub, sub), *rest])
        out[key] = value
    for i in range(cfg.n_layer):
        for param in ("weight", "bias"):
            p = f"backbone.layers.{i}."
            fused = {f"{p}mixer.in_proj.{param}": [f"{p}mixer.{x}_proj.{param}" for x in "qkv"],
                     f"{p}mlp.fc1.{param}": [f"{p}mlp.up_proj.{param}", f"{p}mlp.gate_proj.{param}"]}
            for target, names in fused.items():
                if all(n in out for n in names):
                    out[target] = torch.cat([out.pop(n) for n in names], dim=0)
    return out


def export_weights(cfg: ModelConfig, sd: StateDict) -> StateDict:
    """HybridLM state dict -> Bamba's. The padded vocabulary rows (never produced by the tokenizer, sliced off
    our logits) are cut."""
    norms = {"norm": "input_layernorm", "norm2": "pre_ff_layernorm"}
    out: StateDict = {}
    for key, value in sd.items():
        if key in ("backbone.embedding.weight", "lm_head.weight"):
            out["model.embed_tokens.weight" if key.startswith("backbone") else key] = value[: cfg.vocab_size]
            continue
        if key == "backbone.norm_f.weight":
            out["model.final_layernorm.weight"] = value
            continue
        _, _, i, sub, *rest = key.split(".")  # backbone.layers.{i}.{sub}.{...}
        kind, param = cfg.layer_pattern[int(i)], rest[-1]
        head = f"model.layers.{i}."
        if sub == "mixer" and kind == "A" and rest[0] == "in_proj":
            for x, part in zip("qkv", torch.split(value, _qkv_sizes(cfg), dim=0)):
                out[f"{head}self_attn.{x}_proj.{param}"] = part.clone()
        elif sub == "mixer" and kind == "A":
            out[f"{head}self_attn.{'o_proj' if rest[0] == 'out_proj' else rest[0]}.{param}"] = value
        elif sub == "mixer":
            out[head + ".".join(["mamba", *rest])] = value
        elif sub == "mlp" and rest[0] == "fc1":
            up, gate = value.chunk(2, dim=0)
            out[f"{head}feed_forward.up_proj.{param}"], out[f"{head}feed_forward.gate_proj.{param}"] = (
                up.clone(), gate.clone())
        elif sub == "mlp":
            out[f"{head}feed_forward.down_proj.{param}"] = value
        else:
            out[head + ".".join([norms[sub], *rest])] = value
    return out


# ------------------------------------------------------------------------------------------ directory

def load(directory: Path) -> Checkpoint:
    config_path = directory / "config.json"
    cfg = import_config(read_json(config_path), config_path)
    return Checkpoint(NAME, directory, cfg, import_weights(cfg, read_weights(directory)))


def save(model: HybridLM, cfg: ModelConfig, out: Path, allow_full_attention: bool) -> None:
    """config.json + model.safetensors for `BambaForCausalLM.from_pretrained` (a tied lm_head is left out:
    transformers ties it back)."""
    config = export_config(cfg, allow_full_attention)  # refuses before anything is written
    out.mkdir(parents=True, exist_ok=True)
    kept = drop_tied(cpu_state_dict(model), model)  # drop first: renamed/sliced tensors no longer map to parameters
    save_safetensors(export_weights(cfg, kept), out / "model.safetensors")
    write_json(config, out / "config.json")


FORMAT = Format(NAME, load, save, model_type=MODEL_TYPE)
