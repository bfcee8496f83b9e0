from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        cdt = torch.promote_types(x.dtype, torch.float32)  # at least fp32 inside the norm
        xf = x.to(cdt)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(cdt)).to(x.dtype)


class RMSNormGated(nn.Module):
    """mamba_ssm's RMSNormGated: rmsnorm(x * silu(z)) per group of `group_size` channels (gate after norm
    when norm_before_gate)."""

    def __init__(self, d: int, group_size: int, eps: float = 1e-5, norm_before_gate: bool = False):
        super().__init__()
        self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        dtype = x.dtype
        cdt = torch.promote_types(dtype, torch.float32)
        x = x.to(cdt)
        if z is not None and not self.norm_before_gate:
            x = x * F.silu(z.to(cdt))
        xg = x.unflatten(-1, (-1, self.group_size))
        x = (xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        x = x * self.weight.to(cdt)
        if z is not None and self.norm_before_gate:
            x = x * F.silu(z.to(cdt))
        return x.to(dtype)
