"""Chunked SSD scan (Mamba-2), pure torch reference, with a hand-written backward.

Per (batch, head) and chunk of Q tokens, with a_t = dt_t A, Acum its within-chunk cumulative sum,
L[l, s] = exp(Acum_l - Acum_s) for s <= l (else 0) and e_s = exp(Acum_{Q-1} - Acum_s):
  y_l   = sum_s (C_l . B_s) L[l, s] dt_s x_s  +  exp(Acum_l) H_c C_l  +  D x_l
  S_c   = sum_s e_s dt_s x_s B_s^T              (the chunk's own contribution to its final state)
  H_c+1 = exp(Acum_{Q-1}) H_c + S_c,   H_0 = initial state, final state = H_last
Within a chunk the scan is a masked (Q x Q) matrix product; across chunks a short loop over chunks (not tokens)
carries the (headdim x d_state) states.

Why a custom autograd.Function: autograd through the einsum formulation saved ~10 (Q x Q)-sized tensors per
layer and ran its products on permuted, non-contiguous layouts. Here the forward saves only the states entering
each chunk, the backward recomputes the rest, and heads that share a B/C group are batched into one matmul
(the heads of a group sit next to each other, so (heads, headdim) flattens into one dimension).
The backward is the same derivation as triton_kernel.py (the Triton kernels).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _chunked(t: Tensor, q: int, pad: int) -> Tensor:
    """(b, l, ...) -> (b, c, q, ...), the tail zero-padded."""
    if pad:
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
    return t.reshape(t.shape[0], -1, q, *t.shape[2:])


def _unchunked(t: Tensor, l: int) -> Tensor:
    """(b, c, q, ...) -> (b, l, ...)."""
    return t.reshape(t.shape[0], -1, *t.shape[3:])[:, :l]


def _exp(t: Tensor) -> Tensor:
    """exp with the argument clamped to [-80, 80]. On CPU, exp producing denormals (arguments below ~-87 in fp32)
    or taking -inf runs 10-100x slower than on normal numbers; values below exp(-80) ~ 2e-35 change nothing.
    Every argument here is a (sum of) dt*A <= 0 except in masked-out positions, so the upper clamp never bites."""
    return torch.exp(t.clamp(-80.0, 80.0))


def _decay(acum: Tensor) -> Tensor:
    """(..., q) -> L (..., q, q): exp(acum_l - acum_s) for s <= l, exactly 0 above the diagonal."""
    q = acum.shape[-1]
    causal = torch.ones(q, q, dtype=torch.bool, device=acum.device).tril()
    return torch.where(causal, _exp(acum[..., :, None] - acum[..., None, :]), 0.0)


def _heads_last(t: Tensor, g: int) -> Tensor:
    """(b, c, h, q, p) -> (b, c, g, q, r*p): the r = h/g heads of a group side by side."""
    b, c, h, q, p = t.shape
    return t.view(b, c, g, h // g, q, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, g, q, h // g * p)


def _heads_first(t: Tensor, h: int) -> Tensor:
    """(b, c, g, q, r*p) -> (b, c, h, q, p), the inverse of _heads_last."""
    b, c, g, q, rp = t.shape
    return t.view(b, c, g, q, h // g, rp * g // h).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, q, rp * g // h)


class _Prep:
    """The chunked fp32 (or fp64) views shared by forward and backward."""

    def __init__(self, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int):
        b, l, h, p = x.shape
        g, n = B.shape[2], B.shape[3]
        self.b, self.l, self.h, self.p, self.g, self.n = b, l, h, p, g, n
        self.f = torch.promote_types(x.dtype, torch.float32)
        q = min(chunk_size, l)
        pad = (-l) % q
        self.q, self.pad, self.c = q, pad, (l + pad) // q
        self.xh = _chunked(x.to(self.f), q, pad).transpose(2, 3)  # (b, c, h, q, p)
        dtc = _chunked(dt.to(self.f), q, pad)  # (b, c, q, h); padding has dt = 0: no decay, no write
        self.dts = dtc.transpose(2, 3)  # (b, c, h, q)
        self.xdt = self.xh * self.dts[..., None]  # X = dt x, what the state accumulates
        self.Bc = _chunked(B.to(self.f), q, pad).transpose(2, 3)  # (b, c, g, q, n)
        self.Cc = _chunked(C.to(self.f), q, pad).transpose(2, 3)
        self.acum = torch.cumsum(self.dts * A.to(self.f)[:, None], dim=-1)  # (b, c, h, q)
        self.L = _decay(self.acum)  # (b, c, h, q, q)
        self.e = _exp(self.acum[..., -1:] - self.acum)  # (b, c, h, q) decay from s to the chunk end
        self.chunk_decay = _exp(self.acum[..., -1])  # (b, c, h)
        self.CB = self.Cc @ self.Bc.transpose(-1, -2)  # (b, c, g, q, q), shared by the group's heads

    def per_head(self, t: Tensor) -> Tensor:
        """(b, c, h, q, q) * CB broadcast over the heads of each group."""
        b, c, h, q = t.shape[:4]
        return (t.view(b, c, self.g, h // self.g, q, q) * self.CB[:, :, :, None]).view(b, c, h, q, q)

    def group_states(self, s: Tensor) -> Tensor:
        """(b, c, h, p, n) -> (b, c, g, r*p, n)."""
        return s.view(self.b, self.c, self.g, self.h // self.g * self.p, self.n)


class _SSDScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, initial_state, chunk_size):
        P = _Prep(x, dt, A, B, C, chunk_size)
        b, c, h, p, n, g = P.b, P.c, P.h, P.p, P.n, P.g
        # 1. within-chunk outputs
        y = P.per_head(P.L) @ P.xdt  # (b, c, h, q, p)
        # 2. each chunk's own state contribution: (e X)^T B, one matmul per group
        xw = _heads_last(P.xdt * P.e[..., None], g)  # (b, c, g, q, r*p)
        S = (xw.transpose(-1, -2) @ P.Bc).view(b, c, h, p, n)
        # 3. carry states across chunks
        states = torch.empty(b, c, h, p, n, dtype=P.f, device=x.device)  # state entering each chunk
        s = initial_state.to(P.f) if initial_state is not None else x.new_zeros(b, h, p, n, dtype=P.f)
        for i in range(c):
            states[:, i] = s
            s = P.chunk_decay[:, i, :, None, None] * s + S[:, i]
        # 4. incoming state -> outputs
        ch = _heads_first(P.Cc @ P.group_states(states).transpose(-1, -2), h)  # (b, c, h, q, p)
        y = y + _exp(P.acum)[..., None] * ch
        y = _unchunked(y.transpose(2, 3), P.l)  # (b, l, h, p)
        if D is not None:
            y = y + x.to(P.f) * D.to(P.f)[:, None]
        ctx.save_for_backward(x, dt, A, B, C, D, initial_state, states)
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)
        return y.to(x.dtype), s

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, initial_state, states = ctx.saved_tensors
        P = _Prep(x, dt, A, B, C, ctx.chunk_size)
        b, c, h, p, n, g, q, l = P.b, P.c, P.h, P.p, P.n, P.g, P.q, P.l
        if dy is None:
            dy = torch.zeros_like(x)
        dyh = _chunked(dy.to(P.f), q, P.pad).transpose(2, 3)  # (b, c, h, q, p)
        ea = _exp(P.acum)  # (b, c, h, q)
        dye = _heads_last(dyh * ea[..., None], g)  # (b, c, g, q, r*p)
        states_g = P.group_states(states)  # (b, c, g, r*p, n)

        # gradient w.r.t. the state entering each chunk, through that chunk's outputs
        d_inter = (dye.transpose(-1, -2) @ P.Cc).view(b, c, h, p, n)
        # walk the chunks backwards: grad = gradient w.r.t. the state leaving chunk i
        d_chunk = torch.empty_like(d_inter)  # gradient w.r.t. S_i
        d_decay = torch.empty(b, c, h, dtype=P.f, device=x.device)
        grad = dfinal.to(P.f) if dfinal is not None else x.new_zeros(b, h, p, n, dtype=P.f)
        for i in reversed(range(c)):
            d_chunk[:, i] = grad
            d_decay[:, i] = (grad * states[:, i]).sum((-1, -2))
            grad = d_inter[:, i] + P.chunk_decay[:, i, :, None, None] * grad
        d_init = grad

        # gradient w.r.t. X = dt * x: within-chunk outputs and the chunk's own state contribution
        b_dchunk = _heads_first(P.Bc @ P.group_states(d_chunk).transpose(-1, -2), h)  # (b, c, h, q, p)
        lcb = P.per_head(P.L)  # (b, c, h, l, s) = L * (C_l . B_s)
        d_big_x = lcb.transpose(-1, -2) @ dyh + P.e[..., None] * b_dchunk
        dx = _unchunked((P.dts[..., None] * d_big_x).transpose(2, 3), l)
        ddt = (P.xh * d_big_x).sum(-1)  # (b, c, h, q), the direct part

        # dB, dC: the (Q x Q) weights summed over the heads of a group first
        dy_x = dyh @ P.xdt.transpose(-1, -2)  # (b, c, h, l, s): dy_l . X_s
        pl_g = (dy_x * P.L).view(b, c, g, h // g, q, q).sum(3)
        dC = pl_g @ P.Bc + dye @ states_g  # (b, c, g, q, n)
        xe = _heads_last(P.xdt * P.e[..., None], g)
        dB = pl_g.transpose(-1, -2) @ P.Cc + xe @ P.group_states(d_chunk)

        # gradient w.r.t. Acum: through L (+ at l, - at s), exp(Acum_l) on the incoming state, e_s, chunk decay
        w = dy_x * lcb
        d_acum = w.sum(-1) - w.sum(-2)
        ch = _heads_first(P.Cc @ states_g.transpose(-1, -2), h)
        d_acum = d_acum + ea * (dyh * ch).sum(-1)
        te = P.e * (P.xdt * b_dchunk).sum(-1)
        d_acum = d_acum - te
        d_acum[..., -1] += te.sum(-1) + P.chunk_decay * d_decay
        da = d_acum.flip(-1).cumsum(-1).flip(-1)  # Acum -> a: reverse cumsum within the chunk
        ddt = ddt + da * A.to(P.f)[:, None]
        dA = (da * P.dts).sum((0, 1, 3))

        dD = None
        if D is not None:
            dx = dx + dy.to(P.f) * D.to(P.f)[:, None]
            dD = (dy.to(P.f) * x.to(P.f)).sum((0, 1, 3)).to(D.dtype)
        return (dx.to(x.dtype), _unchunked(ddt.transpose(2, 3), l).to(dt.dtype), dA.to(A.dtype),
                _unchunked(dB.transpose(2, 3), l).to(B.dtype), _unchunked(dC.transpose(2, 3), l).to(C.dtype), dD,
                d_init.to(initial_state.dtype) if initial_state is not None else None, None)


def ssd_scan_torch(
    x: Tensor,  # (b, l, h, p)
    dt: Tensor,  # (b, l, h), already softplus'd and clamped
    A: Tensor,  # (h,), negative
    B: Tensor,  # (b, l, g, n)
    C: Tensor,  # (b, l, g, n)
    chunk_size: int,
    D: Optional[Tensor] = None,  # (h,)
    initial_state: Optional[Tensor] = None,  # (b, h, p, n)
) -> tuple[Tensor, Tensor]:
    """Returns y (b, l, h, p) and the final state (b, h, p, n).

    Recurrence: h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T,  y_t = C_t h_t + D x_t.
    Computed in fp32 (fp64 for fp64 inputs). Any length works: the tail is padded with dt = 0, which neither
    decays nor writes the state, so the final state is exact.
    """
    return _SSDScan.apply(x, dt, A, B, C, D, initial_state, chunk_size)
