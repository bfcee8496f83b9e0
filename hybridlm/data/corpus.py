"""Text corpora: read documents, split train/val by hash, tokenize and pack into one token stream per split.

Sources:
- `stdlib`: every .py file of the running interpreter's standard library (sysconfig path 'stdlib'), one document
  per file. site-packages is never read. Test directories (test/, tests/, idle_test/) are left out by default
  (`include_tests`): they are 60% of the bytes, full of deliberately odd encodings and generated data, and
  would make the corpus mostly test code; without them the corpus is ~12 MB of library code.
  Train/val split by a hash of the file's path relative to the stdlib root ('json/decoder.py').
- `files`: local files/dirs/globs through `datasets.load_dataset`: .jsonl/.json -> "json", .parquet -> "parquet",
  anything else -> "text" (one document per file by default). One document per row, so one book per row
  (PG-19 layout) stays one document.
- `hub`: `datasets.load_dataset(hub_name, hub_config, split=hub_split, streaming=streaming)`.
- `synthetic` with synthetic.task=recall_stream: the key/value streams of recall_stream.py, packed the same way.
For files/hub the split key is a hash of the document text itself: datasets does not report which file a row
came from, and a content key keeps duplicated documents on one side of the split.

The packed corpus is cached in memory (keyed by everything that shapes it), so building the datamodule twice
(train then eval, or many tests) reads and tokenizes once.
"""
from __future__ import annotations

import codecs
import glob
import hashlib
import logging
import os
import sysconfig
from collections import OrderedDict
from collections.abc import Iterator

from hybridlm.data.config import DataConfig
from hybridlm.data.errors import DataError, DataFileNotFoundError, DataSourceError, first_line
from hybridlm.data.packed import Corpus, PackedStream
from hybridlm.data.recall_stream import recall_corpus
from hybridlm.data.tokenizers import Tokenizer

log = logging.getLogger(__name__)

TEST_DIRS = frozenset({"test", "tests", "idle_test"})
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


_CACHE: OrderedDict[tuple, Corpus] = OrderedDict()  # most recently used last
_CACHE_SIZE = 4


def split_is_val(key: str, val_fraction: float) -> bool:
    """Deterministic split: the first 8 bytes of blake2b(key) as a number in [0, 1) compared to val_fraction.

    Does not depend on the seed, the file order or the machine, so a val document stays a val document."""
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")
    return h / 2.0**64 < val_fraction


# ---------------------------------------------------------------------------------------------------------
# File guards
# ---------------------------------------------------------------------------------------------------------

def file_problem(path: str, check_text: bool = True) -> str | None:
    """'empty', 'binary' (a NUL byte), 'not UTF-8', or None. Reads in 1 MB chunks to bound memory."""
    if os.path.getsize(path) == 0:
        return "empty"
    if not check_text:
        return None
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            if b"\x00" in chunk:
                return "binary"
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError:
                return "not UTF-8"
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return "not UTF-8"
    return None


class SkipCounter:
    """Counts skipped files by reason; `report()` logs one line ('skipped 3 files: 1 empty, 1 binary, ...')."""

    def __init__(self, refuse: bool):
        self.refuse = refuse
        self.counts: dict[str, int] = {}

    def check(self, path: str, check_text: bool = True) -> bool:
        problem = file_problem(path, check_text)
        if problem is None:
            return True
        if self.refuse:
            raise DataError(f"data.skip_bad_files: {path} is {problem} (set skip_bad_files=true to skip such files)")
        self.counts[problem] = self.counts.get(problem, 0) + 1
        return False

    def summary(self) -> str:
        total = sum(self.counts.values())
        parts = ", ".join(f"{n} {why}" for why, n in sorted(self.counts.items()))
        return f"skipped {total} files: {parts}" if total else "skipped 0 files"

    def report(self) -> None:
        if self.counts:
            log.warning(self.summary())


# ---------------------------------------------------------------------------------------------------------
# Sources -> iterator of (split key or None, text)
# ---------------------------------------------------------------------------------------------------------

