"""Tokenizers: byte default, a BPE trained here with `tokenizers` (file, directory, transformers directory),
the vocab-size refusal and clear errors."""
from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from hybridlm.data import DataConfig, HybridDataModule, load_tokenizer
from hybridlm.data.tokenizers import ByteTokenizer

TEXTS = ["the pass key is 12345. Remember it.", "hello world, hello tokenizer", "def f(x):\n    return x + 1\n",
         "Grüße aus München"] * 20


@pytest.fixture
def bpe(tmp_path):
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer)
    d = tmp_path / "bpe"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    return tok, d


def test_byte_tokenizer_ids():
    t = load_tokenizer("byte")
    assert (t.vocab_size, t.eod_id) == (257, 256)
    text = "Grüße\n"
    assert t.encode(text) == list(text.encode("utf-8"))
    assert t.decode(t.encode(text) + [256]) == text  # EOD is a special token: not rendered
    tokens, starts = t.encode_documents(["ab", "", "cé"])
    assert tokens.tolist() == [97, 98, 256, 256, 99, 0xC3, 0xA9, 256]
    assert starts.tolist() == [0, 3, 4, 8]


def test_byte_fast_path_matches_generic_path():
    docs = ["x" * 3, "ünïcödé", "", "tail"]
    fast = ByteTokenizer().encode_documents(docs)
    generic = super(ByteTokenizer, ByteTokenizer()).encode_documents(docs)  # the per-document list path
    np.testing.assert_array_equal(fast[0], generic[0])
    np.testing.assert_array_equal(fast[1], generic[1])


@pytest.mark.parametrize("which", ["file", "dir"])
def test_tokenizers_json_loads(bpe, which):
    tok, d = bpe
    t = load_tokenizer(str(d / "tokenizer.json") if which == "file" else str(d))
    assert t.vocab_size == tok.get_vocab_size(with_added_tokens=True)
    assert t.eod_id == tok.token_to_id("<|endoftext|>")
    for text in TEXTS[:4]:
        assert t.encode(text) == tok.encode(text, add_special_tokens=False).ids
        assert t.decode(t.encode(text)) == text


def test_transformers_directory_loads(bpe, tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok, _ = bpe
    out = tmp_path / "hf"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(out))
    t = load_tokenizer(str(out))
    assert type(t).__name__ == "TransformersTokenizer"
    assert t.eod_id == tok.token_to_id("<|endoftext|>")
    assert t.encode(TEXTS[1]) == tok.encode(TEXTS[1]).ids
    assert t.vocab_size == tok.get_vocab_size(with_added_tokens=True)


def test_datamodule_packs_with_bpe(bpe, tmp_path):
    tok, d = bpe
    docs = ["alpha beta gamma " * 30, "hello world " * 40, "def f(x): return x " * 25]
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i, doc in enumerate(docs):
        (corpus / f"{i}.txt").write_text(doc)
    cfg = DataConfig(source="files", paths=[str(corpus)], tokenizer=str(d), seq_len=16, batch_size=2,
                     val_fraction=0.0)
    dm = HybridDataModule(cfg, model_vocab_size=320)
    dm.setup()
    eod = tok.token_to_id("<|endoftext|>")
    expected = sum((tok.encode(doc).ids + [eod] for doc in docs), [])
    assert dm.corpus.train.tokens.tolist() == expected


def test_vocab_too_large_is_refused(bpe):
    _, d = bpe
    with pytest.raises(ValueError, match=r"^data\.tokenizer: vocab size 320 .* exceeds the model's vocab_size 257"):
        HybridDataModule(DataConfig(tokenizer=str(d)), model_vocab_size=257)
    with pytest.raises(ValueError, match=r"^data\.tokenizer: vocab size 257"):
        HybridDataModule(DataConfig(), model_vocab_size=256)


def test_tokenizer_errors(bpe, tmp_path):
    _, d = bpe
    with pytest.raises(FileNotFoundError, match=r"^data\.tokenizer: '/nonexistent/tok'"):
        load_tokenizer("/nonexistent/tok")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"^data\.tokenizer: directory"):
        load_tokenizer(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"^data\.eod_token: '<eos>' is not a token"):
        load_tokenizer(str(d), eod_token="<eos>")
    no_eod = RustTokenizer(models.BPE())
    no_eod.pre_tokenizer = pre_tokenizers.ByteLevel()
    no_eod.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=280))
    no_eod.save(str(tmp_path / "no_eod.json"))
    with pytest.raises(ValueError, match=r"^data\.tokenizer: .* has no end-of-document token"):
        load_tokenizer(str(tmp_path / "no_eod.json"))
