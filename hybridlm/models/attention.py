"""Attention mixer with mamba_ssm's `MHA` parameter names (fused qkv `in_proj`, `out_proj`, optional
depthwise `conv1d` over qkv, optional rotary on the first `rotary_emb_dim` dims of each head).

Kinds: `full` (causal), `swa` (causal sliding window of `window` keys, itself included).
Streaming state: {"k", "v": (b, hkv, cached, head_dim) after rotary, "pos": tokens seen, "conv": ...};
full attention caches everything, swa the last window-1 keys.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from hybridlm import ops
from hybridlm.models.config import AttentionConfig


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: Tensor, pos0: int, dim: int, base: float) -> Tensor:
    """Non-interleaved (GPT-NeoX) rotary on the first `dim` channels; x: (b, h, l, d), positions pos0.."""
    if dim == 0:
        return x
    l = x.shape[2]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))
    t = torch.arange(pos0, pos0 + l, device=x.device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    xr, xp = x[..., :dim], x[..., dim:]
    return torch.cat([xr * cos + rotate_half(xr) * sin, xp], dim=-1)


class Attention(nn.Module):
    def __init__(self, d_model: int, cfg: AttentionConfig, layer_idx: int = 0):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.num_heads = cfg.num_heads
        self.num_heads_kv = cfg.num_heads_kv or cfg.num_heads
        self.head_dim = cfg.head_dim or d_model // cfg.num_heads
        self.qkv_dim = self.head_dim * (self.num_heads + 2 * self.num_heads_kv)
        self.in_proj = nn.Linear(d_model, self.qkv_dim, bias=cfg.qkv_proj_bias)
        if cfg.d_conv > 0:
            self.conv1d = nn.Conv1d(self.qkv_dim, self.qkv_dim, cfg.d_conv, groups=self.qkv_dim,
                                    padding=cfg.d_conv - 1)
        self.out_proj = nn.Linear(self.head_dim * self.num_heads, d_model, bias=cfg.out_proj_bias)

    @property
    def window(self) -> Optional[int]:
        return None if self.cfg.kind == "full" else self.cfg.window

    def forward(self, u: Tensor, state: Optional[dict] = None) -> tuple[Tensor, dict]:
        state = state or {}
        b, l, _ = u.shape
        pos = state.get("pos", 0)
        qkv = self.in_proj(u)
        new_state: dict = {}
        if self.cfg.d_conv > 0:
            qkv, new_state["conv"] = ops.causal_conv1d(qkv, self.conv1d.weight, self.conv1d.bias, state.get("conv"))
        hd = self.head_dim
        q, k, v = torch.split(qkv, [self.num_heads * hd, self.num_heads_kv * hd, self.num_heads_kv * hd], dim=-1)
        q = q.view(b, l, self.num_heads, hd).transpose(1, 2)
        k = k.view(b, l, self.num_heads_kv, hd).transpose(1, 2)
        v = v.view(b, l, self.num_heads_kv, hd).transpose(1, 2)
        q = apply_rotary(q, pos, self.cfg.rotary_emb_dim, self.cfg.rotary_emb_base)
        k = apply_rotary(k, pos, self.cfg.rotary_emb_dim, self.cfg.rotary_emb_base)
        if "k" in state:
            k = torch.cat([state["k"].to(k.dtype), k], dim=2)
            v = torch.cat([state["v"].to(v.dtype), v], dim=2)
        o, kv_state = self.attend(q, k, v, state)
        new_state.update(kv_state)
        new_state["pos"] = pos + l
        o = o.transpose(1, 2).reshape(b, l, self.num_heads * hd)
        return self.out_proj(o), new_state

    def attend(self, q: Tensor, k: Tensor, v: Tensor, state: dict) -> tuple[Tensor, dict]:
        """q: (b, h, l, d) new queries; k, v: cached + new keys. Returns output and the cache to keep."""
        w = self.window
        o = ops.window_attention(q, k, v, window=w)
        keep = k.shape[2] if w is None else min(k.shape[2], w - 1)
        return o, {"k": k[:, :, k.shape[2] - keep:], "v": v[:, :, v.shape[2] - keep:]}
