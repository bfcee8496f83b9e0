"""Attention mixer with mamba_ssm's `MHA` parameter names (fused qkv `in_proj`, `out_proj`, optional
depthwise `conv1d` over qkv, optional rotary on the first `rotary_emb_dim` dims of each head).

Kinds: `full` (causal), `swa` (causal sliding window of `window` keys, itself included), `s2` (S2Attention
below: LongLoRA's shifted sparse attention in training, full in eval); `se_attn` lives in se_attention.py.
Streaming state: {"k", "v": (b, hkv, cached, head_dim) after rotary, "pos": tokens seen, "conv": (b, d_conv-1,
qkv_dim) with d_conv > 0}; full attention caches everything, swa the last window-1 keys. `zero_state` builds the
empty cache.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridlm import ops
from hybridlm.models.config import AttentionConfig
from hybridlm.models.state import device_dtype


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

    def zero_state(self, batch: int, device=None, dtype=None) -> dict:
        """The empty cache of `batch` sequences, which forward treats like None: {"k", "v": (batch, num_heads_kv,
        0, head_dim), "pos": 0} and, with d_conv > 0, "conv": (batch, d_conv-1, qkv_dim) zeros.
        device and dtype default to the parameters'."""
        device, dtype = device_dtype(self, device, dtype)
        kv = (batch, self.num_heads_kv, 0, self.head_dim)
        state = {"k": torch.zeros(kv, device=device, dtype=dtype), "v": torch.zeros(kv, device=device, dtype=dtype),
                 "pos": 0}
        if self.cfg.d_conv > 0:
            state["conv"] = torch.zeros(batch, self.cfg.d_conv - 1, self.qkv_dim, device=device, dtype=dtype)
        return state

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


def _grouped_causal(q: Tensor, k: Tensor, v: Tensor, group: int, shift: int) -> Tensor:
    """Causal attention inside groups of `group` tokens: [0, shift), then [shift + m*group, shift + (m+1)*group).
    q, k, v: (b, h, L, d) -> (b, h, L, d). Pads the sequence so groups are rows of a (n, group) grid."""
    b, h, L, d = q.shape
    front = (group - shift) % group
    n = -(-(front + L) // group)
    back = n * group - front - L
    grid = lambda x: F.pad(x, (0, 0, front, back)).view(b, h, n, group, x.shape[-1])
    if front == 0 and back == 0:
        o = F.scaled_dot_product_attention(grid(q), grid(k), grid(v), is_causal=True)
    else:
        real = torch.zeros(n * group, dtype=torch.bool, device=q.device)
        real[front: front + L] = True
        real = real.view(n, group)
        causal = torch.ones(group, group, dtype=torch.bool, device=q.device).tril()
        # Real queries see real keys only; padding rows see themselves so no softmax row is empty.
        mask = causal & (real[:, None, :] | ~real[:, :, None])  # (n, group, group)
        o = F.scaled_dot_product_attention(grid(q), grid(k), grid(v), attn_mask=mask)
    return o.reshape(b, h, n * group, -1)[:, :, front: front + L]


def shifted_sparse_attention(q: Tensor, k: Tensor, v: Tensor, group_size: int) -> Tensor:
    """LongLoRA's S2-Attn. q, k, v: (b, h, L, d) (kv heads already repeated to h) -> (b, h, L, d).

    Heads [0, h//2) attend causally inside groups [m*G, (m+1)*G); heads [h//2, h) inside groups shifted by G//2.
    LongLoRA's code rolls the second half of the heads by -G/2, runs causal attention per group and rolls back;
    its last rolled group then holds the final G/2 tokens followed by the first G/2, and the causal mask in rolled
    order lets those first tokens attend to the final ones, i.e. to the future. We keep the first G/2 tokens in a
    group of their own instead, so the shifted groups are [0, G/2), [G/2, G/2 + G), ... and nothing leaks."""
    h2 = q.shape[1] // 2
    g = group_size
    o_plain = _grouped_causal(q[:, :h2], k[:, :h2], v[:, :h2], g, 0)
    o_shift = _grouped_causal(q[:, h2:], k[:, h2:], v[:, h2:], g, g // 2)
    return torch.cat([o_plain, o_shift], dim=1)


class S2Attention(Attention):
    """`attn.kind = "s2"`: S2-Attn while training (groups of G = max(1, round(group_ratio * L)) tokens), plain
    full causal attention in eval mode (and so for streaming / generation)."""

    @property
    def window(self) -> Optional[int]:
        return None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, state: dict) -> tuple[Tensor, dict]:
        if not self.training:
            return super().attend(q, k, v, state)
        L = q.shape[2]
        if k.shape[2] != L:
            raise ValueError(f"S2-Attn trains on whole sequences but got {k.shape[2] - L} cached keys: do not pass "
                             "attention state while training an s2 layer (eval mode streams with full attention)")
        rep = self.num_heads // self.num_heads_kv
        group = max(1, round(self.cfg.group_ratio * L))
        o = shifted_sparse_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), group)
        return o, {"k": k, "v": v}
