"""The tokenizer stored with a checkpoint: finding it, loading it, and copying its files into an export."""
from __future__ import annotations

import shutil
from pathlib import Path

from hybridlm.convert.formats import resolve_checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model")


def copy_tokenizer_files(src_dir: Path, out_dir: Path) -> list[str]:
    """Copy the Hugging Face tokenizer files found in src_dir; returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src_dir) / name).is_file():
            shutil.copy2(Path(src_dir) / name, Path(out_dir) / name)
            copied.append(name)
    return copied


def find_tokenizer(path: str | Path) -> Path | None:
    """The tokenizer stored with a checkpoint: its directory (or, for a .ckpt file, the file's directory)
    holding tokenizer.json or tokenizer_config.json; None when there is none."""
    path = Path(path)
    if not path.exists():
        return None
    directory = path if path.is_dir() else path.parent
    if (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file():
        return directory
    return None


def load_checkpoint_tokenizer(path: str | Path, eod_token: str | None = None):
    """The checkpoint's tokenizer through the data package's loader (hybridlm.data.tokenizers.Tokenizer),
    or None when the checkpoint has none."""
    from hybridlm.data.tokenizers import load_tokenizer  # here: the data package imports Lightning

    directory = find_tokenizer(resolve_checkpoint(path))
    return None if directory is None else load_tokenizer(str(directory), eod_token)
