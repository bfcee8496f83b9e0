"""Synthetic long-context tasks, decoded through the recurrent state.

- passkey: accuracy on a (context length x needle depth) grid with the data module's `passkey_prompt`; each
  prompt is exactly `context length` tokens; the answer is decoded greedily token by token; a sample counts as
  correct when every answer token matches (exact match of the key). The haystack is neutral sentences or, given
  `fillers` (e.g. validation text windows), text: a key-value sentence hidden at a depth in text and asked at the
  end, as RULER's single-needle task (NIAH-single).
- copy: `copy_row` rows (L random ids in [1, V-1), separator V-1, the same ids again); accuracy is the share of
  copied tokens predicted correctly, either teacher-forced (argmax at each copy position given the true prefix) or
  greedy (the model decodes the whole copy from its own outputs).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from hybridlm.data.errors import DataError
from hybridlm.data.synthetic import copy_row, passkey_prompt
from hybridlm.data.tokenizers import Tokenizer
from hybridlm.eval.streaming import chunks, greedy_generate, model_device


def _check_vocab(model, max_id: int, what: str) -> None:
    # A DataError (one line from the entry points, not a traceback): e.g. the passkey text of a byte tokenizer
    # against a model trained on a synthetic task's smaller vocabulary.
    if max_id >= model.cfg.vocab_size:
        raise DataError(f"eval.diagnostics: {what}: token id {max_id} is outside the model's vocabulary "
                        f"(model.vocab_size={model.cfg.vocab_size}); remove it from eval.diagnostics for this model")


@torch.no_grad()
def passkey_grid(model, tokenizer: Tokenizer, lengths: Sequence[int], depths: Sequence[float], n_samples: int,
                 chunk_len: int, seed: int = 0, digits: int = 5,
                 filler: str | Sequence[int] | None = None,
                 fillers: Sequence[Sequence[int]] | None = None) -> Tensor:
    """Exact-match accuracy, (len(lengths), len(depths)) float64 in [0, 1]. `fillers`: one haystack of token ids
    per sample (sample k of every cell uses fillers[k % len(fillers)]), replacing `filler`."""
    if fillers is not None and not fillers:
        raise ValueError("passkey: fillers is empty")
    acc = torch.zeros(len(lengths), len(depths), dtype=torch.float64)
    rng = np.random.default_rng(seed)
    for i, length in enumerate(lengths):
        for j, depth in enumerate(depths):
            try:
                prompts = [passkey_prompt(tokenizer, int(length), float(depth), rng=rng, digits=digits,
                                          filler=filler if fillers is None else fillers[k % len(fillers)])
                           for k in range(n_samples)]
            except ValueError as e:
                raise ValueError(f"eval.passkey_lengths: {e}") from e
            ids = torch.tensor([p.input_ids for p in prompts])  # (n, length)
            _check_vocab(model, int(ids.max()), "passkey")
            n_ans = max(len(p.answer_ids) for p in prompts)
            out = greedy_generate(model, ids, n_ans, chunk_len).cpu()  # (n, n_ans)
            hits = [out[k, :len(p.answer_ids)].tolist() == p.answer_ids for k, p in enumerate(prompts)]
            acc[i, j] = sum(hits) / n_samples
    return acc


def copy_batch(length: int, vocab_size: int, n: int, rng: np.random.Generator) -> Tensor:
    """(n, 2*length) rows: content (length), separator, content[:-1] (the last copied token is only a target)."""
    return torch.from_numpy(np.stack([copy_row(2 * length, vocab_size, length, rng)[0] for _ in range(n)]))


@torch.no_grad()
def copy_accuracy(model, lengths: Sequence[int], vocab_size: int, n_samples: int, chunk_len: int,
                  mode: str = "teacher_forced", seed: int = 0, batch_size: int | None = None) -> Tensor:
    """Token accuracy of the copy, (len(lengths),) float64 in [0, 1]."""
    _check_vocab(model, vocab_size - 1, "copy (eval.copy_vocab_size)")
    rng = np.random.default_rng(seed)
    device = model_device(model)
    acc = torch.zeros(len(lengths), dtype=torch.float64)
    for i, length in enumerate(lengths):
        rows = copy_batch(int(length), vocab_size, n_samples, rng)  # (n, 2L)
        target = rows[:, :length]  # (n, L): the content to reproduce
        correct = 0
        for part, tgt in zip(rows.split(batch_size or n_samples), target.split(batch_size or n_samples)):
            if mode == "greedy":
                pred = greedy_generate(model, part[:, :length + 1], length, chunk_len).cpu()
            elif mode == "teacher_forced":
                pred, state = [], None
                for _, piece in chunks(part.to(device), chunk_len):
                    logits, state = model(piece, state)
                    pred.append(logits.argmax(-1).cpu())
                pred = torch.cat(pred, 1)[:, length:2 * length]  # separator .. second-to-last copy token predict
            else:
                raise ValueError(f"eval.copy_mode: must be teacher_forced or greedy, got {mode!r}")
            correct += (pred == tgt).sum().item()
        acc[i] = correct / (n_samples * length)
    return acc
