"""Data configuration (Hydra group `data`). Every value check lives in `DataConfig.validate()`, whose errors start
with the offending key (`data.seq_len: ...`) so a bad command line is fixed without reading a traceback."""
from __future__ import annotations

from dataclasses import dataclass, field

from hybridlm.validation import need

SOURCES = ("stdlib", "files", "hub", "synthetic")
STREAM_MODES = ("auto", "random", "contiguous")
TASKS = ("mqar", "copy", "passkey", "recall_stream")
SAMPLE_BY = ("document", "paragraph", "line")
PASSKEY_FILLERS = ("neutral", "corpus", "mixed")


@dataclass
class SyntheticConfig:
    """Synthetic tasks (source=synthetic, or rows mixed into a text corpus with `mix_prob`).

    mqar and copy use raw token ids below `vocab_size`: 0 is the filler, vocab_size-1 the copy separator.
    passkey is text, encoded with the data tokenizer."""

    task: str = "mqar"  # mqar | copy | passkey
    num_kv_pairs: int = 8  # mqar: key-value pairs, each key queried once
    vocab_size: int = 256  # mqar/copy: ids used; keys in [1, V/2), values in [V/2, V), copy tokens in [1, V-1)
    copy_len: int = 0  # copy: tokens to copy; 0 = the longest that fits (seq_len // 2)
    passkey_digits: int = 5  # passkey: digits of the key
    # neutral (repeated sentences) | corpus (text of the training corpus) | mixed (each row one or the other, 1/2 each)
    passkey_filler: str = "neutral"
    # recall_stream (source=synthetic): endless (key, value) pair streams used as a token corpus; see recall_stream.py
    num_keys: int = 64  # recall_stream: K keys; SET-key ids [0, K), GET-key ids [K, 2K)
    num_values: int = 16  # recall_stream: V values; SET values [2K, 2K+V), GET answers [2K+V, 2K+2V)
    p_set: float = 0.25  # recall_stream: probability that a pair is a SET (else a GET of a recent SET)
    recall_window: int = 0  # recall_stream: a GET asks for a key SET in the last D pairs; 0 = seq_len // 2
    key_gap: int = 0  # recall_stream: a SET never reuses a key SET in the last G pairs (0: any key); needs K > G
    num_streams: int = 32  # recall_stream: independent training streams (documents)
    val_streams: int = 8  # recall_stream: independent validation streams (documents)
    stream_len: int = 65536  # recall_stream: tokens per stream (even)


