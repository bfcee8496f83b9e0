"""Can a backend run on this machine, and can it take this call? The checks shared by the op folders.

Nothing here imports triton or mamba_ssm at module load: importing triton fixes its interpreter mode, and mamba_ssm
fails to import without CUDA. The checks look at the machine and at the call's tensors; the mamba_ssm check
imports the package only when asked (and then only on a CUDA machine).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
from typing import Optional

import torch
from torch import Tensor

from hybridlm.ops.registry import Reason


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> Reason:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    if torch.cuda.is_available():
        return None
    if not interpreting():
        return ("no CUDA GPU and TRITON_INTERPRET is not 1 (on CPU, Triton kernels run only under its "
                "interpreter, enabled by TRITON_INTERPRET=1 before triton is first imported)")
    lang = sys.modules.get("triton.language")
    if lang is not None and type(lang.zeros).__name__ != "InterpretedFunction":
        return ("TRITON_INTERPRET=1 was set after triton was imported (its builtins are compiled, not "
                "interpreted); set it before the first import, e.g. in the environment")
    return None


def triton_auto_skip() -> Reason:
    if torch.cuda.is_available():
        return None
    return "only the CPU interpreter is available: correct but far slower than torch; ask for it by name"


def triton_tensors(*ts: Optional[Tensor], uses_dot: bool = True) -> Reason:
    """Device/dtype rules shared by every Triton kernel (`uses_dot`: the kernel calls tl.dot)."""
    ts = [t for t in ts if t is not None]
    devices = {t.device for t in ts}
    if len(devices) > 1:
        return f"tensors on several devices {sorted(map(str, devices))}"
    dev = ts[0].device
    if dev.type == "cuda":
        return None
    if dev.type != "cpu":
        return f"device {dev.type} is not supported"
    if not interpreting():
        return "CPU tensors need TRITON_INTERPRET=1"
    if uses_dot and any(t.dtype == torch.bfloat16 for t in ts):
        return "bf16 tl.dot gives wrong results under the Triton interpreter"
    return None


@functools.cache
def mamba_ssm_import_reason(module: str) -> Reason:
    """None when `module` (a part of mamba_ssm / causal_conv1d) imports on this machine, else why not."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (its kernels are CUDA / GPU Triton only)"
    try:
        __import__(module)
    except Exception as e:  # ImportError, or a missing CUDA extension raising at import
        return f"import {module} failed: {type(e).__name__}: {e}"
    return None


MAMBA_SSM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def mamba_ssm_tensors(*ts: Optional[Tensor]) -> Reason:
    """Device/dtype rules shared by the mamba_ssm kernels."""
    ts = [t for t in ts if t is not None]
    if any(t.device.type != "cuda" for t in ts):
        return "tensors are not on a CUDA device"
    if any(t.dtype not in MAMBA_SSM_DTYPES for t in ts if t.is_floating_point()):
        return f"dtype not in {MAMBA_SSM_DTYPES}"
    return None
