"""hf_mamba2: a transformers `Mamba2ForCausalLM` directory (config.json with model_type "mamba2" +
model.safetensors). Its parameter names differ from ours only in `backbone.embeddings` (plural), and its
vocabulary is not padded. Pure Mamba-2 only: hybrid models export to mamba_ssm."""
from __future__ import annotations

from pathlib import Path

from hybridlm.checkpointing.io import CheckpointError
from hybridlm.convert.base import INF, Checkpoint, Format, StateDict, json_float, refuse, validated
from hybridlm.convert.files import read_json, read_weights, save_safetensors, write_json
from hybridlm.convert.state_dict import cpu_state_dict, drop_tied
from hybridlm.models.config import ModelConfig
from hybridlm.models.hybrid_lm import HybridLM

NAME = "hf_mamba2"
MODEL_TYPE = "mamba2"

# transformers Mamba2Config defaults for the keys we read.
_HF_DEFAULTS = dict(num_heads=128, head_dim=64, vocab_size=32768, hidden_size=4096, state_size=128,
                    num_hidden_layers=64, layer_norm_epsilon=1e-5, expand=2, conv_kernel=4, n_groups=8,
                    use_bias=False, use_conv_bias=True, hidden_act="silu", initializer_range=0.1,
                    residual_in_fp32=True, time_step_min=0.001, time_step_max=0.1, time_step_floor=1e-4,
                    time_step_limit=(0.0, INF), chunk_size=256, tie_word_embeddings=False)
# hybridlm's Mamba-2 gated norm uses eps 1e-5 (as mamba_ssm); HF uses layer_norm_epsilon there.
_GATED_NORM_EPS = 1e-5


# ---------------------------------------------------------------------------------------------- config

def import_config(raw: dict, source: Path) -> ModelConfig:
    """config.json of a transformers Mamba2ForCausalLM -> ModelConfig. Other PretrainedConfig keys (token
    ids, use_cache, legacy `rms_norm` / `norm_before_gate`, which transformers' Mamba-2 ignores) are unused."""
    c = {**_HF_DEFAULTS, **raw}
    if c["hidden_act"] != "silu":
        refuse(source, "hidden_act", c["hidden_act"], "the Mamba-2 conv activation is SiLU in hybridlm")
    if c["layer_norm_epsilon"] != _GATED_NORM_EPS:
        refuse(source, "layer_norm_epsilon", c["layer_norm_epsilon"],
               f"transformers uses it inside the Mamba-2 gated norm, where hybridlm uses {_GATED_NORM_EPS}")
    d_model, expand, head_dim = int(c["hidden_size"]), int(c["expand"]), int(c["head_dim"])
    if int(c["num_heads"]) * head_dim != expand * d_model:
        raise CheckpointError(f"{source}: num_heads * head_dim = {c['num_heads']} * {head_dim} != "
                              f"expand * hidden_size = {expand * d_model}")
    cfg = ModelConfig(
        d_model=d_model, layer_pattern="M" * int(c["num_hidden_layers"]), vocab_size=int(c["vocab_size"]),
        d_intermediate=0, pad_vocab_size_multiple=1,  # HF embeddings hold exactly vocab_size rows
        tie_embeddings=bool(c["tie_word_embeddings"]), norm_epsilon=float(c["layer_norm_epsilon"]),
        residual_in_fp32=bool(c["residual_in_fp32"]), initializer_range=float(c["initializer_range"]),
    )
    s = cfg.ssm
    s.d_state, s.d_conv, s.expand, s.headdim = int(c["state_size"]), int(c["conv_kernel"]), expand, head_dim
    s.ngroups, s.chunk_size = int(c["n_groups"]), int(c["chunk_size"])
    s.dt_min, s.dt_max = float(c["time_step_min"]), float(c["time_step_max"])
    s.dt_init_floor = float(c["time_step_floor"])
    s.dt_limit = tuple(json_float(v) for v in c["time_step_limit"])
    s.bias, s.conv_bias, s.norm_before_gate = bool(c["use_bias"]), bool(c["use_conv_bias"]), False
    return validated(cfg, source)


