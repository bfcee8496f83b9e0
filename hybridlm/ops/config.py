from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class BackendConfig:
    """Which implementation each op runs (see hybridlm/ops/registry.py).

    name: auto (best available per op) | torch | triton | mamba_ssm. A named backend is used for every op
    that has one (torch for the others) and fails at start, saying why, if it cannot run on this machine.
    Per-op fields override `name` for one op; the environment variables HYBRIDLM_BACKEND_SSD / _CONV /
    _WINDOW_ATTN / _SPAN_ATTN / _SE_ATTN override both.
    """

    name: str = "auto"
    ssd: Optional[str] = None
    conv: Optional[str] = None
    window_attn: Optional[str] = None
    span_attn: Optional[str] = None
    se_attn: Optional[str] = None
