"""Synthetic tasks: answers checked by decoding the prompt independently; passkey placement by text search."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from hybridlm.data import DataConfig, HybridDataModule, SyntheticConfig, load_tokenizer, passkey_prompt
from hybridlm.data.synthetic import NEUTRAL_FILLER, copy_row, mqar_row

NEEDLE = "The pass key is {}. Remember it. "
QUESTION = "What is the pass key? The pass key is"


def test_mqar_rows(helpers):
    for seed in range(20):
        x, y = mqar_row(64, 256, 16, np.random.default_rng(seed))
        assert x.shape == y.shape == (64,)
        helpers.check_mqar(x, y, 16, 256)
    x, y = mqar_row(15, 64, 4, np.random.default_rng(0))  # tightest fit: 4 pairs in seq_len+1 = 16
    helpers.check_mqar(x, y, 4, 64)


def test_copy_rows(helpers):
    for seed in range(20):
        x, y = copy_row(50, 32, 0, np.random.default_rng(seed))
        assert helpers.check_copy(x, y, 32) == 25
    x, y = copy_row(50, 32, 7, np.random.default_rng(1))
    assert helpers.check_copy(x, y, 32) == 7 and (x[15:] == 0).all()


@pytest.mark.parametrize("task", ["mqar", "copy", "passkey"])
def test_synthetic_source_batches(task, helpers):
    cfg = DataConfig(source="synthetic", seq_len=128, batch_size=4, val_batches=2,
                     synthetic=SyntheticConfig(task=task, num_kv_pairs=8, vocab_size=64))
    dm = HybridDataModule(cfg, model_vocab_size=257)
    dm.setup()
    batch = dm.train_batch(3)
    assert batch["input_ids"].shape == (4, 128) and int(batch["batch_index"]) == 3
    assert not torch.equal(batch["input_ids"][0], batch["input_ids"][1])
    for x, y in zip(batch["input_ids"], batch["labels"]):
        if task == "mqar":
            helpers.check_mqar(x, y, 8, 64)
        elif task == "copy":
            helpers.check_copy(x, y, 64)
        else:
            text = bytes(x.tolist()).decode()
            key = re.search(r"The pass key is (\d{5})\. Remember it\.", text).group(1)
            assert bytes(t for t in y.tolist() if t != -100).decode() == f" {key}"
    # pure function of (seed, k): a second datamodule gives the same batches; validation is fixed
    again = HybridDataModule(cfg)
    torch.testing.assert_close(again.train_batch(3)["input_ids"], batch["input_ids"])
    val = list(dm.val_dataloader())
    assert len(val) == 2
    torch.testing.assert_close(val[1]["labels"], again.val_batch(1)["labels"])
    assert not torch.equal(val[0]["input_ids"], dm.train_batch(0)["input_ids"])


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("context_len", [120, 1000])
def test_passkey_at_requested_depth(depth, context_len):
    tok = load_tokenizer("byte")
    p = passkey_prompt(tok, context_len, depth, key=31415)
    text = tok.decode(p.input_ids)
    assert len(p.input_ids) == context_len and text.endswith(QUESTION)
    m = re.search(r"The pass key is (\d+)\. Remember it\. ", text)
    assert m.group(1) == "31415" == p.key
    n_filler = context_len - len(NEEDLE.format("31415")) - len(QUESTION)
    assert m.start() == round(depth * n_filler)  # filler before the needle: depth of the whole filler
    assert m.start(1) == p.key_pos + 1  # key_pos is the key piece " 31415" (its leading space)
    assert p.input_ids[p.key_pos:p.key_pos + len(p.answer_ids)] == p.answer_ids
    assert tok.decode(p.answer_ids) == " 31415"
    haystack = text[:m.start()] + text[m.end():-len(QUESTION)]
    assert haystack == (NEUTRAL_FILLER * 20)[:n_filler]  # the filler is the neutral sentences, unbroken


def test_passkey_with_given_filler_and_bpe(tmp_path):
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    bpe = RustTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([NEUTRAL_FILLER * 3, NEEDLE.format("12345") + QUESTION] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.save(str(tmp_path / "tok.json"))
    tok = load_tokenizer(str(tmp_path / "tok.json"))
    p = passkey_prompt(tok, 300, 0.5, rng=7)
    assert len(p.input_ids) == 300 and len(p.key) == 5
    assert p.input_ids[p.key_pos:p.key_pos + len(p.answer_ids)] == p.answer_ids
    assert tok.decode(p.answer_ids).strip() == p.key and p.key in tok.decode(p.input_ids)
    assert passkey_prompt(tok, 300, 0.5, rng=7).key == p.key  # seeded
    filler = list(range(97, 97 + 26))  # token ids of a-z in the byte tokenizer
    q = passkey_prompt(load_tokenizer("byte"), 200, 0.0, key="00042", filler=filler)
    assert load_tokenizer("byte").decode(q.input_ids).startswith("The pass key is 00042. Remember it. abcdefghij")
    with pytest.raises(ValueError, match="context_len=50 is shorter than the needle and question"):
        passkey_prompt(load_tokenizer("byte"), 50, 0.5)
    with pytest.raises(ValueError, match=r"depth must be in \[0, 1\]"):
        passkey_prompt(load_tokenizer("byte"), 500, 1.5)
