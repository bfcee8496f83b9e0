"""The data error: an input the run cannot use (a missing or unreadable file, a tokenizer that does not fit the
model, a corpus too small for the window). Its message starts with the key to change (`data.paths: ...`) and says
what to do; the commands end on it with that one line (hybridlm/cli.py)."""
from __future__ import annotations


class DataError(ValueError):
    """Data that cannot be used; the message names the key or file and what to do."""


# The two kinds below keep the exception types these errors had before DataError, so code that catches a
# FileNotFoundError (a missing path) or a RuntimeError (a hub dataset that cannot be loaded) still does.
class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data path (corpus file, tokenizer) that does not exist."""


class DataSourceError(DataError, RuntimeError):
    """A dataset source that cannot be loaded (offline, unknown name)."""


def first_line(e: BaseException) -> str:
    """`Type: first line of the message` of a library's exception: enough to say what went wrong in one line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
