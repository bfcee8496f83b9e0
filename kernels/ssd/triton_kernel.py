"""Chunked SSD scan (Mamba-2) in Triton: forward and backward, initial state in, final state out.

Per (batch, head) and chunk of Q tokens, with a_t = dt_t A and Acum its within-chunk cumulative sum,
L[l, s] = exp(Acum_l - Acum_s) for s <= l (else 0), e_s = exp(Acum_{Q-1} - Acum_s):
  y_l   = sum_s (C_l . B_s) L[l, s] dt_s x_s  +  exp(Acum_l) H_c C_l  +  D x_l     (chunk_scan kernel)
  S_c   = sum_s e_s dt_s x_s B_s^T                                                (chunk_state kernel)
  H_c+1 = exp(Acum_{Q-1}) H_c + S_c,  H_0 = initial state, final state = H_last   (state_passing kernel)
Backward runs the same three pieces in reverse (see `_chunk_bwd`); the within-chunk cumsum of a and its
reverse cumsum in backward stay in torch (tiny). Tokens past the sequence end load dt = 0, which neither
decays nor writes the state, so any length works without padding the inputs.

Every kernel computes in fp32 and holds a whole chunk (BLOCK_Q) and whole head/state dims in one program;
that suits chunk sizes up to 128 and d_state/headdim up to 128. Tested on CPU under TRITON_INTERPRET=1.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot needs every dim >= 16


@triton.jit
def _chunk_state_fwd(
    x_ptr, b_ptr, dt_ptr, acum_ptr, out_ptr,  # out: (b, c, h, p, n) each chunk's own state contribution
    L, H, P, N, Q, HEADS_PER_GROUP,
    sx_b, sx_l, sx_h, sx_p, sb_b, sb_l, sb_g, sb_n, sdt_b, sdt_l, sdt_h,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    c, bh = tl.program_id(0), tl.program_id(1)
    bi, h = bh // H, bh % H
    g = h // HEADS_PER_GROUP
    n_chunks = tl.cdiv(L, Q)
    iq, ip, jn = tl.arange(0, BLOCK_Q), tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
    t = c * Q + iq
    valid = (iq < Q) & (t < L)
    acum_base = acum_ptr + (bh * n_chunks + c) * Q
    a = tl.load(acum_base + iq, mask=iq < Q, other=0.0)
    a_last = tl.load(acum_base + Q - 1)
    dt = tl.load(dt_ptr + bi * sdt_b + t * sdt_l + h * sdt_h, mask=valid, other=0.0).to(tl.float32)
    w = tl.where(valid, tl.exp(a_last - a) * dt, 0.0)  # (BQ,) decay to chunk end times dt
    x = tl.load(x_ptr + bi * sx_b + t[:, None] * sx_l + h * sx_h + ip[None, :] * sx_p,
                mask=valid[:, None] & (ip[None, :] < P), other=0.0).to(tl.float32)  # (BQ, BP)
    bm = tl.load(b_ptr + bi * sb_b + t[:, None] * sb_l + g * sb_g + jn[None, :] * sb_n,
                 mask=valid[:, None] & (jn[None, :] < N), other=0.0).to(tl.float32)  # (BQ, BN)
    s = tl.dot(tl.trans(x * w[:, None]), bm)  # (BP, BN)
    out = out_ptr + ((bi * n_chunks + c) * H + h) * P * N
    tl.store(out + ip[:, None] * N + jn[None, :], s, mask=(ip[:, None] < P) & (jn[None, :] < N))


@triton.jit
def _state_passing_fwd(
    chunk_ptr, acum_ptr, init_ptr, states_ptr, final_ptr,  # chunk/states: (b, c, h, p*n); init/final: (b, h, p*n)
    H, PN, Q, n_chunks, HAS_INIT: tl.constexpr, BLOCK: tl.constexpr,
):
    pid, bh = tl.program_id(0), tl.program_id(1)
    bi, h = bh // H, bh % H
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < PN
    if HAS_INIT:
        s = tl.load(init_ptr + bh * PN + offs, mask=m, other=0.0).to(tl.float32)
    else:
        s = tl.zeros([BLOCK], dtype=tl.float32)
    for c in range(n_chunks):
        idx = ((bi * n_chunks + c) * H + h) * PN + offs
        tl.store(states_ptr + idx, s, mask=m)  # state entering chunk c
        decay = tl.exp(tl.load(acum_ptr + (bh * n_chunks + c) * Q + Q - 1))
        s = decay * s + tl.load(chunk_ptr + idx, mask=m, other=0.0)
    tl.store(final_ptr + bh * PN + offs, s, mask=m)


@triton.jit
def _chunk_scan_fwd(
    x_ptr, b_ptr, c_ptr, dt_ptr, acum_ptr, states_ptr, d_ptr, y_ptr,  # y: (b, l, h, p) contiguous
    L, H, P, N, Q, HEADS_PER_GROUP,
    sx_b, sx_l, sx_h, sx_p, sb_b, sb_l, sb_g, sb_n, sc_b, sc_l, sc_g, sc_n, sdt_b, sdt_l, sdt_h,
    HAS_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    c, bh = tl.program_id(0), tl.program_id(1)
    bi, h = bh // H, bh % H
    g = h // HEADS_PER_GROUP
    n_chunks = tl.cdiv(L, Q)
    iq, ip, jn = tl.arange(0, BLOCK_Q), tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
    t = c * Q + iq
    valid = (iq < Q) & (t < L)
    a = tl.load(acum_ptr + (bh * n_chunks + c) * Q + iq, mask=iq < Q, other=0.0)
    dt = tl.load(dt_ptr + bi * sdt_b + t * sdt_l + h * sdt_h, mask=valid, other=0.0).to(tl.float32)
    pm, nm = valid[:, None] & (ip[None, :] < P), valid[:, None] & (jn[None, :] < N)
    x = tl.load(x_ptr + bi * sx_b + t[:, None] * sx_l + h * sx_h + ip[None, :] * sx_p, mask=pm, other=0.0)
    x = x.to(tl.float32)
    bm = tl.load(b_ptr + bi * sb_b + t[:, None] * sb_l + g * sb_g + jn[None, :] * sb_n, mask=nm, other=0.0)
    cm = tl.load(c_ptr + bi * sc_b + t[:, None] * sc_l + g * sc_g + jn[None, :] * sc_n, mask=nm, other=0.0)
    bm, cm = bm.to(tl.float32), cm.to(tl.float32)
    causal = iq[None, :] <= iq[:, None]
    decay = tl.exp(tl.where(causal, a[:, None] - a[None, :], float("-inf")))  # (BQ, BQ) L[l, s]
    m = tl.dot(cm, tl.trans(bm)) * decay * dt[None, :]
    y = tl.dot(m, x)  # (BQ, BP) within-chunk part
    st = tl.load(states_ptr + ((bi * n_chunks + c) * H + h) * P * N + ip[:, None] * N + jn[None, :],
                 mask=(ip[:, None] < P) & (jn[None, :] < N), other=0.0)  # (BP, BN) state entering the chunk
    y += tl.exp(a)[:, None] * tl.dot(cm, tl.trans(st))
    if HAS_D:
        y += tl.load(d_ptr + h).to(tl.float32) * x
    tl.store(y_ptr + ((bi * L + t[:, None]) * H + h) * P + ip[None, :], y.to(y_ptr.dtype.element_ty), mask=pm)


@triton.jit
def _chunk_dstates_bwd(
    dy_ptr, c_ptr, acum_ptr, out_ptr,  # dy: (b, l, h, p) contiguous; out: (b, c, h, p, n)
    L, H, P, N, Q, HEADS_PER_GROUP, sc_b, sc_l, sc_g, sc_n,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Gradient w.r.t. the state entering chunk c through this chunk's outputs: (dy * exp(Acum))^T C."""
    c, bh = tl.program_id(0), tl.program_id(1)
    bi, h = bh // H, bh % H
    g = h // HEADS_PER_GROUP
    n_chunks = tl.cdiv(L, Q)
    iq, ip, jn = tl.arange(0, BLOCK_Q), tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
    t = c * Q + iq
    valid = (iq < Q) & (t < L)
    a = tl.load(acum_ptr + (bh * n_chunks + c) * Q + iq, mask=iq < Q, other=0.0)
    dy = tl.load(dy_ptr + ((bi * L + t[:, None]) * H + h) * P + ip[None, :],
                 mask=valid[:, None] & (ip[None, :] < P), other=0.0).to(tl.float32)
    cm = tl.load(c_ptr + bi * sc_b + t[:, None] * sc_l + g * sc_g + jn[None, :] * sc_n,
                 mask=valid[:, None] & (jn[None, :] < N), other=0.0).to(tl.float32)
    ds = tl.dot(tl.trans(dy * tl.exp(a)[:, None]), cm)  # (BP, BN)
    out = out_ptr + ((bi * n_chunks + c) * H + h) * P * N
    tl.store(out + ip[:, None] * N + jn[None, :], ds, mask=(ip[:, None] < P) & (jn[None, :] < N))


