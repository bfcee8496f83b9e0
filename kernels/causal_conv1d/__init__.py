"""causal_conv1d: the depthwise causal conv1d of Mamba-2 with a streaming state, and where its backends register.

    torch_ref.py          causal_conv1d_torch: k shifted multiply-adds; always available
    triton_kernel.py      causal_conv1d_triton: Triton forward and backward (imported only once selected)
    mamba_ssm_adapter.py  causal_conv1d_mamba_ssm: causal_conv1d_fn of the causal-conv1d package (CUDA)
    naive.py              causal_conv1d_naive: the per-timestep loop the others are tested against
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from hybridlm.kernels.availability import triton_auto_skip, triton_available, triton_tensors
from hybridlm.kernels.causal_conv1d.mamba_ssm_adapter import (
    causal_conv1d_mamba_ssm,
    causal_conv1d_mamba_ssm_available,
    verify_causal_conv1d_mamba_ssm,
)
from hybridlm.kernels.causal_conv1d.torch_ref import causal_conv1d_torch
from hybridlm.ops.registry import PRIORITY, Backend, Reason, call, register

TRITON_MAX_K = 16  # the Triton kernel unrolls its taps


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                  conv_state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """x (b,l,d), weight (d,1,k), conv_state (b,k-1,d) -> y (b,l,d) (no activation), new state (b,k-1,d)."""
    if x.shape[1] == 0:  # no new inputs: an empty output and the state unchanged, whatever the backend
        b, _, d = x.shape
        state = conv_state if conv_state is not None else x.new_zeros(b, weight.shape[-1] - 1, d)
        return torch.zeros_like(x), state.to(x.dtype)
    return call("causal_conv1d", x, weight, bias, conv_state)


def verify_causal_conv1d_triton(x, weight, bias, conv_state=None) -> Reason:
    reason = triton_tensors(x, weight, bias, conv_state, uses_dot=False)
    if reason:
        return reason
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {x.dtype}: the kernel computes in fp32"
    if x.numel() == 0:
        return "empty input"
    if weight.shape[-1] > TRITON_MAX_K:
        return f"kernel size {weight.shape[-1]} > {TRITON_MAX_K}"
    return None


def _load_triton():
    from hybridlm.kernels.causal_conv1d.triton_kernel import causal_conv1d_triton

    return causal_conv1d_triton


register(Backend("causal_conv1d", "torch", PRIORITY["torch"], load=lambda: causal_conv1d_torch))
register(Backend("causal_conv1d", "triton", PRIORITY["triton"], load=_load_triton, available=triton_available,
                 verify=verify_causal_conv1d_triton, auto_skip=triton_auto_skip))
register(Backend("causal_conv1d", "mamba_ssm", PRIORITY["mamba_ssm"], load=lambda: causal_conv1d_mamba_ssm,
                 available=causal_conv1d_mamba_ssm_available, verify=verify_causal_conv1d_mamba_ssm))
