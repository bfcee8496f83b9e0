"""Chunked SSD scan (Mamba-2), pure torch reference, with a hand-written backward.

Per (batch, head) and chunk of Q tokens, with a_t = dt_t A, Acum its within-chunk cumulative sum,
L[l, s] = exp(Acum_l - Acum_s) for s <= l (else 0) and e_s = exp(Acum_{Q-1} - Acum_s):
  y_l   = sum_s (C_l . B_s) L[l, s] dt_s x_s  +  exp(Acum_l) H_c C_l  +  D x_l
  S_c   = sum_s e_s dt_s x_s B_s^T              (the chunk's own contribution to its final state)
  H_c+1 = exp(Acum_{Q-1}) H_c + S_c,   H_0 = initial state, final state = H_last
Within a chunk the scan is a masked (Q x Q) matrix product.

Chunks are processed in groups of a bounded size (`_group_size`), in order (backward: in reverse order), with the
state carried from group to group. Every tensor of a group is then small enough to stay in cache, and time is
linear in length: with the whole sequence at once, the (chunks, heads, Q, Q) tensors of a long sequence (hundreds
of MB at 64K tokens) made every elementwise pass a trip to main memory, and the time grew faster than the length.
Inside a group, the states entering its G chunks come from one (G+1 x G+1) decay matrix product (`_pass_states`)
instead of a Python loop over chunks.

Why a custom autograd.Function: autograd through the einsum formulation saved ~10 (Q x Q)-sized tensors per
layer and ran its products on permuted, non-contiguous layouts. Here the forward saves only the states entering
each chunk, the backward recomputes the rest group by group, and heads that share a B/C group are batched into
one matmul (the heads of a group sit next to each other, so (heads, headdim) flattens into one dimension).
The backward is the same derivation as triton_kernel.py (the Triton kernels).

Precision: everything inside runs in fp32 (fp64 for fp64 inputs) with autocast off, whatever the input dtype:
the cumulative sums, decays and the carried state need it, and the op's matmuls are too small for bf16 to pay.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# Elements of the group's (b, G, h, Q, Q) tensors: 2^18 fp32 = 1 MiB keeps the working set of a group in L2.
_GROUP_ELEMS = 1 << 18


def _group_size(b: int, h: int, q: int, c: int) -> int:
    return max(1, min(c, _GROUP_ELEMS // (b * h * q * q)))


def _chunked(t: Tensor, q: int, pad: int) -> Tensor:
    """(b, l, ...) -> (b, c, q, ...), the tail zero-padded."""
    if pad:
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
    return t.reshape(t.shape[0], -1, q, *t.shape[2:])


def _exp(t: Tensor) -> Tensor:
    """exp with the argument clamped to [-80, 80]. On CPU, exp producing denormals (arguments below ~-87 in fp32)
    or taking -inf runs 10-100x slower than on normal numbers; values below exp(-80) ~ 2e-35 change nothing.
    Every argument here is a (sum of) dt*A <= 0 except in masked-out positions, so the upper clamp never bites."""
    return torch.exp(t.clamp(-80.0, 80.0))


def _decay(acum: Tensor) -> Tensor:
    """(..., q) -> L (..., q, q): exp(acum_l - acum_s) for s <= l, exactly 0 above the diagonal."""
    seg = acum[..., :, None] - acum[..., None, :]
    return seg.clamp_(-80.0, 0.0).exp_().tril_()  # above the diagonal seg >= 0: exp(0) = 1, then zeroed


def _heads_last(t: Tensor, g: int) -> Tensor:
    """(b, c, h, q, p) -> (b, c, g, q, r*p): the r = h/g heads of a group side by side."""
    b, c, h, q, p = t.shape
    return t.view(b, c, g, h // g, q, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, g, q, h // g * p)


def _heads_first(t: Tensor, h: int) -> Tensor:
    """(b, c, g, q, r*p) -> (b, c, h, q, p), the inverse of _heads_last."""
    b, c, g, q, rp = t.shape
    return t.view(b, c, g, q, h // g, rp * g // h).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, q, rp * g // h)


def _pass_matrix(chunk_log: Tensor) -> Tensor:
    """chunk_log (b, G, h), each chunk's log decay Acum_{Q-1} -> M (b, h, G+1, G+1) with
    [H_s, ..., H_{s+G-1}, H_{s+G}] = M @ [H_s, S_s, ..., S_{s+G-1}] (states entering each chunk of the group, then
    the one leaving it): M[i, j] = exp(sum of the log decays of chunks j .. i-1 of the group) for j <= i."""
    cs = F.pad(torch.cumsum(chunk_log, dim=1), (0, 0, 1, 0))  # (b, G+1, h), cs[i] = sum of the first i
    return _decay(cs.transpose(1, 2))


def _pass_states(carry: Tensor, S: Tensor, M: Tensor) -> tuple[Tensor, Tensor]:
    """carry (b, h, p, n) entering the group, S (b, G, h, p, n) -> (states entering each chunk (b, G, h, p, n),
    state leaving the group (b, h, p, n))."""
    b, G, h, p, n = S.shape
    inp = torch.cat([carry[:, None], S], dim=1).view(b, G + 1, h, p * n).transpose(1, 2)  # (b, h, G+1, p*n)
    out = (M @ inp).view(b, h, G + 1, p, n).transpose(1, 2)  # (b, G+1, h, p, n)
    return out[:, :G], out[:, G]


def _unpass_states(d_states: Tensor, d_carry: Tensor, M: Tensor) -> tuple[Tensor, Tensor]:
    """The adjoint of _pass_states: gradients w.r.t. the states entering each chunk (b, G, h, p, n) and the state
    leaving the group (b, h, p, n) -> (w.r.t. the state leaving each chunk = its S (b, G, h, p, n), w.r.t. the
    state entering the group (b, h, p, n))."""
    b, G, h, p, n = d_states.shape
    g_out = torch.cat([d_states, d_carry[:, None]], dim=1).view(b, G + 1, h, p * n).transpose(1, 2)
    g_in = (M.transpose(-1, -2) @ g_out).view(b, h, G + 1, p, n).transpose(1, 2)  # (b, G+1, h, p, n)
    return g_in[:, 1:], g_in[:, 0]


class _Group:
    """The fp32 (or fp64) tensors of chunks [s, e), shared by forward and backward. Inputs are the chunked
    (b, c, q, ...) views of the op's arguments."""

    def __init__(self, xc: Tensor, dtc: Tensor, A: Tensor, Bc: Tensor, Cc: Tensor, s: int, e: int, f: torch.dtype):
        self.f = f
        b, _, q, h, p = xc.shape
        g, n = Bc.shape[3], Bc.shape[4]
        self.b, self.G, self.q, self.h, self.p, self.g, self.n = b, e - s, q, h, p, g, n
        self.xh = xc[:, s:e].to(f).transpose(2, 3)  # (b, G, h, q, p)
        self.dts = dtc[:, s:e].to(f).transpose(2, 3)  # (b, G, h, q); padding has dt = 0: no decay, no write
        self.xdt = self.xh * self.dts[..., None]  # X = dt x, what the state accumulates
        self.Bc = Bc[:, s:e].to(f).transpose(2, 3).contiguous()  # (b, G, g, q, n)
        self.Cc = Cc[:, s:e].to(f).transpose(2, 3).contiguous()
        self.acum = torch.cumsum(self.dts * A.to(f)[:, None], dim=-1)  # (b, G, h, q)
        self.L = _decay(self.acum)  # (b, G, h, q, q)
        self.e = _exp(self.acum[..., -1:] - self.acum)  # (b, G, h, q) decay from s to the chunk end
        self.chunk_decay = _exp(self.acum[..., -1])  # (b, G, h)
        self.M = _pass_matrix(self.acum[..., -1])  # (b, h, G+1, G+1)
        self.CB = self.Cc @ self.Bc.transpose(-1, -2)  # (b, G, g, q, q), shared by the group's heads

    def per_head(self, t: Tensor) -> Tensor:
        """(b, G, h, q, q) * CB broadcast over the heads of each group."""
        b, G, h, q = t.shape[:4]
        return (t.view(b, G, self.g, h // self.g, q, q) * self.CB[:, :, :, None]).view(b, G, h, q, q)

    def group_states(self, s: Tensor) -> Tensor:
        """(b, G, h, p, n) -> (b, G, g, r*p, n)."""
        return s.reshape(self.b, self.G, self.g, self.h // self.g * self.p, self.n)


def _chunk_inputs(x, dt, B, C, chunk_size):
    b, l = x.shape[:2]
    q = min(chunk_size, l)
    pad = (-l) % q
    return q, pad, (l + pad) // q, [_chunked(t, q, pad) for t in (x, dt, B, C)]


class _SSDScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, initial_state, chunk_size):
        with torch.autocast(x.device.type, enabled=False):
            y, final, states = _forward(x, dt, A, B, C, D, initial_state, chunk_size)
        ctx.save_for_backward(x, dt, A, B, C, D, initial_state, states)
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        with torch.autocast(dy.device.type if dy is not None else dfinal.device.type, enabled=False):
            return _backward(ctx, dy, dfinal) + (None,)


def _forward(x, dt, A, B, C, D, initial_state, chunk_size):
    b, l, h, p = x.shape
    n = B.shape[3]
    f = torch.promote_types(x.dtype, torch.float32)
    q, pad, c, (xc, dtc, Bc, Cc) = _chunk_inputs(x, dt, B, C, chunk_size)
    y = torch.empty(b, c, q, h, p, dtype=f, device=x.device)
    states = torch.empty(b, c, h, p, n, dtype=f, device=x.device)  # the state entering each chunk
    carry = initial_state.to(f) if initial_state is not None else x.new_zeros(b, h, p, n, dtype=f)
    G = _group_size(b, h, q, c)
    for s in range(0, c, G):
        P = _Group(xc, dtc, A, Bc, Cc, s, min(c, s + G), f)
        # 1. within-chunk outputs
        yg = P.per_head(P.L) @ P.xdt  # (b, G, h, q, p)
        # 2. each chunk's own state contribution: (e X)^T B, one matmul per group of heads
        xw = _heads_last(P.xdt * P.e[..., None], P.g)  # (b, G, g, q, r*p)
        S = (xw.transpose(-1, -2) @ P.Bc).view(b, P.G, h, p, n)
        # 3. carry states across the group's chunks
        st, carry = _pass_states(carry, S, P.M)
        states[:, s: s + P.G] = st
        # 4. incoming state -> outputs
        ch = _heads_first(P.Cc @ P.group_states(st).transpose(-1, -2), h)  # (b, G, h, q, p)
        y[:, s: s + P.G] = yg.addcmul_(_exp(P.acum)[..., None], ch).transpose(2, 3)
    y = y.view(b, c * q, h, p)[:, :l]
    if D is not None:
        y.addcmul_(x, D.to(f)[:, None])  # in place: a new sequence-sized tensor costs page faults on CPU
    return y.to(x.dtype), carry, states


def _backward(ctx, dy, dfinal):
    x, dt, A, B, C, D, initial_state, states = ctx.saved_tensors
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    f = torch.promote_types(x.dtype, torch.float32)
    q, pad, c, (xc, dtc, Bc, Cc) = _chunk_inputs(x, dt, B, C, ctx.chunk_size)
    dyc = _chunked(dy.to(f) if dy is not None else x.new_zeros(b, l, h, p, dtype=f), q, pad)  # (b, c, q, h, p)
    dx = torch.empty(b, c, q, h, p, dtype=f, device=x.device)
    ddt = torch.empty(b, c, q, h, dtype=f, device=x.device)
    dB = torch.empty(b, c, q, g, n, dtype=f, device=x.device)
    dC = torch.empty(b, c, q, g, n, dtype=f, device=x.device)
    dA = torch.zeros(h, dtype=f, device=x.device)
    Af = A.to(f)
    # gradient w.r.t. the state leaving the current group (walking the groups backwards)
    d_carry = dfinal.to(f) if dfinal is not None else x.new_zeros(b, h, p, n, dtype=f)
    G = _group_size(b, h, q, c)
    for s in reversed(range(0, c, G)):
        P = _Group(xc, dtc, A, Bc, Cc, s, min(c, s + G), f)
        Gs = P.G
        st = states[:, s: s + Gs]  # (b, G, h, p, n)
        dyh = dyc[:, s: s + Gs].transpose(2, 3)  # (b, G, h, q, p)
        ea = _exp(P.acum)  # (b, G, h, q)
        dye = _heads_last(dyh * ea[..., None], g)  # (b, G, g, q, r*p)
        states_g = P.group_states(st)  # (b, G, g, r*p, n)

        # gradient w.r.t. the state entering each chunk, through that chunk's outputs
        d_inter = (dye.transpose(-1, -2) @ P.Cc).view(b, Gs, h, p, n)
        # d_chunk: gradient w.r.t. the state leaving each chunk, i.e. w.r.t. its S
        d_chunk, d_carry = _unpass_states(d_inter, d_carry, P.M)
        d_decay = (d_chunk * st).sum((-1, -2))  # (b, G, h): through H_c+1 = exp(Acum_{Q-1}) H_c + S_c

        # gradient w.r.t. X = dt * x: within-chunk outputs and the chunk's own state contribution
        b_dchunk = _heads_first(P.Bc @ P.group_states(d_chunk).transpose(-1, -2), h)  # (b, G, h, q, p)
        lcb = P.per_head(P.L)  # (b, G, h, l, s) = L * (C_l . B_s)
        d_big_x = lcb.transpose(-1, -2) @ dyh + P.e[..., None] * b_dchunk
        dx[:, s: s + Gs] = (P.dts[..., None] * d_big_x).transpose(2, 3)
        ddt_g = (P.xh * d_big_x).sum(-1)  # (b, G, h, q), the direct part

        # dB, dC: the (Q x Q) weights summed over the heads of a group first
        dy_x = dyh @ P.xdt.transpose(-1, -2)  # (b, G, h, l, s): dy_l . X_s
        pl_g = (dy_x * P.L).view(b, Gs, g, h // g, q, q).sum(3)
        dC[:, s: s + Gs] = (pl_g @ P.Bc + dye @ states_g).transpose(2, 3)  # (b, G, g, q, n)
        xe = _heads_last(P.xdt * P.e[..., None], g)
        dB[:, s: s + Gs] = (pl_g.transpose(-1, -2) @ P.Cc + xe @ P.group_states(d_chunk)).transpose(2, 3)

        # gradient w.r.t. Acum: through L (+ at l, - at s), exp(Acum_l) on the incoming state, e_s, chunk decay
        w = dy_x * lcb
        d_acum = w.sum(-1) - w.sum(-2)
        ch = _heads_first(P.Cc @ states_g.transpose(-1, -2), h)
        d_acum = d_acum + ea * (dyh * ch).sum(-1)
        te = P.e * (P.xdt * b_dchunk).sum(-1)
        d_acum = d_acum - te
        d_acum[..., -1] += te.sum(-1) + P.chunk_decay * d_decay
        da = d_acum.flip(-1).cumsum(-1).flip(-1)  # Acum -> a: reverse cumsum within the chunk
        ddt[:, s: s + Gs] = (ddt_g + da * Af[:, None]).transpose(2, 3)
        dA += (da * P.dts).sum((0, 1, 3))

    unchunk = lambda t: t.view(b, c * q, *t.shape[3:])[:, :l]  # noqa: E731  (b, c, q, ...) -> (b, l, ...)
    dx = unchunk(dx)
    dD = None
    if D is not None:
        dx = dx + dy.to(f) * D.to(f)[:, None] if dy is not None else dx
        dD = (dy.to(f) * x.to(f)).sum((0, 1, 3)).to(D.dtype) if dy is not None else torch.zeros_like(D)
    return (dx.to(x.dtype), unchunk(ddt).to(dt.dtype), dA.to(A.dtype), unchunk(dB).to(B.dtype),
            unchunk(dC).to(C.dtype), dD, d_carry.to(initial_state.dtype) if initial_state is not None else None)


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
