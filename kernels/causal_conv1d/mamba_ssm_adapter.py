"""The `mamba_ssm` backend of causal_conv1d: the CUDA kernel of Dao-AILab/causal-conv1d (installed with mamba_ssm).

Nothing here imports it at module load (it fails to import on a machine without CUDA): the availability check
imports it lazily and reports the failure as the reason.

causal_conv1d -> causal_conv1d.causal_conv1d_fn(x (b, d, l), weight (d, k), bias, initial_states=(b, d, k-1),
return_final_states=True, activation=None). Initial/final states need the channel-last layout (x.stride(1) == 1),
which a (b, l, d) tensor transposed to (b, d, l) already has.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from hybridlm.kernels.availability import mamba_ssm_import_reason, mamba_ssm_tensors
from hybridlm.ops.registry import Reason


def causal_conv1d_mamba_ssm_available() -> Reason:
    return mamba_ssm_import_reason("causal_conv1d")


def verify_causal_conv1d_mamba_ssm(x, weight, bias, conv_state=None) -> Reason:
    reason = mamba_ssm_tensors(x, weight, bias, conv_state)
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
