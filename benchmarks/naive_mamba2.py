"""A deliberately naive Mamba-2 LM for the benchmark baseline: same architecture and sizes as HybridLM's pure
Mamba-2 stack, but the SSM is the literal recurrence, one token at a time in a Python loop:

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,   y_t = h_t C_t + D x_t
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class NaiveMamba2Mixer(nn.Module):
    def __init__(self, d_model: int, d_state: int, headdim: int, expand: int = 2, d_conv: int = 4):
        super().__init__()
        self.d_inner = expand * d_model
        self.nheads, self.headdim, self.d_state = self.d_inner // headdim, headdim, d_state
        self.conv_dim = self.d_inner + 2 * d_state
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * d_state + self.nheads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1)
        self.dt_bias = nn.Parameter(torch.log(torch.expm1(torch.full((self.nheads,), 0.01))))
        self.A_log = nn.Parameter(torch.log(torch.linspace(1, 16, self.nheads)))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = _RMSNorm(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def forward(self, u: Tensor) -> Tensor:
        b, l, _ = u.shape
        z, xbc, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xbc = F.silu(self.conv1d(xbc.transpose(1, 2))[..., :l].transpose(1, 2))
        x, B, C = xbc.split([self.d_inner, self.d_state, self.d_state], dim=-1)
        x = x.reshape(b, l, self.nheads, self.headdim)
        dt = F.softplus(dt + self.dt_bias)  # (b, l, h)
        A = -torch.exp(self.A_log)
        h = u.new_zeros(b, self.nheads, self.headdim, self.d_state)
        ys = []
        for t in range(l):
            write = (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, None, None]  # (b, h, p, n)
            h = torch.exp(dt[:, t] * A)[..., None, None] * h + write
            ys.append(h @ C[:, t, None, :, None])  # (b, h, p, 1)
        y = torch.stack(ys, dim=1).squeeze(-1) + x * self.D[:, None]
        y = self.norm(y.reshape(b, l, self.d_inner) * F.silu(z))
        return self.out_proj(y)


class NaiveMamba2LM(nn.Module):
    def __init__(self, vocab: int, d_model: int, n_layer: int, d_state: int, headdim: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab, d_model)
        self.norms = nn.ModuleList(_RMSNorm(d_model) for _ in range(n_layer))
        self.mixers = nn.ModuleList(NaiveMamba2Mixer(d_model, d_state, headdim) for _ in range(n_layer))
        self.norm_f = _RMSNorm(d_model)
        nn.init.normal_(self.embedding.weight, std=0.02)
        for m in self.mixers:
            m.out_proj.weight.data /= math.sqrt(n_layer)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embedding(ids)
        for norm, mixer in zip(self.norms, self.mixers):
            x = x + mixer(norm(x))
        return self.norm_f(x) @ self.embedding.weight.T  # tied head