@triton.jit
def _state_passing_bwd(
    dinter_ptr, states_ptr, acum_ptr, dfinal_ptr, dchunk_ptr, dinit_ptr, ddecay_ptr,
    H, PN, Q, n_chunks, n_blocks, HAS_DFINAL: tl.constexpr, BLOCK: tl.constexpr,
):
    """Walks chunks backwards. G = gradient w.r.t. the state leaving chunk c (= entering c+1):
    dS_c = G;  d(decay_c) = <G, H_c>;  gradient w.r.t. H_c = dinter_c + decay_c G."""
    pid, bh = tl.program_id(0), tl.program_id(1)
    bi, h = bh // H, bh % H
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < PN
    if HAS_DFINAL:
        gr = tl.load(dfinal_ptr + bh * PN + offs, mask=m, other=0.0).to(tl.float32)
    else:
        gr = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        idx = ((bi * n_chunks + c) * H + h) * PN + offs
        tl.store(dchunk_ptr + idx, gr, mask=m)
        st = tl.load(states_ptr + idx, mask=m, other=0.0)
        # partial sums over this program's slice of (p, n); summed over slices in torch
        tl.store(ddecay_ptr + (bh * n_chunks + c) * n_blocks + pid, tl.sum(gr * st, axis=0))
        decay = tl.exp(tl.load(acum_ptr + (bh * n_chunks + c) * Q + Q - 1))
        gr = tl.load(dinter_ptr + idx, mask=m, other=0.0) + decay * gr
    tl.store(dinit_ptr + bh * PN + offs, gr, mask=m)


