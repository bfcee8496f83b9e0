"""span_attention: the windowed SE-Attn of attention kind se_attn_window (models/se_attention_window.py), a causal
sliding window plus k retrieved memory blocks, and where its backends register. The paper's chunked SE-Attn (kind
se_attn) is the op se_attention (kernels/se_attention/). Two pieces, split so a kernel can replace the second one:

    selection.py      select_blocks (no gradient): top-k memory blocks per query chunk, by a swappable scorer
    torch_ref.py      span_attention_torch: attention over each chunk's selected blocks and its window; always
                      available; the exact semantics are in its docstring
    triton_kernel.py  span_attention_triton: Triton forward and backward (imported only once selected)
    naive.py          span_attention_naive: an explicit (Lq x Lk) mask the others are tested against
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from hybridlm.kernels.availability import triton_auto_skip, triton_available
from hybridlm.kernels.span_attention.torch_ref import span_attention_torch
from hybridlm.kernels.window_attention import verify_window_attention_triton
from hybridlm.ops.registry import PRIORITY, Backend, Reason, call, register


def span_attention(q: Tensor, k: Tensor, v: Tensor, selected: Tensor, window: int, block_size: int, query_chunk: int,
                   softmax_scale: Optional[float] = None) -> Tensor:
    """SE-Attn: q (b,h,lq,d), k/v (b,hkv,lk,d), selected (b,hkv,ceil(lq/query_chunk),top_k) block ids (-1 empty)
    -> o (b,h,lq,d); semantics in torch_ref.py."""
    if q.shape[2] == 0:  # no queries: an empty output, whatever the backend
        return q.new_zeros(*q.shape[:3], v.shape[-1])
    return call("span_attention", q, k, v, selected, window, block_size, query_chunk, softmax_scale)


def verify_span_attention_triton(q, k, v, selected, *args, **kwargs) -> Reason:
    reason = verify_window_attention_triton(q, k, v)
    if reason:
        return reason
    if v.shape[-1] != q.shape[-1]:
        return f"value head dim {v.shape[-1]} != query head dim {q.shape[-1]}"
    if selected.device != q.device:
        return "selected is on another device than q"
    return None


def _load_triton():
    from hybridlm.kernels.span_attention.triton_kernel import span_attention_triton

    return span_attention_triton


register(Backend("span_attention", "torch", PRIORITY["torch"], load=lambda: span_attention_torch))
register(Backend("span_attention", "triton", PRIORITY["triton"], load=_load_triton, available=triton_available,
                 verify=verify_span_attention_triton, auto_skip=triton_auto_skip))
