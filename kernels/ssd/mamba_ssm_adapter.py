"""The `mamba_ssm` backend: the official CUDA/Triton kernels of state-spaces/mamba and Dao-AILab/causal-conv1d.

Nothing here imports them at module load (mamba_ssm fails to import on a machine without CUDA): the
availability checks import lazily and report the failure as the reason.

- ssd_scan -> mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=...,
  initial_states=..., return_final_states=True). Our op receives dt after softplus(dt + dt_bias) and the
  dt_limit clamp (the Mamba2 mixer does that in torch), so we pass dt_bias=None, dt_softplus=False and the
  default dt_limit (no clamp); fusing the softplus into the kernel would change the op's contract.
- causal_conv1d -> causal_conv1d.causal_conv1d_fn(x (b, d, l), weight (d, k), bias, initial_states=(b, d, k-1),
  return_final_states=True, activation=None). Initial/final states need the channel-last layout
  (x.stride(1) == 1), which a (b, l, d) tensor transposed to (b, d, l) already has.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

Reason = Optional[str]
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _import_reason(module: str) -> Reason:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (its kernels are CUDA / GPU Triton only)"
    try:
        __import__(module)
    except Exception as e:  # ImportError, or a missing CUDA extension raising at import
        return f"import {module} failed: {type(e).__name__}: {e}"
    return None


def ssd_available() -> Reason:
    return _import_reason("mamba_ssm.ops.triton.ssd_combined")


def conv_available() -> Reason:
    return _import_reason("causal_conv1d")


def _cuda_tensors(*ts: Optional[Tensor]) -> Reason:
    ts = [t for t in ts if t is not None]
    if any(t.device.type != "cuda" for t in ts):
        return "tensors are not on a CUDA device"
    if any(t.dtype not in _DTYPES for t in ts if t.is_floating_point()):
        return f"dtype not in {_DTYPES}"
    return None


def verify_ssd(x, dt, A, B, C, chunk_size, D=None, initial_state=None) -> Reason:
    return _cuda_tensors(x, dt, A, B, C, D, initial_state)


def verify_conv(x, weight, bias, conv_state=None) -> Reason:
    reason = _cuda_tensors(x, weight, bias, conv_state)
    if reason:
        return reason
    k, d = weight.shape[-1], x.shape[-1]
    if not 2 <= k <= 4:
        return f"kernel width {k} not in [2, 4]"
    # channel-last kernel (needed for initial/final states): channels and strides in multiples of 8
    if d % 8 or x.stride(-1) != 1 or x.stride(0) % 8 or x.stride(1) % 8:
        return f"channel-last layout needs d % 8 == 0 and strides multiple of 8, got d={d}, strides={x.stride()}"
    if bias is not None and bias.dtype != weight.dtype:
        return f"bias dtype {bias.dtype} != weight dtype {weight.dtype}"
    return None


def ssd_scan_mamba_ssm(
    x: Tensor,  # (b, l, h, p)
    dt: Tensor,  # (b, l, h), already softplus'd and clamped
    A: Tensor,  # (h,)
    B: Tensor,  # (b, l, g, n)
    C: Tensor,  # (b, l, g, n)
    chunk_size: int,
    D: Optional[Tensor] = None,  # (h,)
    initial_state: Optional[Tensor] = None,  # (b, h, p, n)
) -> tuple[Tensor, Tensor]:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    y, final = mamba_chunk_scan_combined(
        x, dt, A, B, C, chunk_size, D=D, z=None, dt_bias=None, initial_states=initial_state,
        dt_softplus=False, return_final_states=True)
    return y, final.float()


def causal_conv1d_mamba_ssm(
    x: Tensor,  # (b, l, d)
    weight: Tensor,  # (d, 1, k)
    bias: Optional[Tensor],
    conv_state: Optional[Tensor] = None,  # (b, k-1, d)
) -> tuple[Tensor, Tensor]:
    from causal_conv1d import causal_conv1d_fn

    init = None
    if conv_state is not None:
        init = conv_state.to(x.dtype).contiguous().transpose(1, 2)  # (b, d, k-1) with stride(1) == 1
    y, final = causal_conv1d_fn(x.transpose(1, 2), weight.squeeze(1), bias, initial_states=init,
                                return_final_states=True, activation=None)
    return y.transpose(1, 2), final.transpose(1, 2)