@triton.jit
def _chunk_bwd(
    x_ptr, b_ptr, c_ptr, dt_ptr, acum_ptr, states_ptr, dchunk_ptr, dy_ptr, d_ptr,
    dx_ptr, ddt_ptr, db_ptr, dc_ptr, dacum_ptr, dd_ptr,
    L, H, P, N, Q, HEADS_PER_GROUP,
    sx_b, sx_l, sx_h, sx_p, sb_b, sb_l, sb_g, sb_n, sc_b, sc_l, sc_g, sc_n, sdt_b, sdt_l, sdt_h,
    HAS_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """All per-token gradients of one chunk. Outputs: dx (b,l,h,p); ddt without the decay term (b,l,h);
    dB, dC per head (b,l,h,n) (summed over each group's heads in torch); dAcum (b,h,c,Q); dD partial (b,h,c)."""
    c, bh = tl.program_id(0), tl.program_id(1)
    bi, h = bh // H, bh % H
    g = h // HEADS_PER_GROUP
    n_chunks = tl.cdiv(L, Q)
    iq, ip, jn = tl.arange(0, BLOCK_Q), tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
    t = c * Q + iq
    valid = (iq < Q) & (t < L)
    pm, nm = valid[:, None] & (ip[None, :] < P), valid[:, None] & (jn[None, :] < N)
    acum_base = acum_ptr + (bh * n_chunks + c) * Q
    a = tl.load(acum_base + iq, mask=iq < Q, other=0.0)
    a_last = tl.load(acum_base + Q - 1)
    dt = tl.load(dt_ptr + bi * sdt_b + t * sdt_l + h * sdt_h, mask=valid, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + bi * sx_b + t[:, None] * sx_l + h * sx_h + ip[None, :] * sx_p, mask=pm, other=0.0)
    x = x.to(tl.float32)
    bm = tl.load(b_ptr + bi * sb_b + t[:, None] * sb_l + g * sb_g + jn[None, :] * sb_n, mask=nm, other=0.0)
    cm = tl.load(c_ptr + bi * sc_b + t[:, None] * sc_l + g * sc_g + jn[None, :] * sc_n, mask=nm, other=0.0)
    bm, cm = bm.to(tl.float32), cm.to(tl.float32)
    y_off = ((bi * L + t[:, None]) * H + h) * P + ip[None, :]
    dy = tl.load(dy_ptr + y_off, mask=pm, other=0.0).to(tl.float32)
    st_off = ((bi * n_chunks + c) * H + h) * P * N + ip[:, None] * N + jn[None, :]
    st_m = (ip[:, None] < P) & (jn[None, :] < N)
    st = tl.load(states_ptr + st_off, mask=st_m, other=0.0)  # (BP, BN) state entering the chunk
    dst = tl.load(dchunk_ptr + st_off, mask=st_m, other=0.0)  # (BP, BN) gradient w.r.t. this chunk's S_c

    causal = iq[None, :] <= iq[:, None]
    decay = tl.exp(tl.where(causal, a[:, None] - a[None, :], float("-inf")))  # L[l, s]
    e = tl.where(valid, tl.exp(a_last - a), 0.0)  # (BQ,) decay from s to the chunk end
    ea = tl.exp(a)
    cb = tl.dot(cm, tl.trans(bm))  # (l, s)
    pdx = tl.dot(dy, tl.trans(x))  # (l, s): dy_l . x_s
    # gradient w.r.t. X_s = dt_s x_s: within-chunk outputs and the chunk's own state contribution
    b_dst = tl.dot(bm, tl.trans(dst))  # (BQ, BP): dS_c B_s
    d_big_x = tl.dot(tl.trans(cb * decay), dy) + e[:, None] * b_dst
    dx = dt[:, None] * d_big_x
    if HAS_D:
        dx += tl.load(d_ptr + h).to(tl.float32) * dy
    tl.store(dx_ptr + y_off, dx, mask=pm)
    tl.store(ddt_ptr + (bi * L + t) * H + h, tl.sum(x * d_big_x, axis=1), mask=valid)

    pl = pdx * decay * dt[None, :]  # (l, s)
    dc = tl.dot(pl, bm) + ea[:, None] * tl.dot(dy, st)
    db = tl.dot(tl.trans(pl), cm) + (e * dt)[:, None] * tl.dot(x, dst)
    n_off = ((bi * L + t[:, None]) * H + h) * N + jn[None, :]
    tl.store(dc_ptr + n_off, dc, mask=nm)
    tl.store(db_ptr + n_off, db, mask=nm)

    # gradient w.r.t. Acum: through L (+ at l, - at s), exp(Acum_l) on the incoming state, and e_s
    w = pl * cb
    dacum = tl.sum(w, axis=1) - tl.sum(w, axis=0)
    dacum += ea * tl.sum(dy * tl.dot(cm, tl.trans(st)), axis=1)
    te = e * dt * tl.sum(x * b_dst, axis=1)
    dacum -= te
    dacum += tl.where(iq == Q - 1, tl.sum(te, axis=0), 0.0)
    tl.store(dacum_ptr + (bh * n_chunks + c) * Q + iq, dacum, mask=iq < Q)
    if HAS_D:
        tl.store(dd_ptr + bh * n_chunks + c, tl.sum(tl.sum(dy * x, axis=1), axis=0))


def _strides(t: Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def _chunk_cumsum(dt: Tensor, A: Tensor, q: int) -> Tensor:
    """(b, l, h) -> within-chunk cumsum of dt*A, (b, h, c, q) fp32; the tail is padded with 0 (no decay)."""
    b, l, h = dt.shape
    pad = (-l) % q
    a = (dt.float() * A.float()).transpose(1, 2)  # (b, h, l)
    a = torch.nn.functional.pad(a, (0, pad))
    return a.reshape(b, h, -1, q).cumsum(-1).contiguous()


class _SSDChunkScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, initial_state, chunk_size):
        b, l, h, p = x.shape
        g, n = B.shape[2], B.shape[3]
        q = min(chunk_size, l)
        nc = triton.cdiv(l, q)
        acum = _chunk_cumsum(dt, A, q)
        blocks = dict(BLOCK_Q=_block(q), BLOCK_P=_block(p), BLOCK_N=_block(n))
        dims = (l, h, p, n, q, h // g)
        f32 = dict(device=x.device, dtype=torch.float32)
        chunk_states = torch.empty(b, nc, h, p, n, **f32)
        _chunk_state_fwd[(nc, b * h)](x, B, dt, acum, chunk_states, *dims, *_strides(x), *_strides(B),
                                      *_strides(dt), **blocks)
        states = torch.empty_like(chunk_states)
        final = torch.empty(b, h, p, n, **f32)
        init = initial_state.float().contiguous() if initial_state is not None else None
        block = min(1024, triton.next_power_of_2(p * n))
        _state_passing_fwd[(triton.cdiv(p * n, block), b * h)](
            chunk_states, acum, init, states, final, h, p * n, q, nc, HAS_INIT=init is not None, BLOCK=block)
        y = torch.empty(b, l, h, p, device=x.device, dtype=x.dtype)
        _chunk_scan_fwd[(nc, b * h)](x, B, C, dt, acum, states, D, y, *dims, *_strides(x), *_strides(B),
                                     *_strides(C), *_strides(dt), HAS_D=D is not None, **blocks)
        ctx.save_for_backward(x, dt, A, B, C, D, acum, states)
        ctx.has_init, ctx.q = initial_state is not None, q
        ctx.init_dtype = initial_state.dtype if initial_state is not None else None
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, acum, states = ctx.saved_tensors
        b, l, h, p = x.shape
        g, n, q = B.shape[2], B.shape[3], ctx.q
        nc = acum.shape[2]
        blocks = dict(BLOCK_Q=_block(q), BLOCK_P=_block(p), BLOCK_N=_block(n))
        dims = (l, h, p, n, q, h // g)
        f32 = dict(device=x.device, dtype=torch.float32)
        dy = torch.zeros_like(x) if dy is None else dy.contiguous()
        dinter = torch.empty(b, nc, h, p, n, **f32)
        _chunk_dstates_bwd[(nc, b * h)](dy, C, acum, dinter, *dims, *_strides(C), **blocks)
        block = min(1024, triton.next_power_of_2(p * n))
        n_blocks = triton.cdiv(p * n, block)
        dchunk, dinit = torch.empty_like(dinter), torch.empty(b, h, p, n, **f32)
        ddecay = torch.empty(b, h, nc, n_blocks, **f32)
        dfinal = dfinal.float().contiguous() if dfinal is not None else None
        _state_passing_bwd[(n_blocks, b * h)](dinter, states, acum, dfinal, dchunk, dinit, ddecay, h, p * n, q, nc,
                                              n_blocks, HAS_DFINAL=dfinal is not None, BLOCK=block)
        dx = torch.empty(b, l, h, p, **f32)
        ddt = torch.empty(b, l, h, **f32)
        db_h, dc_h = torch.empty(b, l, h, n, **f32), torch.empty(b, l, h, n, **f32)
        dacum = torch.empty(b, h, nc, q, **f32)
        dd = torch.empty(b, h, nc, **f32)
        _chunk_bwd[(nc, b * h)](x, B, C, dt, acum, states, dchunk, dy, D, dx, ddt, db_h, dc_h, dacum, dd, *dims,
                                *_strides(x), *_strides(B), *_strides(C), *_strides(dt), HAS_D=D is not None,
                                **blocks)
        # chunk decay exp(Acum_{Q-1}) feeds the state recurrence; then Acum -> a by a reverse cumsum
        dacum[..., -1] += torch.exp(acum[..., -1]) * ddecay.sum(-1)
        da = dacum.flip(-1).cumsum(-1).flip(-1).reshape(b, h, nc * q)[:, :, :l].transpose(1, 2)  # (b, l, h)
        ddt = ddt + da * A.float()
        dA = (da * dt.float()).sum((0, 1))
        dB = db_h.view(b, l, g, h // g, n).sum(3)
        dC = dc_h.view(b, l, g, h // g, n).sum(3)
        dD = dd.sum((0, 2)).to(D.dtype) if D is not None else None
        dinit = dinit.to(ctx.init_dtype) if ctx.has_init else None
        return (dx.to(x.dtype), ddt.to(dt.dtype), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), dD, dinit, None)


def ssd_scan_triton(
    x: Tensor,  # (b, l, h, p)
    dt: Tensor,  # (b, l, h), already softplus'd and clamped
    A: Tensor,  # (h,), negative
    B: Tensor,  # (b, l, g, n)
    C: Tensor,  # (b, l, g, n)
    chunk_size: int,
    D: Optional[Tensor] = None,  # (h,)
    initial_state: Optional[Tensor] = None,  # (b, h, p, n)
) -> tuple[Tensor, Tensor]:
    """Same contract as ssd_scan_torch (torch_ref.py): y (b, l, h, p) in x's dtype, final state fp32."""
    return _SSDChunkScan.apply(x, dt, A, B, C, D, initial_state, chunk_size)