def export_config(cfg: ModelConfig) -> dict:
    """ModelConfig -> config.json of an equivalent transformers Mamba2ForCausalLM (pure Mamba-2 only)."""
    why = []
    if "A" in cfg.layer_pattern:
        why.append(f"layer_pattern {cfg.layer_pattern!r} has attention layers")
    if cfg.d_intermediate > 0 or "F" in cfg.layer_pattern:
        why.append(f"d_intermediate = {cfg.d_intermediate}, layer_pattern {cfg.layer_pattern!r} "
                   "(Mamba2ForCausalLM has no MLP blocks)")
    if cfg.ssm.d_inner not in (None, cfg.ssm.expand * cfg.d_model):
        why.append(f"ssm.d_inner = {cfg.ssm.d_inner} (Mamba2ForCausalLM's is expand * hidden_size)")
    if cfg.ssm.norm_before_gate:
        why.append("ssm.norm_before_gate = true (transformers always gates before the norm)")
    if cfg.norm_epsilon != _GATED_NORM_EPS:
        why.append(f"norm_epsilon = {cfg.norm_epsilon} (transformers would use it in the gated norm too, "
                   f"where hybridlm uses {_GATED_NORM_EPS})")
    if why:
        raise CheckpointError("cannot export to hf_mamba2 (transformers' Mamba2ForCausalLM is pure Mamba-2): "
                              + "; ".join(why) + ". Use format=mamba_ssm for hybrid models")
    s = cfg.ssm
    return dict(
        architectures=["Mamba2ForCausalLM"], model_type=MODEL_TYPE,
        hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer, vocab_size=cfg.vocab_size,
        state_size=s.d_state, expand=s.expand, head_dim=s.headdim, num_heads=s.expand * cfg.d_model // s.headdim,
        n_groups=s.ngroups, conv_kernel=s.d_conv, chunk_size=s.chunk_size, use_bias=s.bias,
        use_conv_bias=s.conv_bias, hidden_act="silu", layer_norm_epsilon=cfg.norm_epsilon,
        residual_in_fp32=cfg.residual_in_fp32, tie_word_embeddings=cfg.tie_embeddings,
        time_step_min=s.dt_min, time_step_max=s.dt_max, time_step_floor=s.dt_init_floor,
        time_step_limit=list(s.dt_limit), initializer_range=cfg.initializer_range,
        # The tokenizer decides these; transformers' defaults (0, 1, 2) would be arbitrary here.
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


# --------------------------------------------------------------------------------------------- weights

def import_weights(sd: StateDict) -> StateDict:
    # transformers' own load hook also accepts the singular name, so both spellings can occur.
    return {k.replace("backbone.embeddings.", "backbone.embedding.", 1): v for k, v in sd.items()}


def export_weights(cfg: ModelConfig, sd: StateDict) -> StateDict:
    """HybridLM state dict -> Mamba2ForCausalLM's: rename, and cut the padded vocabulary rows (never
    produced by the tokenizer, and sliced off our logits) so HF's vocab_size is the tokenizer's."""
    out = {}
    for key, value in sd.items():
        if key in ("backbone.embedding.weight", "lm_head.weight"):
            value = value[: cfg.vocab_size]
        out[key.replace("backbone.embedding.", "backbone.embeddings.", 1)] = value
    return out


# ------------------------------------------------------------------------------------------ directory

def load(directory: Path) -> Checkpoint:
    config_path = directory / "config.json"
    return Checkpoint(NAME, directory, import_config(read_json(config_path), config_path),
                      import_weights(read_weights(directory)))


def save(model: HybridLM, cfg: ModelConfig, out: Path, allow_full_attention: bool) -> None:
    """config.json + model.safetensors for `Mamba2ForCausalLM.from_pretrained`. allow_full_attention has
    nothing to allow: a model with attention layers is refused."""
    config = export_config(cfg)  # refuses before anything is written
    out.mkdir(parents=True, exist_ok=True)
    kept = drop_tied(cpu_state_dict(model), model)  # drop first: renamed/sliced tensors no longer map to parameters
    save_safetensors(export_weights(cfg, kept), out / "model.safetensors")
    write_json(config, out / "config.json")


FORMAT = Format(NAME, load, save, model_type=MODEL_TYPE)
