"""window_attention: causal, optionally sliding-window attention over queries whose keys may be preceded by a
cache, and where its backends register.

    torch_ref.py      window_attention_torch: torch SDPA in bounded query blocks; always available
    triton_kernel.py  window_attention_triton: flash-style Triton forward and backward (imported only once selected);
                      its jit helpers are shared with span_attention's kernel
    naive.py          window_attention_naive: an explicit masked softmax the others are tested against
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from hybridlm.kernels.availability import triton_auto_skip, triton_available, triton_tensors
from hybridlm.kernels.window_attention.torch_ref import window_attention_torch
from hybridlm.ops.registry import PRIORITY, Backend, Reason, call, register


def window_attention(q: Tensor, k: Tensor, v: Tensor, window: Optional[int] = None,
                     softmax_scale: Optional[float] = None) -> Tensor:
    """q (b,h,lq,d), k/v (b,hkv,lk,d) whose last lq positions are the queries' -> o (b,h,lq,d)."""
    if q.shape[2] == 0:  # no queries: an empty output, whatever the backend
        return q.new_zeros(*q.shape[:3], v.shape[-1])
    return call("window_attention", q, k, v, window, softmax_scale)


def verify_window_attention_triton(q, k, v, *args, **kwargs) -> Reason:
    reason = triton_tensors(q, k, v)
    if reason:
        return reason
    if q.shape[-1] > 256:
        return f"head_dim {q.shape[-1]} > 256"
    return None


def _load_triton():
    from hybridlm.kernels.window_attention.triton_kernel import window_attention_triton

    return window_attention_triton


register(Backend("window_attention", "torch", PRIORITY["torch"], load=lambda: window_attention_torch))
register(Backend("window_attention", "triton", PRIORITY["triton"], load=_load_triton, available=triton_available,
                 verify=verify_window_attention_triton, auto_skip=triton_auto_skip))
