"""Causal sliding-window attention in Triton, flash-attention style: forward and backward.

Tiling: a program owns BLOCK_M queries and streams the key blocks its window touches, keeping a running
max / normaliser (online softmax), so memory is O(L d) and cost O(L (W + BLOCK_M) d) instead of O(L^2 d).
Backward recomputes the probabilities from the saved log-sum-exp: one kernel per query block for dq, one
per key block for dk/dv (looping over the query heads that share the key head, so GQA needs no atomics).

Convention (as torch_ref.py): k/v hold Lk >= Lq positions and the last Lq belong to the queries;
query i sits at key index qi = i + Lk - Lq and sees key j iff j <= qi and (no window or j > qi - window).
The jit helpers `_attend_range`, `_dq_range`, `_dkdv_range` are shared with the span-attention kernels.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor


def attention_blocks(head_dim: int) -> dict[str, int]:
    """Tile sizes of every window/span attention kernel: queries per program (BLOCK_M), keys per inner step
    (BLOCK_N), the head dim padded to a power of two (BLOCK_D). The wrappers and kernels/compile_check.py take
    them from here."""
    return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=max(16, triton.next_power_of_2(head_dim)))


@triton.jit
def _visible(qi, kj, k_hi, window, HAS_WINDOW: tl.constexpr, RETRIEVED: tl.constexpr):
    """(BM, BN) mask over existing keys (< k_hi) and real queries (qi >= 0): the causal window
    (qi - window < kj <= qi), or, for RETRIEVED span-attention blocks, keys strictly before it (kj <= qi - window)."""
    ok = (kj < k_hi)[None, :] & (qi >= 0)[:, None]
    if RETRIEVED:
        ok = ok & (kj[None, :] <= qi[:, None] - window)
    else:
        ok = ok & (kj[None, :] <= qi[:, None])
        if HAS_WINDOW:
            ok = ok & (kj[None, :] > qi[:, None] - window)
    return ok


@triton.jit
def _attend_range(acc, m_i, l_i, q, k_base, v_base, sk_l, sv_l, lo, hi, qi, window, scale, D,
                  HAS_WINDOW: tl.constexpr, RETRIEVED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Online-softmax accumulation of keys [lo, hi) into (acc, m_i, l_i); q (BM, BD) fp32."""
    jd = tl.arange(0, BLOCK_D)
    for start in range(lo, hi, BLOCK_N):
        kj = start + tl.arange(0, BLOCK_N)
        km = (kj < hi)[:, None] & (jd < D)[None, :]
        k = tl.load(k_base + kj[:, None] * sk_l + jd[None, :], mask=km, other=0.0).to(tl.float32)
        v = tl.load(v_base + kj[:, None] * sv_l + jd[None, :], mask=km, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(_visible(qi, kj, hi, window, HAS_WINDOW, RETRIEVED), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _dq_range(dq, q, do, lse, delta, k_base, v_base, sk_l, sv_l, lo, hi, qi, window, scale, D,
              HAS_WINDOW: tl.constexpr, RETRIEVED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dq += sum over keys [lo, hi) of P (dP - delta) k * scale, P recomputed from the saved lse."""
    jd = tl.arange(0, BLOCK_D)
    for start in range(lo, hi, BLOCK_N):
        kj = start + tl.arange(0, BLOCK_N)
        km = (kj < hi)[:, None] & (jd < D)[None, :]
        k = tl.load(k_base + kj[:, None] * sk_l + jd[None, :], mask=km, other=0.0).to(tl.float32)
        v = tl.load(v_base + kj[:, None] * sv_l + jd[None, :], mask=km, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * scale
        p = tl.where(_visible(qi, kj, hi, window, HAS_WINDOW, RETRIEVED), tl.exp(s - lse[:, None]), 0.0)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq += tl.dot(ds, k) * scale
    return dq


@triton.jit
def _dkdv_range(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sq_l, sdo_l, lo, hi, kj, k_hi, q_off,
                window, scale, D, HAS_WINDOW: tl.constexpr, RETRIEVED: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """dk, dv (BN, BD) += contributions of queries [lo, hi) of one head; query i sits at key index i + q_off."""
    jd = tl.arange(0, BLOCK_D)
    for start in range(lo, hi, BLOCK_M):
        i = start + tl.arange(0, BLOCK_M)
        qm = (i < hi)[:, None] & (jd < D)[None, :]
        q = tl.load(q_base + i[:, None] * sq_l + jd[None, :], mask=qm, other=0.0).to(tl.float32)
        do = tl.load(do_base + i[:, None] * sdo_l + jd[None, :], mask=qm, other=0.0).to(tl.float32)
        lse = tl.load(lse_base + i, mask=i < hi, other=0.0)
        delta = tl.load(delta_base + i, mask=i < hi, other=0.0)
        qi = tl.where(i < hi, i + q_off, -1)  # -1 marks padding rows (masked by _visible)
        s = tl.dot(q, tl.trans(k)) * scale
        p = tl.where(_visible(qi, kj, k_hi, window, HAS_WINDOW, RETRIEVED), tl.exp(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p), do)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dk += tl.dot(tl.trans(ds), q) * scale
    return dk, dv


@triton.jit
def _window_range(m0, q_off, lk, window, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr):
    """Keys [lo, hi) that queries m0 .. m0+BLOCK_M-1 can see."""
    hi = tl.minimum(m0 + BLOCK_M + q_off, lk)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(m0 + q_off - window + 1, 0)
    return lo, hi


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, LQ, LK, H, HKV, D, window, scale,
                sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1)
    bi, h = bh // H, bh % H
    hk = h // (H // HKV)
    m0 = pid * BLOCK_M
    i = m0 + tl.arange(0, BLOCK_M)
    jd = tl.arange(0, BLOCK_D)
    qm = (i < LQ)[:, None] & (jd < D)[None, :]
    q = tl.load(q_ptr + bi * sq_b + h * sq_h + i[:, None] * sq_l + jd[None, :], mask=qm, other=0.0).to(tl.float32)
    q_off = LK - LQ
    qi = tl.where(i < LQ, i + q_off, -1)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo, hi = _window_range(m0, q_off, LK, window, HAS_WINDOW, BLOCK_M)
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_ptr + bi * sk_b + hk * sk_h, v_ptr + bi * sv_b + hk * sv_h,
                                  sk_l, sv_l, lo, hi, qi, window, scale, D, HAS_WINDOW, False, BLOCK_N, BLOCK_D)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    tl.store(o_ptr + (bh * LQ + i[:, None]) * D + jd[None, :], o.to(o_ptr.dtype.element_ty), mask=qm)
    tl.store(lse_ptr + bh * LQ + i, m_i + tl.log(l_safe), mask=i < LQ)


@triton.jit
def _dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, LQ, LK, H, HKV, D, window, scale,
               sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
               HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1)
    bi, h = bh // H, bh % H
    hk = h // (H // HKV)
    m0 = pid * BLOCK_M
    i = m0 + tl.arange(0, BLOCK_M)
    jd = tl.arange(0, BLOCK_D)
    qm = (i < LQ)[:, None] & (jd < D)[None, :]
    q = tl.load(q_ptr + bi * sq_b + h * sq_h + i[:, None] * sq_l + jd[None, :], mask=qm, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + (bh * LQ + i[:, None]) * D + jd[None, :], mask=qm, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + bh * LQ + i, mask=i < LQ, other=0.0)
    delta = tl.load(delta_ptr + bh * LQ + i, mask=i < LQ, other=0.0)
    q_off = LK - LQ
    qi = tl.where(i < LQ, i + q_off, -1)
    lo, hi = _window_range(m0, q_off, LK, window, HAS_WINDOW, BLOCK_M)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_range(dq, q, do, lse, delta, k_ptr + bi * sk_b + hk * sk_h, v_ptr + bi * sv_b + hk * sv_h, sk_l, sv_l,
                   lo, hi, qi, window, scale, D, HAS_WINDOW, False, BLOCK_N, BLOCK_D)
    tl.store(dq_ptr + (bh * LQ + i[:, None]) * D + jd[None, :], dq, mask=qm)


@triton.jit
def _dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, LQ, LK, H, HKV, D, window, scale,
                 sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                 HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid, bhk = tl.program_id(0), tl.program_id(1)
    bi, hk = bhk // HKV, bhk % HKV
    n0 = pid * BLOCK_N
    kj = n0 + tl.arange(0, BLOCK_N)
    jd = tl.arange(0, BLOCK_D)
    km = (kj < LK)[:, None] & (jd < D)[None, :]
    k = tl.load(k_ptr + bi * sk_b + hk * sk_h + kj[:, None] * sk_l + jd[None, :], mask=km, other=0.0)
    v = tl.load(v_ptr + bi * sv_b + hk * sv_h + kj[:, None] * sv_l + jd[None, :], mask=km, other=0.0)
    k, v = k.to(tl.float32), v.to(tl.float32)
    q_off = LK - LQ
    # queries that can see some key of this block: qi in [n0, n0 + BLOCK_N - 1 + window - 1]
    lo = tl.maximum(n0 - q_off, 0)
    hi = LQ
    if HAS_WINDOW:
        hi = tl.minimum(n0 + BLOCK_N - 1 + window - q_off, LQ)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    group = H // HKV
    for j in range(group):
        bh = bi * H + hk * group + j
        dk, dv = _dkdv_range(dk, dv, k, v, q_ptr + bi * sq_b + (hk * group + j) * sq_h, do_ptr + bh * LQ * D,
                             lse_ptr + bh * LQ, delta_ptr + bh * LQ, sq_l, D, lo, hi, kj, LK, q_off, window, scale,
                             D, HAS_WINDOW, False, BLOCK_M, BLOCK_D)
    off = (bhk * LK + kj[:, None]) * D + jd[None, :]
    tl.store(dk_ptr + off, dk, mask=km)
    tl.store(dv_ptr + off, dv, mask=km)


def inner_strides(*ts: Tensor) -> tuple[int, ...]:
    """(b, h, l) strides of each (b, h, l, d) tensor, whose last dim must be contiguous."""
    return tuple(s for t in ts for s in t.stride()[:3])


def lastdim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _WindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window, scale):
        q, k, v = (lastdim_contiguous(t) for t in (q, k, v))
        b, h, lq, d = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        o = torch.empty(b, h, lq, d, device=q.device, dtype=q.dtype)
        lse = torch.empty(b, h, lq, device=q.device, dtype=torch.float32)
        args = (lq, lk, h, hkv, d, window or 0, scale, *inner_strides(q, k, v))
        blocks = attention_blocks(d)
        _fwd_kernel[(triton.cdiv(lq, blocks["BLOCK_M"]), b * h)](q, k, v, o, lse, *args, HAS_WINDOW=window is not None,
                                                                 **blocks)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.window, ctx.scale = window, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        b, h, lq, d = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1)  # (b, h, lq): rowsum(dO * O) = sum_j P_ij dP_ij
        args = (lq, lk, h, hkv, d, ctx.window or 0, ctx.scale, *inner_strides(q, k, v))
        blocks = attention_blocks(d)
        dq = torch.empty(b, h, lq, d, device=q.device, dtype=torch.float32)
        _dq_kernel[(triton.cdiv(lq, blocks["BLOCK_M"]), b * h)](q, k, v, do, lse, delta, dq, *args,
                                                                HAS_WINDOW=ctx.window is not None, **blocks)
        dk, dv = window_dkdv(q, k, v, do, lse, delta, ctx.window, ctx.scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def window_dkdv(q: Tensor, k: Tensor, v: Tensor, do: Tensor, lse: Tensor, delta: Tensor, window: Optional[int],
                scale: float) -> tuple[Tensor, Tensor]:
    """dk, dv (b, hkv, lk, d) fp32 from the causal-window keys, given the softmax's lse and delta (b, h, lq).
    Also used by span attention, whose lse/delta cover the window and the retrieved blocks together."""
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    dk = torch.empty(b, hkv, lk, d, device=q.device, dtype=torch.float32)
    dv = torch.empty_like(dk)
    blocks = attention_blocks(d)
    _dkdv_kernel[(triton.cdiv(lk, blocks["BLOCK_N"]), b * hkv)](
        q, k, v, do, lse, delta, dk, dv, lq, lk, h, hkv, d, window or 0, scale, *inner_strides(q, k, v),
        HAS_WINDOW=window is not None, **blocks)
    return dk, dv


def window_attention_triton(
    q: Tensor,  # (b, h, lq, d)
    k: Tensor,  # (b, hkv, lk, d)
    v: Tensor,  # (b, hkv, lk, d)
    window: Optional[int] = None,
    softmax_scale: Optional[float] = None,
) -> Tensor:
    """Same contract as window_attention_torch (torch_ref.py)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return _WindowAttention.apply(q, k, v, window, scale)
