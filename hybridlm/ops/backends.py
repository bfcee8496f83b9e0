"""The built-in backends of each op: where they live, when they can run, which calls they accept.

Checks never import triton or mamba_ssm themselves (importing triton fixes its interpreter mode, and
mamba_ssm fails to import without CUDA); they look at the machine and the call's tensors.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Optional

import torch
from torch import Tensor

from hybridlm.ops import mamba_ssm_backend
from hybridlm.ops.registry import Backend, Reason, register

PRIORITY = {"torch": 0, "triton": 10, "mamba_ssm": 20}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> Reason:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    if torch.cuda.is_available():
        return None
    if not _interpreting():
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


def _triton_tensors(*ts: Optional[Tensor], uses_dot: bool = True) -> Reason:
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
    if not _interpreting():
        return "CPU tensors need TRITON_INTERPRET=1"
    if uses_dot and any(t.dtype == torch.bfloat16 for t in ts):
        return "bf16 tl.dot gives wrong results under the Triton interpreter"
    return None


def verify_ssd_triton(x, dt, A, B, C, chunk_size, D=None, initial_state=None) -> Reason:
    reason = _triton_tensors(x, dt, A, B, C, D, initial_state)
    if reason:
        return reason
    # one program holds a whole chunk, head and state: bounded so it fits a GPU's registers/shared memory
    if x.shape[-1] > 128 or B.shape[-1] > 256 or chunk_size > 256:
        return f"headdim {x.shape[-1]} > 128, d_state {B.shape[-1]} > 256 or chunk_size {chunk_size} > 256"
    from kernels.ssd.chunk import ssd_triton_fits  # imported already: this backend is in the chain (registry.configure)
    return ssd_triton_fits(x, B, chunk_size)


def verify_attention_triton(q, k, v, *args, **kwargs) -> Reason:
    reason = _triton_tensors(q, k, v)
    if reason:
        return reason
    if q.shape[-1] > 256:
        return f"head_dim {q.shape[-1]} > 256"
    return None


def verify_span_triton(q, k, v, selected, *args, **kwargs) -> Reason:
    reason = verify_attention_triton(q, k, v)
    if reason:
        return reason
    if v.shape[-1] != q.shape[-1]:
        return f"value head dim {v.shape[-1]} != query head dim {q.shape[-1]}"
    if selected.device != q.device:
        return "selected is on another device than q"
    return None


CONV_MAX_K = 16  # the conv kernel unrolls its taps


def verify_conv_triton(x, weight, bias, conv_state=None) -> Reason:
    reason = _triton_tensors(x, weight, bias, conv_state, uses_dot=False)
    if reason:
        return reason
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {x.dtype}: the kernel computes in fp32"
    if x.numel() == 0:
        return "empty input"
    if weight.shape[-1] > CONV_MAX_K:
        return f"kernel size {weight.shape[-1]} > {CONV_MAX_K}"
    return None


def _add(op: str, name: str, load: str, available=lambda: None, verify=None, auto_skip=lambda: None) -> None:
    register(Backend(op=op, name=name, priority=PRIORITY[name], load=load, available=available, verify=verify,
                     auto_skip=auto_skip))


def register_builtin() -> None:
    _add("ssd_scan", "torch", "hybridlm.ops.ssd:ssd_scan_torch")
    _add("ssd_scan", "triton", "kernels.ssd.chunk:ssd_scan_triton", triton_available, verify_ssd_triton,
         triton_auto_skip)
    _add("ssd_scan", "mamba_ssm", "hybridlm.ops.mamba_ssm_backend:ssd_scan_mamba_ssm",
         mamba_ssm_backend.ssd_available, mamba_ssm_backend.verify_ssd)

    _add("causal_conv1d", "torch", "hybridlm.ops.conv:causal_conv1d_torch")
    _add("causal_conv1d", "triton", "kernels.causal_conv1d.triton:causal_conv1d_triton", triton_available,
         verify_conv_triton, triton_auto_skip)
    _add("causal_conv1d", "mamba_ssm", "hybridlm.ops.mamba_ssm_backend:causal_conv1d_mamba_ssm",
         mamba_ssm_backend.conv_available, mamba_ssm_backend.verify_conv)

    _add("window_attention", "torch", "hybridlm.ops.attention:window_attention_torch")
    _add("window_attention", "triton", "kernels.window_attention.triton:window_attention_triton",
         triton_available, verify_attention_triton, triton_auto_skip)

    _add("span_attention", "torch", "hybridlm.ops.span_attention:span_attention_torch")
    _add("span_attention", "triton", "kernels.span_attention.triton:span_attention_triton",
         triton_available, verify_span_triton, triton_auto_skip)
