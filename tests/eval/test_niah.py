"""The passkey grid with a text haystack (eval.passkey_haystack=text, RULER's NIAH-single style): every prompt is
validation text with the key sentence at its depth and the question at the end, built here by hand."""
import re

import pytest
import torch
from eval_helpers import HistoryLM, induction

from hybridlm.data.tokenizers import ByteTokenizer
from hybridlm.eval import EvalConfig, run_length_report

NEEDLE = "The pass key is {key}. Remember it. "
QUESTION = "What is the pass key? The pass key is"


def test_text_haystack_prompts_are_validation_text_with_the_needle(tmp_path):
    tok = ByteTokenizer()
    texts = ["def f(x):\n    return x * 2\n" * 12, "import os\nprint(os.getcwd())\n" * 12]
    windows = torch.tensor([tok.encode(t)[:300] for t in texts])  # (2, 300) validation-like text
    prompts = {}  # histories ending with the question: the whole prompts, each recorded once
    question_ids = tok.encode(QUESTION)

    def predict(h):
        if h[-len(question_ids):] == question_ids:
            prompts.setdefault(tuple(h), None)
        return induction(k=8)(h)

    cfg = EvalConfig(diagnostics=["passkey"], attention="same", passkey_lengths=[160, 200], passkey_depths=[0.0, 0.5],
                     passkey_samples=3, passkey_haystack="text", n_sequences=2, chunk_len=64)
    results = run_length_report(HistoryLM(257, predict), windows, cfg, tmp_path, train_len=64, tokenizer=tok)
    assert results["passkey"]["mean_accuracy"] == 1.0  # the induction oracle finds the key in the text too

    seen = [list(p) for p in prompts]
    assert len(seen) == 2 * 2 * 3  # lengths x depths x samples, all different (keys differ)
    for ids in seen:
        n = len(ids)
        key = re.search(r"The pass key is (\d{5})\. Remember it\. ", tok.decode(ids)).group(1)
        needle, question = tok.encode(NEEDLE.format(key=key)), tok.encode(QUESTION)
        n_fill = n - len(needle) - len(question)
        # Which window and depth built it: one of the 2 windows, cut at one of the 2 depths.
        candidates = [w[:round(d * n_fill)] + needle + w[round(d * n_fill):n_fill] + question
                      for w in windows.tolist() for d in (0.0, 0.5)]
        assert ids in candidates
    # Sample k of every cell uses window k % 2: both windows appear at each length and depth.
    for n in (160, 200):
        starts = {tuple(ids[:10]) for ids in seen if len(ids) == n and not tok.decode(ids).startswith("The pass")}
        assert starts == {tuple(w[:10]) for w in windows.tolist()}


def test_unknown_haystack_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="eval.passkey_haystack"):
        EvalConfig(passkey_haystack="essays").validate()