def stdlib_files(include_tests: bool) -> tuple[str, list[str]]:
    """(stdlib root, sorted relative posix paths of its .py files)."""
    root = sysconfig.get_paths()["stdlib"]
    skip = SKIP_DIRS if include_tests else SKIP_DIRS | TEST_DIRS
    rel = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        for name in filenames:
            if name.endswith(".py"):
                rel.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return root, sorted(rel)


def _stdlib_documents(cfg: DataConfig, skips: SkipCounter) -> Iterator[tuple[str, str]]:
    root, rel_paths = stdlib_files(cfg.include_tests)
    for rel in rel_paths:
        path = os.path.join(root, rel)
        if skips.check(path):
            with open(path, encoding="utf-8") as f:
                yield rel, f.read()


def resolve_paths(patterns: list[str]) -> list[str]:
    """Expand files, directories (recursively, hidden entries skipped) and globs; sorted, without duplicates."""
    found: set[str] = set()
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        matches = glob.glob(pattern, recursive=True) if glob.has_magic(pattern) else (
            [pattern] if os.path.exists(pattern) else [])
        if not matches:
            what = "no files match" if glob.has_magic(pattern) else "file not found:"
            raise DataFileNotFoundError(f"data.paths: {what} {pattern!r}; check the path (relative paths start "
                                        f"in the directory the command runs in)")
        for m in matches:
            if os.path.isdir(m):
                for dirpath, dirnames, filenames in os.walk(m):
                    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                    found.update(os.path.join(dirpath, n) for n in filenames if not n.startswith("."))
            else:
                found.add(m)
    files = sorted(os.path.abspath(f) for f in found)
    if not files:
        raise DataFileNotFoundError(f"data.paths: no files under {patterns} (hidden files are not read)")
    return files


def builder_for(path: str) -> str:
    name = path.lower()
    if name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def _dataset_texts(ds, column: str, what: str) -> Iterator[str]:
    """Texts of one `datasets` Dataset/IterableDataset column, with an error listing the columns that exist."""
    columns = ds.column_names
    if columns is None:  # streaming with unknown features: look at the first row
        first = next(iter(ds), None)
        columns = list(first) if first is not None else []
    if column not in columns:
        raise DataError(f"data.text_column: column {column!r} not found in {what}; available: {list(columns)}")
    for batch in ds.iter(batch_size=1024):
        yield from batch[column]


def _names(files: list[str]) -> str:
    """The first few file names, for a message."""
    return str([os.path.basename(f) for f in files[:5]] + (["..."] if len(files) > 5 else []))


def _file_documents(cfg: DataConfig, skips: SkipCounter) -> Iterator[tuple[None, str]]:
    from datasets import load_dataset

    by_builder: dict[str, list[str]] = {}
    for path in resolve_paths(cfg.paths):
        builder = builder_for(path)
        if skips.check(path, check_text=builder != "parquet"):
            by_builder.setdefault(builder, []).append(path)
    for builder in sorted(by_builder):
        files = by_builder[builder]
        kwargs = {"sample_by": cfg.text_sample_by} if builder == "text" else {}
        try:
            ds = load_dataset(builder, data_files=files, split="train", streaming=cfg.streaming, **kwargs)
        except Exception as e:  # a file datasets cannot parse: name the files, not the library's internals
            raise DataError(f"data.paths: cannot read {len(files)} {builder} file(s) {_names(files)}: "
                            f"{first_line(e)}; fix or remove them") from e
        column = "text" if builder == "text" else cfg.text_column  # the text builder always names it "text"
        for text in _dataset_texts(ds, column, f"{builder} files {_names(files)}"):
            yield None, text


