"""Mamba-2 mixer with the semantics and parameter names of mamba_ssm's `modules/mamba2.py`.

in_proj: d_model -> [z (d_inner), x (d_inner), B (g*n), C (g*n), dt (nheads)]
conv1d:  depthwise causal conv over xBC, then SiLU
dt = clamp(softplus(dt + dt_bias), dt_limit);  A = -exp(A_log)
y  = SSD(x, dt, A, B, C) + D * x;  out = out_proj(RMSNormGated(y, z))

Streaming state: {"ssm": (b, nheads, headdim, d_state), "conv": (b, d_conv-1, conv_dim)}; a missing
entry means zeros (`zero_state` builds them explicitly).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridlm import ops
from hybridlm.models.config import SSMConfig
from hybridlm.models.norm import RMSNormGated
from hybridlm.models.state import device_dtype


class Mamba2(nn.Module):
    def __init__(self, d_model: int, cfg: SSMConfig, layer_idx: int = 0):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.d_model = d_model
        self.d_inner = cfg.expand * d_model if cfg.d_inner is None else cfg.d_inner
        self.headdim, self.d_state, self.ngroups = cfg.headdim, cfg.d_state, cfg.ngroups
        self.nheads = self.d_inner // cfg.headdim
        self.conv_dim = self.d_inner + 2 * cfg.ngroups * cfg.d_state
        d_in_proj = 2 * self.d_inner + 2 * cfg.ngroups * cfg.d_state + self.nheads
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=cfg.bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim,
                                padding=cfg.d_conv - 1, bias=cfg.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = RMSNormGated(self.d_inner, group_size=self.d_inner // cfg.ngroups,
                                 norm_before_gate=cfg.norm_before_gate)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=cfg.bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        cfg = self.cfg
        # dt initialised log-uniformly in [dt_min, dt_max]; dt_bias is its softplus inverse.
        dt = torch.exp(torch.rand(self.nheads) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = dt.clamp(min=cfg.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log.copy_(torch.log(torch.empty(self.nheads).uniform_(*cfg.A_init_range)))
        self.D.fill_(1.0)
        # These are never weight-decayed (see lit.py's parameter groups).
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True

    def zero_state(self, batch: int, device=None, dtype=None) -> dict:
        """The zero initial state of `batch` sequences, which forward treats like None:
        {"ssm": (batch, nheads, headdim, d_state), "conv": (batch, d_conv-1, conv_dim)}.
        device and dtype default to the parameters'. dtype is the conv state's (the activations'); the ssm state
        is in promote_types(dtype, float32), the precision the scan returns states in."""
        device, dtype = device_dtype(self, device, dtype)
        ssm_dtype = torch.promote_types(dtype, torch.float32)
        return {"ssm": torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device, dtype=ssm_dtype),
                "conv": torch.zeros(batch, self.cfg.d_conv - 1, self.conv_dim, device=device, dtype=dtype)}

    def forward(self, u: Tensor, state: Optional[dict] = None) -> tuple[Tensor, dict]:
        """u: (b, l, d_model) -> (out (b, l, d_model), new state)."""
        state = state or {}
        b, l, _ = u.shape
        zxbcdt = self.in_proj(u)
        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xBC, conv_state = ops.causal_conv1d(xBC, self.conv1d.weight, self.conv1d.bias, state.get("conv"))
        xBC = F.silu(xBC)
        x, B, C = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        dt = F.softplus(dt + self.dt_bias)
        lo, hi = self.cfg.dt_limit
        if lo > 0.0 or hi != float("inf"):
            dt = dt.clamp(min=lo, max=hi)
        A = -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32)))
        y, ssm_state = ops.ssd_scan(
            x.view(b, l, self.nheads, self.headdim), dt, A,
            B.view(b, l, self.ngroups, self.d_state), C.view(b, l, self.ngroups, self.d_state),
            chunk_size=self.cfg.chunk_size, D=self.D, initial_state=state.get("ssm"),
        )
        y = self.norm(y.reshape(b, l, self.d_inner), z)
        return self.out_proj(y), {"ssm": ssm_state, "conv": conv_state}