@dataclass
class DataConfig:
    source: str = "stdlib"  # stdlib | files | hub | synthetic
    paths: list[str] = field(default_factory=list)  # files: paths, directories or globs (.txt/.md/.py, .jsonl, ...)
    hub_name: str | None = None  # hub: dataset name for datasets.load_dataset
    hub_config: str | None = None  # hub: dataset config name
    hub_split: str = "train"  # hub: split to read (our own train/val split is made from it)
    streaming: bool = False  # files/hub: read through datasets' streaming mode (no Arrow cache written)
    text_column: str = "text"  # files (json/parquet) / hub: column holding the document text
    text_sample_by: str = "document"  # plain text files: one document per file | paragraph | line
    max_documents: int = 0  # files/hub: read at most this many documents (0 = all)
    include_tests: bool = False  # stdlib: also read test directories (test/, tests/, idle_test/)
    skip_bad_files: bool = True  # skip (and count) empty / binary / non-UTF-8 files; False: raise naming the file
    tokenizer: str = "byte"  # "byte" (256 bytes + EOD=256) | path to tokenizer.json | transformers tokenizer dir
    eod_token: str | None = None  # end-of-document token of a loaded tokenizer (None: found automatically)
    seq_len: int = 256  # T: tokens per row; each row reads T+1 tokens (labels are the inputs shifted by one)
    batch_size: int = 8  # rows per batch on each rank
    pack: bool = True  # True: windows run across documents (EOD between them); False: each window inside one document
    # random | contiguous (row i of batch t continues row i of batch t-1: TBTT) | auto: contiguous under
    # intervention=tbtt, random otherwise (resolved by the top-level config; unresolved, it reads as random)
    stream_mode: str = "auto"
    batches_per_epoch: int = 0  # 0: one pass over the training tokens (synthetic: 1000); the stream itself is endless
    val_fraction: float = 0.05  # share of documents held out, by a hash of each document (stable across machines)
    val_batches: int = 8  # fixed validation batches (in total over all ranks); 0 = no validation
    mix_prob: float = 0.0  # text sources: probability that a training row is a synthetic `synthetic.task` row
    num_workers: int = 0  # DataLoader worker processes
    seed: int = 1234  # batch k on rank r is a pure function of (seed, k, r)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def is_token_stream(self) -> bool:
        """True when batches are windows of a packed token stream with a validation split (text corpora and
        synthetic.task=recall_stream), so stream_mode=contiguous and the length diagnostics work."""
        return self.source != "synthetic" or self.synthetic.task == "recall_stream"

    def validate(self) -> None:
        """Raise ValueError naming the offending key. Needs no file access (the lead calls it before training)."""

        syn = self.synthetic
        need(self.source in SOURCES, "data.source", f"unknown source {self.source!r}; choose from {list(SOURCES)}")
        need(self.stream_mode in STREAM_MODES, "data.stream_mode",
             f"unknown stream_mode {self.stream_mode!r}; choose from {list(STREAM_MODES)}")
        need(syn.task in TASKS, "data.synthetic.task", f"unknown task {syn.task!r}; choose from {list(TASKS)}")
        need(self.text_sample_by in SAMPLE_BY, "data.text_sample_by",
             f"unknown value {self.text_sample_by!r}; choose from {list(SAMPLE_BY)}")
        need(syn.passkey_filler in PASSKEY_FILLERS, "data.synthetic.passkey_filler",
             f"unknown value {syn.passkey_filler!r}; choose from {list(PASSKEY_FILLERS)}")
        need(self.seq_len > 0, "data.seq_len", f"must be > 0, got {self.seq_len}")
        need(self.batch_size > 0, "data.batch_size", f"must be > 0, got {self.batch_size}")
        need(0.0 <= self.val_fraction < 1.0, "data.val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        need(self.val_batches >= 0, "data.val_batches", f"must be >= 0, got {self.val_batches}")
        need(self.batches_per_epoch >= 0, "data.batches_per_epoch", f"must be >= 0, got {self.batches_per_epoch}")
        need(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        need(self.max_documents >= 0, "data.max_documents", f"must be >= 0, got {self.max_documents}")
        need(0.0 <= self.mix_prob <= 1.0, "data.mix_prob", f"must be in [0, 1], got {self.mix_prob}")
        need(self.source != "files" or len(self.paths) > 0, "data.paths",
             "source=files needs at least one path or glob")
        need(self.source != "hub" or bool(self.hub_name), "data.hub_name", "source=hub needs a dataset name")
        need(self.source != "synthetic" or self.mix_prob == 0.0, "data.mix_prob",
             "mixing needs a text source (stdlib/files/hub), not source=synthetic")
        if self.stream_mode == "contiguous":
            need(self.is_token_stream(), "data.stream_mode", "contiguous needs a token stream (a text source or "
                 "synthetic.task=recall_stream), not source=synthetic")
            need(self.pack, "data.pack", "stream_mode=contiguous reads one continuous packed stream: set pack=true")
            need(self.mix_prob == 0.0, "data.mix_prob",
                 "synthetic rows would break the continuity of stream_mode=contiguous")
        need(not (self.source == "synthetic" and syn.passkey_filler in ("corpus", "mixed")),
             "data.synthetic.passkey_filler", f"{syn.passkey_filler} filler needs a text source, not source=synthetic")

        if self.source == "synthetic" or self.mix_prob > 0:
            need(syn.vocab_size >= 4, "data.synthetic.vocab_size", f"must be >= 4, got {syn.vocab_size}")
            need(syn.passkey_digits >= 1, "data.synthetic.passkey_digits", f"must be >= 1, got {syn.passkey_digits}")
            need(syn.copy_len >= 0, "data.synthetic.copy_len", f"must be >= 0, got {syn.copy_len}")
            if syn.task == "mqar":
                n = syn.num_kv_pairs
                need(n >= 1, "data.synthetic.num_kv_pairs", f"must be >= 1, got {n}")
                need(4 * n <= self.seq_len + 1, "data.synthetic.num_kv_pairs",
                     f"{n} pairs need 4*{n}={4 * n} tokens (pairs, then one query slot of 2 per key) but a row "
                     f"has seq_len+1={self.seq_len + 1}")
                need(n <= syn.vocab_size // 2 - 1, "data.synthetic.num_kv_pairs",
                     f"{n} distinct keys do not fit in the key range [1, {syn.vocab_size // 2}) of vocab_size "
                     f"{syn.vocab_size}")
            if syn.task == "copy":
                need(2 * syn.copy_len + 1 <= self.seq_len + 1, "data.synthetic.copy_len",
                     f"copying {syn.copy_len} tokens needs 2*copy_len+1 <= seq_len+1={self.seq_len + 1}")
                need(self.seq_len >= 2, "data.seq_len", "copy needs seq_len >= 2")
            if syn.task == "recall_stream":
                need(self.source == "synthetic", "data.synthetic.task",
                     "recall_stream is a corpus of its own (source=synthetic), it cannot be mixed into text rows")
                need(syn.num_keys >= 1, "data.synthetic.num_keys", f"must be >= 1, got {syn.num_keys}")
                need(syn.num_values >= 1, "data.synthetic.num_values", f"must be >= 1, got {syn.num_values}")
                need(0.0 < syn.p_set <= 1.0, "data.synthetic.p_set", f"must be in (0, 1], got {syn.p_set}")
                need(syn.recall_window >= 0, "data.synthetic.recall_window", f"must be >= 0, got {syn.recall_window}")
                need(0 <= syn.key_gap < syn.num_keys, "data.synthetic.key_gap",
                     f"must be in [0, num_keys={syn.num_keys}) (a SET needs a key not used in the last key_gap "
                     f"pairs), got {syn.key_gap}")
                need(syn.num_streams >= 1 and syn.val_streams >= 1, "data.synthetic.num_streams",
                     f"num_streams and val_streams must be >= 1, got {syn.num_streams}, {syn.val_streams}")
                need(syn.stream_len >= 2 and syn.stream_len % 2 == 0, "data.synthetic.stream_len",
                     f"must be an even number >= 2 (pairs of tokens), got {syn.stream_len}")
