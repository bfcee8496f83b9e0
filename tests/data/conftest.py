"""Shared fixtures for the data tests: small corpora whose every 16-token substring is unique, so a row of a
batch can be located in the packed stream by plain search (an independent check of where rows come from)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

EOD = 256


def random_docs(n: int, lo: int, hi: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return ["".join(rng.choice(letters, size=int(rng.integers(lo, hi)))) for _ in range(n)]


def reference_stream(docs: list[str]) -> np.ndarray:
    """doc0 EOD doc1 EOD ... built with plain Python lists (the byte tokenizer's reference)."""
    out: list[int] = []
    for d in docs:
        out += list(d.encode("utf-8")) + [EOD]
    return np.asarray(out, dtype=np.int64)


def locate(stream: np.ndarray, row: np.ndarray) -> int:
    """Offset of `row` in `stream` (asserting it occurs exactly once), by byte search on a uint16 copy."""
    hay, needle = stream.astype(np.uint16).tobytes(), np.asarray(row).astype(np.uint16).tobytes()
    hits, pos = [], hay.find(needle)
    while pos != -1:
        if pos % 2 == 0:
            hits.append(pos // 2)
        pos = hay.find(needle, pos + 1)
    assert len(hits) == 1, f"row found {len(hits)} times"
    return hits[0]


def check_mqar(inputs, labels, n: int, vocab: int) -> None:
    """Decode an MQAR row from its prompt alone: pairs first, then each key asked once, label = its value."""
    inputs, labels = [int(t) for t in inputs], [int(t) for t in labels]
    keys, values = inputs[0:2 * n:2], inputs[1:2 * n:2]
    assert len(set(keys)) == n and all(1 <= k < vocab // 2 for k in keys)
    assert all(vocab // 2 <= v < vocab for v in values)
    table = dict(zip(keys, values))
    answered = [t for t, lab in enumerate(labels) if lab != -100]
    assert len(answered) == n and min(answered) >= 2 * n
    assert sorted(inputs[t] for t in answered) == sorted(keys)
    assert all(labels[t] == table[inputs[t]] for t in answered)
    assert all(inputs[t] == 0 for t in range(2 * n, len(inputs)) if t not in answered)


def check_copy(inputs, labels, vocab: int) -> int:
    """Decode a copy row: content, one separator (vocab-1), the copy; loss exactly on the copy. Returns L."""
    inputs, labels = [int(t) for t in inputs], [int(t) for t in labels]
    seps = [t for t, x in enumerate(inputs) if x == vocab - 1]
    assert len(seps) == 1
    n = seps[0]
    content = inputs[:n]
    assert all(1 <= x < vocab - 1 for x in content)
    assert [t for t, lab in enumerate(labels) if lab != -100] == list(range(n, 2 * n))
    assert labels[n:2 * n] == content and inputs[n + 1:2 * n] == content[:-1]
    return n


@pytest.fixture
def helpers():
    return SimpleNamespace(random_docs=random_docs, reference_stream=reference_stream, locate=locate, EOD=EOD,
                           check_mqar=check_mqar, check_copy=check_copy)


@pytest.fixture
def jsonl_corpus(tmp_path):
    """Write docs as rows of one jsonl file (one `datasets` load, fast); returns its path."""

    def make(docs: list[str], name: str = "corpus.jsonl") -> str:
        path = tmp_path / name
        with open(path, "w") as f:
            for doc in docs:
                f.write(json.dumps({"text": doc}) + "\n")
        return str(path)

    return make
