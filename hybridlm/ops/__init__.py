"""Functional ops used by the model. Each function here is the op the model calls; the backend registry
(ops/registry.py, backends registered in ops/backends.py) decides which implementation runs.

    from hybridlm import ops
    ops.configure("auto")   # or a BackendConfig; once at start
    print(ops.describe())   # op -> backend chain
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

# The submodule hybridlm.ops.span_attention shares its name with the op below. Import it first: a submodule's
# first import sets the package attribute, and the `def span_attention` below must be what stays bound.
import hybridlm.ops.span_attention  # noqa: F401, I001
from hybridlm.ops.backends import register_builtin
from hybridlm.ops.registry import BackendUnavailableError, active, call, configure, declined, describe

register_builtin()


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Optional[Tensor] = None,
             initial_state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """x (b,l,h,p), dt (b,l,h) softplus'd, A (h,), B/C (b,l,g,n) -> y (b,l,h,p), final state (b,h,p,n) fp32."""
    return call("ssd_scan", x, dt, A, B, C, chunk_size, D, initial_state)


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                  conv_state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """x (b,l,d), weight (d,1,k), conv_state (b,k-1,d) -> y (b,l,d) (no activation), new state (b,k-1,d)."""
    return call("causal_conv1d", x, weight, bias, conv_state)


def window_attention(q: Tensor, k: Tensor, v: Tensor, window: Optional[int] = None,
                     softmax_scale: Optional[float] = None) -> Tensor:
    """q (b,h,lq,d), k/v (b,hkv,lk,d) whose last lq positions are the queries' -> o (b,h,lq,d)."""
    return call("window_attention", q, k, v, window, softmax_scale)


def span_attention(q: Tensor, k: Tensor, v: Tensor, selected: Tensor, window: int, block_size: int, query_chunk: int,
                   softmax_scale: Optional[float] = None) -> Tensor:
    """SE-Attn: q (b,h,lq,d), k/v (b,hkv,lk,d), selected (b,hkv,ceil(lq/query_chunk),top_k) block ids (-1 empty)
    -> o (b,h,lq,d); semantics in hybridlm/ops/span_attention.py."""
    return call("span_attention", q, k, v, selected, window, block_size, query_chunk, softmax_scale)


__all__ = ["ssd_scan", "causal_conv1d", "window_attention", "span_attention", "configure", "describe", "active",
           "declined", "BackendUnavailableError"]
