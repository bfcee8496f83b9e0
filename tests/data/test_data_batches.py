"""Training / validation batches: packing, random and contiguous (TBTT) modes, exact resume, ranks, workers.
Rows are checked by locating them in a packed stream built independently in the test."""
from __future__ import annotations

import re
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hybridlm.data import DataConfig, HybridDataModule, SyntheticConfig
from hybridlm.data.synthetic import NEUTRAL_FILLER


@pytest.fixture
def corpus(helpers, jsonl_corpus):
    docs = helpers.random_docs(24, 100, 400, seed=3)
    return jsonl_corpus(docs), docs


def _dm(path, **kw) -> HybridDataModule:
    cfg = dict(source="files", paths=[path], val_fraction=0.0, seq_len=32, batch_size=4)
    cfg.update(kw)
    dm = HybridDataModule(DataConfig(**cfg), model_vocab_size=257)
    dm.setup()
    return dm


def _window(batch, i) -> np.ndarray:
    """inputs of row i plus its last label: the T+1 tokens the row was cut from."""
    return np.concatenate([batch["input_ids"][i].numpy(), batch["labels"][i, -1:].numpy()])


def test_packing_puts_eod_between_docs_and_labels_are_the_shift(corpus, helpers):
    path, docs = corpus
    dm = _dm(path)
    stream = helpers.reference_stream(docs)
    np.testing.assert_array_equal(dm.corpus.train.tokens, stream)
    phases = set()
    for k in range(20):
        batch = dm.train_batch(k)
        assert batch["input_ids"].shape == (4, 32) and batch["labels"].shape == (4, 32)
        assert batch["input_ids"].dtype == torch.long and int(batch["batch_index"]) == k
        assert batch["batch_index"].shape == ()
        torch.testing.assert_close(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
        offsets = sorted(helpers.locate(stream, _window(batch, i)) for i in range(4))
        assert all(b - a >= 33 for a, b in zip(offsets, offsets[1:]))  # rows of one batch never overlap
        phases.update(o % 33 for o in offsets)
    assert len(phases) > 5  # windows start anywhere, not on a fixed grid
    assert (dm.train_batch(7)["input_ids"] == dm.train_batch(7)["input_ids"]).all()


def test_contiguous_rows_continue_the_stream(corpus, helpers):
    path, docs = corpus
    stream = helpers.reference_stream(docs)
    n = len(stream)
    for rank in (0, 1):
        dm = _dm(path, stream_mode="contiguous", batch_size=3, seq_len=32)
        dm._rank, dm._world_size = rank, 2
        steps = (n // 32) + 5  # long enough for every row to wrap around the end of the stream
        batches = [dm.train_batch(t) for t in range(steps)]
        for i in range(3):
            for t in range(steps - 1):  # row i of batch t+1 starts where row i of batch t ended
                assert batches[t + 1]["input_ids"][i, 0] == batches[t]["labels"][i, -1]
            seq = np.concatenate([b["input_ids"][i].numpy() for b in batches] + [batches[-1]["labels"][i, -1:].numpy()])
            start = helpers.locate(stream, seq[:33])
            assert start == (rank * 3 + i) * (n // 6)  # its own region of the stream
            np.testing.assert_array_equal(seq, np.take(stream, start + np.arange(len(seq)), mode="wrap"))


def test_resume_is_exact_and_o1(corpus):
    path, _ = corpus
    for mode in ("random", "contiguous"):
        dm = _dm(path, stream_mode=mode)
        it = iter(dm.train_dataloader())
        first = [next(it) for _ in range(6)]
        assert [int(b["batch_index"]) for b in first] == list(range(6))
        fresh = _dm(path, stream_mode=mode)
        fresh.load_state_dict({"next_batch": 3})
        assert fresh.state_dict() == {"next_batch": 3}
        it = iter(fresh.train_dataloader())
        for want in first[3:]:
            got = next(it)
            assert int(got["batch_index"]) == int(want["batch_index"])
            torch.testing.assert_close(got["input_ids"], want["input_ids"])
            torch.testing.assert_close(got["labels"], want["labels"])
        # no fast-forwarding: batch 10^12 comes as fast as batch 0
        far = _dm(path, stream_mode=mode)
        far.load_state_dict({"next_batch": 10**12})
        t0 = time.perf_counter()
        got = next(iter(far.train_dataloader()))
        assert time.perf_counter() - t0 < 2.0
        assert int(got["batch_index"]) == 10**12
        torch.testing.assert_close(got["input_ids"], dm.train_batch(10**12)["input_ids"])


def test_only_training_batches_advance_the_cursor(corpus):
    path, _ = corpus
    dm = _dm(path)
    batch = dm.train_batch(41)
    dm.on_before_batch_transfer(batch, 0)
    assert dm.next_batch == 0  # no trainer: nothing is counted
    dm.trainer = SimpleNamespace(training=False, global_rank=0, world_size=1)
    dm.on_before_batch_transfer(batch, 0)
    assert dm.next_batch == 0  # validation batches do not count
    dm.trainer = SimpleNamespace(training=True, global_rank=0, world_size=1)
    dm.on_before_batch_transfer(batch, 0)
    assert dm.state_dict() == {"next_batch": 42}


def test_ranks_get_disjoint_rows(corpus, helpers):
    path, docs = corpus
    stream = helpers.reference_stream(docs)
    single = _dm(path, batch_size=6)
    ranks = [_dm(path, batch_size=3) for _ in range(2)]
    for r, dm in enumerate(ranks):
        dm.trainer = SimpleNamespace(training=True, global_rank=r, world_size=2)  # rank from the trainer
    for k in range(10):
        rows = torch.cat([dm.train_batch(k)["input_ids"] for dm in ranks])
        labels = torch.cat([dm.train_batch(k)["labels"] for dm in ranks])
        offsets = sorted(helpers.locate(stream, _window({"input_ids": rows, "labels": labels}, i)) for i in range(6))
        assert all(b - a >= 33 for a, b in zip(offsets, offsets[1:]))
        # the global batch does not depend on how it is split over ranks
        torch.testing.assert_close(rows, single.train_batch(k)["input_ids"])
    plain = _dm(path, batch_size=3)
    plain._rank, plain._world_size = 1, 2  # no trainer: the (rank, world_size) pair
    torch.testing.assert_close(plain.train_batch(5)["input_ids"], ranks[1].train_batch(5)["input_ids"])


def test_validation_is_a_fixed_set_of_val_windows(helpers, jsonl_corpus):
    docs = helpers.random_docs(80, 100, 400, seed=4)
    path = jsonl_corpus(docs)
    dm = _dm(path, val_fraction=0.25, val_batches=3, batch_size=2)
    val_stream = dm.corpus.val.tokens.astype(np.int64)
    val_docs = {bytes(val_stream[a:b - 1].astype(np.uint8)).decode()
                for a, b in zip(dm.corpus.val.doc_starts[:-1], dm.corpus.val.doc_starts[1:])}
    assert val_docs <= set(docs) and 5 < len(val_docs) < 40
    val_ref = helpers.reference_stream([d for d in docs if d in val_docs])
    train_ref = helpers.reference_stream([d for d in docs if d not in val_docs])
    loader = list(dm.val_dataloader())
    assert [int(b["batch_index"]) for b in loader] == [0, 1, 2]
    again = _dm(path, val_fraction=0.25, val_batches=3, batch_size=2)
    for j, batch in enumerate(loader):
        torch.testing.assert_close(batch["input_ids"], again.val_batch(j)["input_ids"])
        for i in range(2):
            helpers.locate(val_ref, _window(batch, i))  # from the validation documents ...
            with pytest.raises(AssertionError):
                helpers.locate(train_ref, _window(batch, i))  # ... and not from the training ones
    ids = []
    for r in range(2):
        dm_r = _dm(path, val_fraction=0.25, val_batches=3, batch_size=2)
        dm_r._rank, dm_r._world_size = r, 2
        ids.append([int(b["batch_index"]) for b in dm_r.val_dataloader()])
    assert ids == [[0, 2], [1]]


def test_workers_keep_the_batch_order(corpus):
    path, _ = corpus
    dm = _dm(path, num_workers=2)
    it = iter(dm.train_dataloader())
    got = [next(it) for _ in range(5)]
    assert [int(b["batch_index"]) for b in got] == list(range(5))
    for k, b in enumerate(got):
        torch.testing.assert_close(b["input_ids"], dm.train_batch(k)["input_ids"])
    del it


def test_mixing_synthetic_rows_into_text(corpus, helpers):
    path, docs = corpus
    stream = helpers.reference_stream(docs)
    dm = _dm(path, seq_len=64, batch_size=8, mix_prob=0.3, synthetic=SyntheticConfig(task="mqar", num_kv_pairs=6))
    n_syn = 0
    for k in range(50):
        batch = dm.train_batch(k)
        for i in range(8):
            if (batch["labels"][i] == -100).any():
                n_syn += 1
                helpers.check_mqar(batch["input_ids"][i], batch["labels"][i], 6, 256)
            else:
                helpers.locate(stream, _window(batch, i))
    assert 0.3 - 0.08 < n_syn / 400 < 0.3 + 0.08
    dm_all = _dm(path, seq_len=128, batch_size=2, mix_prob=1.0,
                 synthetic=SyntheticConfig(task="passkey", passkey_filler="corpus"))
    batch = dm_all.train_batch(0)
    for i in range(2):
        text = bytes(t for t in _window(batch, i).tolist() if t < 256).decode()
        key = re.search(r"The pass key is (\d{5})\. Remember it\.", text).group(1)
        assert text.endswith(f"What is the pass key? The pass key is {key}")
        answer = [t for t in batch["labels"][i].tolist() if t != -100]
        assert bytes(answer).decode() == f" {key}"
        assert any(text[:12] in d for d in docs)  # the filler is corpus text
    # mixed: each passkey row's haystack is the neutral sentences or corpus text, both over a few batches
    dm_mixed = _dm(path, seq_len=128, batch_size=8, mix_prob=1.0,
                   synthetic=SyntheticConfig(task="passkey", passkey_filler="mixed"))
    kinds = set()
    for k in range(3):
        batch = dm_mixed.train_batch(k)
        for i in range(8):
            text = bytes(t for t in _window(batch, i).tolist() if t < 256).decode()
            # the haystack is the text around the needle sentence, before the question
            needle = re.search(r"The pass key is \d{5}\. Remember it\. ", text)
            hay = text[:needle.start()] + text[needle.end():text.index("What is the pass key?")]
            kinds.add("neutral" if hay == (NEUTRAL_FILLER * 10)[:len(hay)] else "corpus")
    assert kinds == {"neutral", "corpus"}


def test_batch_size_and_region_errors(corpus):
    path, _ = corpus
    with pytest.raises(ValueError, match=r"^data\.batch_size: the training stream holds only \d+ non-overlapping "
                                         r"windows"):
        _dm(path, seq_len=1000, batch_size=64)
    with pytest.raises(ValueError, match=r"^data\.batch_size: contiguous mode gives each of the "
                                         r"batch_size\*world_size=64 rows"):
        _dm(path, seq_len=1000, batch_size=64, stream_mode="contiguous")
    with pytest.raises(ValueError, match=r"^data\.seq_len: .* too short for synthetic\.task='passkey'"):
        _dm(path, seq_len=40, mix_prob=0.5, synthetic=SyntheticConfig(task="passkey"))
