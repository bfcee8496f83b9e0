"""`python -m hybridlm.export`: write a checkpoint as an official checkpoint directory (docs/design.md §7).

    python -m hybridlm.export ckpt_path=runs/x/last.ckpt format=mamba_ssm out=/tmp/export

ckpt_path is anything `hybridlm.convert.load_pretrained` reads (a hybridlm .ckpt, a mamba_ssm or transformers
directory, a hub id), so this also converts between the official formats. Optional: tokenizer=DIR (default:
the checkpoint's own directory), allow_full_attention=true (see `hybridlm.convert.mamba_ssm.export_config`).

- format=mamba_ssm: config.json (MambaConfig fields) + model.safetensors + pytorch_model.bin, the only
  weights file `MambaLMHeadModel.from_pretrained` reads.
- format=hf_mamba2: config.json + model.safetensors for transformers' `Mamba2ForCausalLM.from_pretrained`
  (pure Mamba-2 models only).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from hybridlm.cli import run_cli
from hybridlm.convert import (
    EXPORT_FORMATS,
    CheckpointError,
    copy_tokenizer_files,
    export,
    find_tokenizer,
    load_pretrained,
    load_state_dict_checked,
    resolve_checkpoint,
)
from hybridlm.models.hybrid_lm import HybridLM

_CLI_KEYS = {"ckpt_path", "format", "out", "tokenizer", "allow_full_attention"}


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
    run_cli(main)
