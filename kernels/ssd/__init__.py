"""ssd_scan: the chunked SSD scan of Mamba-2, and where its backends register.

    torch_ref.py          ssd_scan_torch: chunked torch with a hand-written backward; always available
    triton_kernel.py      ssd_scan_triton: Triton forward and backward (imported only once selected)
    mamba_ssm_adapter.py  ssd_scan_mamba_ssm: mamba_ssm's mamba_chunk_scan_combined (CUDA)
    naive.py              ssd_scan_naive: the token-by-token recurrence the others are tested against
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from hybridlm.kernels.availability import triton_auto_skip, triton_available, triton_tensors
from hybridlm.kernels.ssd.mamba_ssm_adapter import (
    ssd_scan_mamba_ssm,
    ssd_scan_mamba_ssm_available,
    verify_ssd_scan_mamba_ssm,
)
from hybridlm.kernels.ssd.torch_ref import ssd_scan_torch
from hybridlm.ops.registry import PRIORITY, Backend, Reason, call, register


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Optional[Tensor] = None,
             initial_state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """x (b,l,h,p), dt (b,l,h) softplus'd, A (h,), B/C (b,l,g,n) -> y (b,l,h,p), final state (b,h,p,n) fp32."""
    if x.shape[1] == 0:  # nothing to scan: an empty output and the state unchanged, whatever the backend
        f = torch.promote_types(x.dtype, torch.float32)
        b, _, h, p = x.shape
        final = initial_state if initial_state is not None else x.new_zeros(b, h, p, B.shape[-1])
        return torch.zeros_like(x), final.to(f)
    return call("ssd_scan", x, dt, A, B, C, chunk_size, D, initial_state)


def verify_ssd_scan_triton(x, dt, A, B, C, chunk_size, D=None, initial_state=None) -> Reason:
    reason = triton_tensors(x, dt, A, B, C, D, initial_state)
    if reason:
        return reason
    # The kernels tile positions, head dim and state dim (<= 64 wide), so only launch limits remain; triton is
    # importable here: verifiers run only for backends already in the chain.
    from hybridlm.kernels.ssd.triton_kernel import ssd_triton_fits

    return ssd_triton_fits(x, B, chunk_size)


def _load_triton():
    from hybridlm.kernels.ssd.triton_kernel import ssd_scan_triton

    return ssd_scan_triton


register(Backend("ssd_scan", "torch", PRIORITY["torch"], load=lambda: ssd_scan_torch))
register(Backend("ssd_scan", "triton", PRIORITY["triton"], load=_load_triton, available=triton_available,
                 verify=verify_ssd_scan_triton, auto_skip=triton_auto_skip))
register(Backend("ssd_scan", "mamba_ssm", PRIORITY["mamba_ssm"], load=lambda: ssd_scan_mamba_ssm,
                 available=ssd_scan_mamba_ssm_available, verify=verify_ssd_scan_mamba_ssm))
