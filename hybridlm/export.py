"""Export a model as an official checkpoint directory (DESIGN.md §7).

    python -m hybridlm.export ckpt_path=runs/x/last.ckpt format=mamba_ssm out=/tmp/export

ckpt_path is anything `load_pretrained` reads (a hybridlm .ckpt, a mamba_ssm or transformers directory, a
hub id), so this also converts between the official formats. Optional: tokenizer=DIR (default: the
checkpoint's own directory), allow_full_attention=true (see `to_mamba_ssm_config`).

- format=mamba_ssm: config.json (MambaConfig fields) + model.safetensors + pytorch_model.bin, the only
  weights file `MambaLMHeadModel.from_pretrained` reads.
- format=hf_mamba2: config.json + model.safetensors for transformers' `Mamba2ForCausalLM.from_pretrained`
  (pure Mamba-2 models only).
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

from hybridlm.models.checkpoints import (
    CheckpointError,
    StateDict,
    copy_tokenizer_files,
    find_tokenizer,
    load_pretrained,
    load_state_dict_checked,
    resolve_checkpoint,
    to_hf_mamba2_config,
    to_hf_mamba2_weights,
    to_mamba_ssm_config,
    to_mamba_ssm_weights,
)
from hybridlm.models.config import ModelConfig
from hybridlm.models.hybrid_lm import HybridLM

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("mamba_ssm", "hf_mamba2")
_CLI_KEYS = {"ckpt_path", "format", "out", "tokenizer", "allow_full_attention"}


def _drop_tied(sd: StateDict, model: torch.nn.Module) -> StateDict:
    """safetensors refuses tensors that share memory: keep one name per tied parameter (the loaders re-tie)."""
    seen, out = set(), {}
    named = dict(model.named_parameters(remove_duplicate=False))
    for key, value in sd.items():
        p = named.get(key)
        if p is not None and id(p) in seen:
            continue
        if p is not None:
            seen.add(id(p))
        out[key] = value
    return out


def _save_safetensors(sd: StateDict, path: Path) -> None:
    from safetensors.torch import save_file

    # transformers checks metadata["format"] == "pt" when loading.
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})


def _write_json(data: dict, path: Path) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)  # float("inf") is written as Infinity, which Python's json reads back


def export(model: HybridLM, cfg: ModelConfig, out_dir: str | Path, format: str = "mamba_ssm",
           allow_full_attention: bool = False) -> Path:
    """Write model (whose config is cfg) to out_dir in `format`; returns out_dir."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format={format!r}: choose one of {EXPORT_FORMATS}")
    if getattr(model, "cfg", cfg) != cfg:
        raise ValueError("cfg differs from model.cfg: the exported config would not describe the weights")
    # Build the config first: it refuses what the target cannot express before anything is written.
    config = to_mamba_ssm_config(cfg, allow_full_attention) if format == "mamba_ssm" else to_hf_mamba2_config(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if format == "mamba_ssm":
        weights = to_mamba_ssm_weights(cfg, sd)
        _save_safetensors(_drop_tied(weights, model), out / "model.safetensors")
        # mamba_ssm loads strictly: keep every name, tied lm_head included (torch.save keeps the sharing).
        torch.save({k: v.contiguous() for k, v in weights.items()}, out / "pytorch_model.bin")
    else:
        kept = _drop_tied(sd, model)  # drop first: the renamed/sliced tensors no longer map to parameters
        _save_safetensors(to_hf_mamba2_weights(cfg, kept), out / "model.safetensors")
    _write_json(config, out / "config.json")
    log.info("exported %s model to %s", format, out)
    return out


def main(argv: list[str] | None = None) -> Path:
    from omegaconf import OmegaConf

    args = OmegaConf.to_container(OmegaConf.from_cli(sys.argv[1:] if argv is None else argv))
    unknown = sorted(set(args) - _CLI_KEYS)
    if unknown or "ckpt_path" not in args or "out" not in args:
        usage = (f"usage: python -m hybridlm.export ckpt_path=PATH|HUB_ID out=DIR [format={'|'.join(EXPORT_FORMATS)}]"
                 " [tokenizer=DIR] [allow_full_attention=true]")
        raise SystemExit(usage + (f"; unknown key(s) {unknown}" if unknown else ""))
    src = resolve_checkpoint(str(args["ckpt_path"]))
    tok_dir = find_tokenizer(args["tokenizer"] if args.get("tokenizer") else src)
    if args.get("tokenizer") and tok_dir is None:
        raise CheckpointError(f"tokenizer={args['tokenizer']}: no tokenizer.json or tokenizer_config.json there")
    cfg, sd = load_pretrained(src)
    model = HybridLM(cfg)
    load_state_dict_checked(model, sd, source=str(src))
    out = export(model, cfg, args["out"], format=args.get("format", "mamba_ssm"),
                 allow_full_attention=bool(args.get("allow_full_attention", False)))
    copied = copy_tokenizer_files(tok_dir, out) if tok_dir is not None else []
    print(f"exported {src} -> {out} ({args.get('format', 'mamba_ssm')}); tokenizer files: {copied or 'none found'}")
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    try:
        main()
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
