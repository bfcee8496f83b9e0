"""Corpora: stdlib contents and split, files (text / jsonl / parquet / long-document layout), guards, errors."""
from __future__ import annotations

import json
import logging
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from hybridlm.data import DataConfig, HybridDataModule
from hybridlm.data.corpus import stdlib_files


def _files_dm(paths, **kw):
    cfg = DataConfig(source="files", paths=[str(p) for p in paths], **{"val_fraction": 0.0, "seq_len": 8,
                                                                         "batch_size": 1, **kw})
    dm = HybridDataModule(cfg)
    dm.setup()
    return dm


def _docs_of(stream) -> list[str]:
    """Decode a packed stream back into documents (independent of the packer: split on EOD)."""
    toks = stream.tokens.astype(np.int64)
    cuts = np.flatnonzero(toks == 256)
    out, start = [], 0
    for c in cuts:
        out.append(bytes(toks[start:c].astype(np.uint8)).decode("utf-8"))
        start = c + 1
    assert start == len(toks), "the stream must end with EOD"
    return out


def test_stdlib_corpus_is_the_library_code():
    dm = HybridDataModule(DataConfig(seq_len=64, batch_size=2))
    dm.setup()
    root = Path(sysconfig.get_paths()["stdlib"])
    expected = {}
    for p in root.rglob("*.py"):
        rel = p.relative_to(root).parts
        if {"site-packages", "dist-packages"} & set(rel) or {"test", "tests", "idle_test"} & set(rel[:-1]):
            continue
        data = p.read_bytes()
        if data and b"\0" not in data:
            try:
                expected[p.relative_to(root).as_posix()] = data.decode("utf-8")
            except UnicodeDecodeError:
                pass
    train, val = _docs_of(dm.corpus.train), _docs_of(dm.corpus.val)
    assert sorted(train + val) == sorted(expected.values())
    assert 0.02 < len(val) / (len(train) + len(val)) < 0.10  # val_fraction 0.05
    assert 8e6 < len(dm.corpus.train.tokens) < 20e6
    # the split is a function of the relative path only: the same file is in val on every machine
    import hashlib
    val_paths = {rel for rel in expected
                 if int.from_bytes(hashlib.blake2b(rel.encode(), digest_size=8).digest(), "big") / 2**64 < 0.05}
    assert sorted(val) == sorted(expected[r] for r in val_paths)
    _, with_tests = stdlib_files(include_tests=True)
    assert any(r.startswith("test/") for r in with_tests) and len(with_tests) > len(stdlib_files(False)[1])


def test_files_split_is_deterministic_disjoint_and_order_free(tmp_path, helpers):
    docs = helpers.random_docs(60, 50, 80, seed=1)
    for name, order in (("a", docs), ("b", docs[::-1])):  # same documents, other file names and order
        d = tmp_path / name
        d.mkdir()
        for i, doc in enumerate(order):
            (d / f"f{i:03d}.txt").write_text(doc)
    dm_a = _files_dm([tmp_path / "a"], val_fraction=0.3)
    dm_b = _files_dm([tmp_path / "b"], val_fraction=0.3)
    train_a, val_a = _docs_of(dm_a.corpus.train), _docs_of(dm_a.corpus.val)
    assert set(val_a) == set(_docs_of(dm_b.corpus.val)) and set(train_a) == set(_docs_of(dm_b.corpus.train))
    assert not set(train_a) & set(val_a) and sorted(train_a + val_a) == sorted(docs)
    assert 5 < len(val_a) < 35


