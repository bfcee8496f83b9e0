"""Tokenizers behind one small interface: `encode`, `decode`, `vocab_size`, `eod_id`.

- `byte` (default): the UTF-8 bytes of the text, ids 0..255, plus EOD = 256, so vocab_size = 257 (matches the
  default `model.vocab_size`). There is no separate BOS: the EOD that ends one document is the token every
  following document is read after, so it doubles as the start-of-document marker.
- a path to a `tokenizer.json` (or a directory holding only one): loaded with the `tokenizers` library.
- a directory with `tokenizer_config.json` (a saved transformers tokenizer, e.g. GPT-NeoX's): `AutoTokenizer`.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from hybridlm.data.errors import DataError, DataFileNotFoundError, first_line

BYTE_EOD_ID = 256
# End-of-document tokens of common tokenizers, tried in order when `eod_token` is not given.
EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]", "<EOS>")


class Tokenizer:
    """Common interface. Subclasses set `vocab_size`, `eod_id`, `name` and implement encode/decode."""

    vocab_size: int
    eod_id: int
    name: str

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_documents(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Pack documents as doc0 EOD doc1 EOD ... -> (tokens (n,), doc_starts (num_docs+1,)).

        doc_starts[i] is where document i begins; document i with its EOD is tokens[doc_starts[i]:doc_starts[i+1]]."""
        dtype = token_dtype(self.vocab_size)
        parts, starts, pos = [], [0], 0
        for ids in self.encode_batch(texts):
            parts.append(np.asarray(ids + [self.eod_id], dtype=dtype))
            pos += len(ids) + 1
            starts.append(pos)
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
        return tokens, np.asarray(starts, dtype=np.int64)


def token_dtype(vocab_size: int) -> type:
    """Smallest unsigned dtype for the packed stream (the stdlib corpus as uint16 is 2 bytes a token)."""
    return np.uint16 if vocab_size <= 1 << 16 else np.int32


class ByteTokenizer(Tokenizer):
    vocab_size = 257
    eod_id = BYTE_EOD_ID
    name = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # EOD (and anything outside the byte range) is a special token: dropped, like skip_special_tokens.
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def encode_documents(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        # Fast path: one join + np.frombuffer instead of a Python list per byte (13 MB of stdlib in ~0.1 s).
        blobs = [t.encode("utf-8") for t in texts]
        lengths = np.fromiter((len(b) + 1 for b in blobs), dtype=np.int64, count=len(blobs))
        starts = np.zeros(len(blobs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=starts[1:])
        tokens = np.full(int(starts[-1]), self.eod_id, dtype=np.uint16)
        body = np.ones(len(tokens), dtype=bool)
        body[starts[1:] - 1] = False  # the last slot of every document is its EOD
        tokens[body] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        return tokens, starts


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (tokenizer.json). No special tokens are added: documents are joined with EOD."""

    def __init__(self, path: str, eod_token: str | None):
        from tokenizers import Tokenizer as RustTokenizer

        self._tok = RustTokenizer.from_file(path)
        self.name = path
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eod_id = _find_eod(path, eod_token, self._tok.get_vocab(with_added_tokens=True), None)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


class TransformersTokenizer(Tokenizer):
    """A saved transformers tokenizer directory (AutoTokenizer, local files only)."""

    def __init__(self, path: str, eod_token: str | None):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.name = path
        self.vocab_size = len(self._tok)
        self.eod_id = _find_eod(path, eod_token, self._tok.get_vocab(), self._tok.eos_token_id)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._tok(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _find_eod(path: str, eod_token: str | None, vocab: dict[str, int], eos_id: int | None) -> int:
    """`eod_token` if given, else the tokenizer's own eos token, else the first known EOD spelling it has."""
    if eod_token is not None:
        if eod_token not in vocab:
            raise DataError(f"data.eod_token: {eod_token!r} is not a token of {path!r}")
        return vocab[eod_token]
    if eos_id is not None:
        return int(eos_id)
    for cand in EOD_CANDIDATES:
        if cand in vocab:
            return vocab[cand]
    raise DataError(f"data.tokenizer: {path!r} has no end-of-document token (looked for {list(EOD_CANDIDATES)}); "
                    "name one with data.eod_token")


def load_tokenizer(spec: str, eod_token: str | None = None) -> Tokenizer:
    """`byte`, a tokenizer.json file, a directory with tokenizer.json, or a saved transformers tokenizer dir."""
    if spec == "byte":
        return ByteTokenizer()
    if os.path.isfile(spec):
        return _load(HFTokenizer, spec, eod_token)
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, "tokenizer_config.json")):
            return _load(TransformersTokenizer, spec, eod_token)
        if os.path.isfile(os.path.join(spec, "tokenizer.json")):
            return _load(HFTokenizer, os.path.join(spec, "tokenizer.json"), eod_token)
        raise DataFileNotFoundError(f"data.tokenizer: directory {spec!r} has neither tokenizer_config.json "
                                    "(transformers) nor tokenizer.json (tokenizers)")
    raise DataFileNotFoundError(f"data.tokenizer: {spec!r} is neither 'byte' nor an existing tokenizer.json file "
                                "or tokenizer directory")


def _load(cls: type[Tokenizer], path: str, eod_token: str | None) -> Tokenizer:
    try:
        return cls(path, eod_token)
    except DataError:
        raise
    except Exception as e:  # the libraries raise many types for a file they cannot parse
        raise DataError(f"data.tokenizer: cannot load {path!r} ({first_line(e)}); give a valid tokenizer.json or "
                        "a saved transformers tokenizer directory") from e


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int | None, checkpoint: str | None = None,
                checkpoint_tokenizer: str | None = None) -> None:
    """Refuse a tokenizer whose ids would index past the model's embedding table. `checkpoint` ("init_from=PATH")
    names the checkpoint that fixes model_vocab_size, if one does, and `checkpoint_tokenizer` the tokenizer it
    comes with, if known: then the fix is that tokenizer, not a larger model.vocab_size."""
    if model_vocab_size is None or tokenizer.vocab_size <= model_vocab_size:
        return
    problem = (f"data.tokenizer: vocab size {tokenizer.vocab_size} of {tokenizer.name!r} exceeds the model's "
               f"vocab_size {model_vocab_size}")
    if checkpoint is None:
        raise DataError(f"{problem}; set model.vocab_size >= {tokenizer.vocab_size}")
    if checkpoint_tokenizer is not None and checkpoint_tokenizer == tokenizer.name:
        # Same tokenizer as the checkpoint's run: that run's data used fewer ids (a synthetic task's vocabulary).
        raise DataError(f"{problem}, fixed by the checkpoint {checkpoint}, which was trained with this tokenizer on "
                        f"data whose ids stay below {model_vocab_size} (a synthetic task?): give that run's data "
                        "settings (data.source=synthetic data.synthetic.task=..., or its +experiment=...)")
    if checkpoint_tokenizer is not None:
        raise DataError(f"{problem}, fixed by the checkpoint {checkpoint}; pass the checkpoint's tokenizer: "
                        f"data.tokenizer={checkpoint_tokenizer}")
    raise DataError(f"{problem}, fixed by the checkpoint {checkpoint}; pass the tokenizer it was trained with "
                    "(data.tokenizer=DIR): none is stored beside it")
