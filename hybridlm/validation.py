"""The check every config's `validate()` is written with. A failed check raises ValueError whose message starts
with the offending key ("model.ssm.headdim: ..."), so a bad command line is fixed without reading a traceback.
Imports nothing from hybridlm, so every package (models/ included) can use it."""
from __future__ import annotations


def need(cond: bool, key: str, msg: str) -> None:
    """Raise ValueError(f"{key}: {msg}") unless cond; key is the full dotted config key."""
    if not cond:
        raise ValueError(f"{key}: {msg}")