def test_text_jsonl_parquet_load_with_the_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.md").write_text("# title\nmarkdown body\n")
    (tmp_path / "b.py").write_text("print('hi')\n")
    with open(tmp_path / "c.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"id": i, "body": f"json row {i}"}) + "\n")
    pq.write_table(pa.table({"body": ["parquet one", "parquet two"], "n": [1, 2]}), tmp_path / "d.parquet")
    dm = _files_dm([tmp_path / "a.md", tmp_path / "b.py", tmp_path / "*.jsonl", tmp_path / "d.parquet"],
                   text_column="body")
    assert sorted(_docs_of(dm.corpus.train)) == sorted(
        ["# title\nmarkdown body\n", "print('hi')\n", "json row 0", "json row 1", "json row 2", "parquet one",
         "parquet two"])
    dm = _files_dm([tmp_path / "c.jsonl"], text_column="body", max_documents=2)
    assert _docs_of(dm.corpus.train) == ["json row 0", "json row 1"]


@pytest.mark.parametrize("streaming", [False, True])
def test_long_documents_one_book_per_row(tmp_path, helpers, streaming):
    """PG-19 layout (one book per parquet row): windows stay inside one book when pack=false."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    books = helpers.random_docs(6, 3000, 6000, seed=2)
    pq.write_table(pa.table({"short_book_title": [f"b{i}" for i in range(6)], "text": books}),
                   tmp_path / "pg19.parquet")
    dm = _files_dm([tmp_path / "pg19.parquet"], seq_len=1024, batch_size=2, pack=False, streaming=streaming)
    assert sorted(_docs_of(dm.corpus.train)) == sorted(books)
    for k in range(10):
        batch = dm.train_batch(k)
        for row, lab in zip(batch["input_ids"], batch["labels"]):
            window = row.tolist() + [int(lab[-1])]
            assert 256 not in window[:-1]  # no document boundary inside a window (its last label may be EOD)
            text = bytes(t for t in window if t != 256).decode()
            assert sum(text in b for b in books) == 1


def test_bad_files_are_skipped_and_counted(tmp_path, caplog):
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "good.txt").write_text("a perfectly good document\n")
    (d / "empty.txt").write_bytes(b"")
    (d / "blob.bin").write_bytes(b"abc\x00def")
    (d / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with caplog.at_level(logging.WARNING, logger="hybridlm.data.corpus"):
        dm = _files_dm([d])
    assert _docs_of(dm.corpus.train) == ["a perfectly good document\n"]
    assert "skipped 3 files: 1 binary, 1 empty, 1 not UTF-8" in caplog.text
    with pytest.raises(ValueError, match=r"^data\.skip_bad_files: .*blob\.bin is binary"):
        _files_dm([d / "blob.bin", d / "good.txt"], skip_bad_files=False)
    with pytest.raises(ValueError, match=r"^data\.skip_bad_files: .*latin1\.txt is not UTF-8"):
        _files_dm([d / "latin1.txt"], skip_bad_files=False)


def test_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^data\.paths: file not found: '.*missing\.txt'"):
        _files_dm([tmp_path / "missing.txt"])
    with pytest.raises(FileNotFoundError, match=r"^data\.paths: no files match '.*\*\.jsonl'"):
        _files_dm([tmp_path / "*.jsonl"])
    (tmp_path / "e1.txt").write_text("")
    (tmp_path / "e2.txt").write_text("")
    with pytest.raises(ValueError, match=r"^data\.paths: corpus is empty: .*skipped 2 files: 2 empty"):
        _files_dm([tmp_path / "e*.txt"])
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": "x" * 50, "id": 1}) + "\n")
    with pytest.raises(ValueError, match=r"^data\.text_column: column 'txt' not found .*; available: \['text', "
                                         r"'id'\]"):
        _files_dm([rows], text_column="txt")
    (tmp_path / "short.txt").write_text("y" * 40)
    with pytest.raises(ValueError, match=r"^data\.seq_len: a window of seq_len\+1=65 tokens is longer than the "
                                         r"whole training stream \(41 tokens\)"):
        _files_dm([tmp_path / "short.txt"], seq_len=64)
    (tmp_path / "short2.txt").write_text("z" * 40)
    with pytest.raises(ValueError, match=r"^data\.seq_len: a window of seq_len\+1=65 tokens is longer than every "
                                         r"training document \(longest: 41 tokens"):
        _files_dm([tmp_path / "short*.txt"], seq_len=64, pack=False)


def test_hub_failure_names_the_key(monkeypatch):
    import datasets
    import huggingface_hub.constants

    # offline mode (read at import time, so patched on the modules): fails at once instead of retrying
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    dm = HybridDataModule(DataConfig(source="hub", hub_name="no-such-user/no-such-dataset-hybridlm"))
    with pytest.raises(RuntimeError, match=r"^data\.hub_name: could not load 'no-such-user/.*Hub"):
        dm.setup()