def _hub_documents(cfg: DataConfig) -> Iterator[tuple[None, str]]:
    from datasets import load_dataset

    try:
        ds = load_dataset(cfg.hub_name, cfg.hub_config, split=cfg.hub_split, streaming=cfg.streaming)
    except Exception as e:  # offline, unknown name, missing config: say which key to look at
        raise DataSourceError(f"data.hub_name: could not load {cfg.hub_name!r} (config={cfg.hub_config!r}, "
                              f"split={cfg.hub_split!r}): {first_line(e)}; check the name, config and split, and "
                              "that the Hugging Face hub is reachable") from e
    for text in _dataset_texts(ds, cfg.text_column, f"hub dataset {cfg.hub_name!r}"):
        yield None, text


# ---------------------------------------------------------------------------------------------------------
# Build (and cache) the packed corpus
# ---------------------------------------------------------------------------------------------------------

def _cache_key(cfg: DataConfig, tokenizer: Tokenizer) -> tuple:
    key = (cfg.source, cfg.val_fraction, cfg.skip_bad_files, tokenizer.name, tokenizer.eod_id, cfg.max_documents)
    if cfg.source == "synthetic":  # the recall_stream task: streams drawn from (seed, window, task settings)
        return key + (cfg.seed, cfg.seq_len, repr(cfg.synthetic))
    if cfg.source == "stdlib":
        return key + (sysconfig.get_paths()["stdlib"], cfg.include_tests)
    if cfg.source == "files":
        # size and mtime of every file, so an edited file is re-read
        stats = tuple((f, os.path.getsize(f), os.path.getmtime(f)) for f in resolve_paths(cfg.paths))
        return key + (stats, cfg.text_column, cfg.text_sample_by)
    return key + (cfg.hub_name, cfg.hub_config, cfg.hub_split, cfg.text_column)


def load_corpus(cfg: DataConfig, tokenizer: Tokenizer) -> Corpus:
    key = _cache_key(cfg, tokenizer)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    corpus = _build_corpus(cfg, tokenizer)
    _CACHE[key] = corpus
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return corpus


def _build_corpus(cfg: DataConfig, tokenizer: Tokenizer) -> Corpus:
    if cfg.source == "synthetic" and cfg.is_token_stream():
        return recall_corpus(cfg)
    skips = SkipCounter(refuse=not cfg.skip_bad_files)
    if cfg.source == "stdlib":
        docs = _stdlib_documents(cfg, skips)
    elif cfg.source == "files":
        docs = _file_documents(cfg, skips)
    elif cfg.source == "hub":
        docs = _hub_documents(cfg)
    else:
        raise DataError(f"data.source: {cfg.source!r} is not a text corpus")

    train, val, empty_rows = [], [], 0
    for key, text in docs:
        if not text:  # empty or None rows carry nothing to learn
            empty_rows += 1
            continue
        (val if split_is_val(text if key is None else key, cfg.val_fraction) else train).append(text)
        if cfg.max_documents and len(train) + len(val) >= cfg.max_documents:
            break
    skips.report()
    if empty_rows:
        log.warning("skipped %d empty documents (rows)", empty_rows)

    where = {"stdlib": "the stdlib corpus", "files": f"files {cfg.paths}", "hub": f"hub dataset {cfg.hub_name!r}"}
    key = "paths" if cfg.source == "files" else ("hub_name" if cfg.source == "hub" else "source")
    if not train and not val:
        raise DataError(f"data.{key}: corpus is empty: no non-empty documents in {where[cfg.source]} "
                        f"({skips.summary()}, {empty_rows} empty rows); give files with UTF-8 text")
    if not train:
        raise DataError(f"data.val_fraction: all {len(val)} documents fell in the validation split; "
                        "lower val_fraction or add documents")
    if cfg.val_fraction > 0 and not val:
        raise DataError(f"data.val_fraction: the hash split put none of the {len(train)} documents in validation; "
                        "add documents, raise val_fraction, or set val_fraction=0 to train without validation")
    log.info("%s: %d train / %d val documents", where[cfg.source], len(train), len(val))
    return Corpus(train=PackedStream(*tokenizer.encode_documents(train)),
                  val=PackedStream(*tokenizer.encode_documents(val)))
