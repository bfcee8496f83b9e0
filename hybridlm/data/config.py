from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class SyntheticConfig:
    task: str = "mqar"  # mqar | copy | passkey
    num_kv_pairs: int = 8
    vocab_size: int = 256


@dataclass
class DataConfig:
    source: str = "stdlib"  # stdlib | files | hub | synthetic
    paths: list[str] = field(default_factory=list)
    hub_name: Optional[str] = None
    text_column: str = "text"
    tokenizer: str = "byte"
    seq_len: int = 256
    batch_size: int = 8
    val_fraction: float = 0.05
    num_workers: int = 0
    stream_mode: str = "random"  # random | contiguous (row i of batch t continues row i of batch t-1: TBTT)
    seed: int = 1234
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
