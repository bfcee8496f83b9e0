"""The `mamba_ssm` backend of ssd_scan: mamba_ssm's Triton kernel `mamba_chunk_scan_combined` (state-spaces/mamba).

Nothing here imports mamba_ssm at module load (it fails to import on a machine without CUDA): the availability
check imports it lazily and reports the failure as the reason.

ssd_scan -> mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=...,
initial_states=..., return_final_states=True). Our op receives dt after softplus(dt + dt_bias) and the dt_limit
clamp (the Mamba2 mixer does that in torch), so we pass dt_bias=None, dt_softplus=False and the default dt_limit
(no clamp); fusing the softplus into the kernel would change the op's contract.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from hybridlm.kernels.availability import mamba_ssm_import_reason, mamba_ssm_tensors
from hybridlm.ops.registry import Reason


def ssd_scan_mamba_ssm_available() -> Reason:
    return mamba_ssm_import_reason("mamba_ssm.ops.triton.ssd_combined")


def verify_ssd_scan_mamba_ssm(x, dt, A, B, C, chunk_size, D=None, initial_state=None) -> Reason:
    return mamba_ssm_tensors(x, dt, A, B, C, D, initial_state)


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
