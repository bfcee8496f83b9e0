"""Synthetic tasks as plain functions of a numpy Generator (so a row is a pure function of its seed).

Every row function returns (inputs (T,), labels (T,)) int64 arrays, labels = -100 except on the answers.
- MQAR (Zoology's multi-query associative recall): N key-value pairs k1 v1 ... kN vN, then a query region of
  filler tokens (0) in which each key appears once at an even offset; the label at a query key is its value.
  Keys are distinct ids in [1, V/2), values distinct ids in [V/2, V). Query slots are uniform among the even
  offsets (Zoology draws the gaps from a power law; uniform keeps every distance equally likely).
- copy: L random ids in [1, V-1), the separator V-1, then the same L ids; loss only on the copy.
- passkey: `passkey_prompt` text followed by the answer; loss only on the answer tokens.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hybridlm.data.tokenizers import Tokenizer

IGNORE = -100
FILLER_ID = 0
# The haystack of the Landmark-attention / LongLoRA passkey test.
NEUTRAL_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE_PREFIX = "The pass key is"
NEEDLE_SUFFIX = ". Remember it. "
QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyPrompt:
    input_ids: list[int]  # exactly context_len tokens: filler, needle, filler, question
    answer_ids: list[int]  # the tokens of " NNNNN" that should follow the prompt
    key_pos: int  # index in input_ids of the first token of the key piece " NNNNN" (same tokens as answer_ids)
    key: str


def passkey_prompt(tokenizer: Tokenizer, context_len: int, depth: float, key: int | str | None = None,
                   rng: np.random.Generator | int | None = None,
                   filler: str | Sequence[int] | None = None, digits: int = 5) -> PasskeyPrompt:
    """Filler + "The pass key is NNNNN. Remember it. " + filler + "What is the pass key? The pass key is".

    The prompt is exactly `context_len` tokens. `depth` in [0, 1] is the share of the filler placed before the
    needle (0: needle first, 1: needle right before the question). The pieces are tokenized separately and
    concatenated, so the lengths are exact for any tokenizer and the key piece " NNNNN" has the same ids in the
    needle and in the answer. `filler`: None -> repeated neutral sentences; a string -> its tokens; a sequence of
    ids -> used as is (e.g. corpus text). The filler is repeated when too short and cut when too long (it may end
    mid-sentence). `key`: given, or drawn with `digits` digits from `rng` (a Generator or a seed)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey: depth must be in [0, 1], got {depth}")
    if key is None:
        gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        key = int(gen.integers(10 ** (digits - 1), 10**digits))
    key = str(key)

    prefix = tokenizer.encode(NEEDLE_PREFIX)
    key_ids = tokenizer.encode(" " + key)
    needle = prefix + key_ids + tokenizer.encode(NEEDLE_SUFFIX)
    question = tokenizer.encode(QUESTION)
    n_filler = context_len - len(needle) - len(question)
    if n_filler < 0:
        raise ValueError(f"passkey: context_len={context_len} is shorter than the needle and question "
                         f"({len(needle) + len(question)} tokens)")

    if filler is None:
        filler = NEUTRAL_FILLER
    fill = tokenizer.encode(filler) if isinstance(filler, str) else [int(t) for t in filler]
    if n_filler > 0 and not fill:
        raise ValueError("passkey: filler is empty")
    if fill:
        fill = (fill * (n_filler // len(fill) + 1))[:n_filler]  # (n_filler,)
    n_before = int(round(depth * n_filler))
    ids = fill[:n_before] + needle + fill[n_before:] + question
    return PasskeyPrompt(input_ids=ids, answer_ids=key_ids, key_pos=n_before + len(prefix), key=key)


def mqar_row(seq_len: int, vocab_size: int, num_kv_pairs: int,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n, half = num_kv_pairs, vocab_size // 2
    keys = rng.choice(np.arange(1, half), size=n, replace=False)  # (n,)
    values = rng.choice(np.arange(half, vocab_size), size=n, replace=False)  # (n,)
    x = np.full(seq_len + 1, FILLER_ID, dtype=np.int64)
    x[0:2 * n:2], x[1:2 * n:2] = keys, values
    slots = (seq_len + 1 - 2 * n) // 2  # query slots of 2 tokens after the pairs
    query_pos = 2 * n + 2 * rng.choice(slots, size=n, replace=False)  # (n,) all <= seq_len - 1
    order = rng.permutation(n)  # which key is asked at each query slot
    x[query_pos] = keys[order]
    labels = np.full(seq_len, IGNORE, dtype=np.int64)
    labels[query_pos] = values[order]  # the query key's position predicts its value
    return x[:seq_len], labels


def copy_row(seq_len: int, vocab_size: int, copy_len: int,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n = copy_len or seq_len // 2
    sep = vocab_size - 1
    content = rng.integers(1, sep, size=n)  # (n,)
    x = np.full(seq_len + 1, FILLER_ID, dtype=np.int64)
    x[:n], x[n], x[n + 1:2 * n + 1] = content, sep, content
    labels = np.full(seq_len, IGNORE, dtype=np.int64)
    labels[n:2 * n] = content  # the separator and the copy so far predict the next copied token
    return x[:seq_len], labels


def passkey_row(tokenizer: Tokenizer, seq_len: int, rng: np.random.Generator, digits: int = 5,
                filler: str | Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    key = int(rng.integers(10 ** (digits - 1), 10**digits))
    answer_len = len(tokenizer.encode(f" {key}"))
    p = passkey_prompt(tokenizer, seq_len + 1 - answer_len, float(rng.random()), key=key, filler=filler)
    x = np.asarray(p.input_ids + p.answer_ids, dtype=np.int64)  # (seq_len + 1,)
    start = len(p.input_ids) - 1  # the last prompt token predicts the first answer token
    labels = np.full(seq_len, IGNORE, dtype=np.int64)
    labels[start:start + len(p.answer_ids)] = p.answer_ids
    return x[:seq_len], labels


def synthetic_row(task: str, seq_len: int, rng: np.random.Generator, *, vocab_size: int, num_kv_pairs: int,
                  copy_len: int, tokenizer: Tokenizer | None = None, digits: int = 5,
                  filler: str | Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    if task == "mqar":
        return mqar_row(seq_len, vocab_size, num_kv_pairs, rng)
    if task == "copy":
        return copy_row(seq_len, vocab_size, copy_len, rng)
    if task == "passkey":
        return passkey_row(tokenizer, seq_len, rng, digits, filler)
    raise ValueError(f"data.synthetic.task: unknown task {task!r}")
