"""SE-Attn's attention part in Triton, flash-attention style, forward and backward, given a selection.

Contract: torch_ref.attend_selected. Query t of chunk n = t // M attends, in one online softmax, to the keys of the
blocks in selection[b, head, n] (all of them: a selected block lies wholly before the chunk) and then to its own
chunk's keys n*M .. t. The selection (b, h or 1, T, top_k), -1 = empty slot, comes from torch_ref.select_blocks
(scoring is cheap next to the attention and has no gradient).

Programs: forward / dq: one per (BLOCK_M queries of one chunk, b * h), streaming the top_k blocks then the chunk's
keys up to the last row, so memory is O(L d) plus the (b, h, L) log-sum-exp. dk/dv: the own-chunk part is one
program per (BLOCK_N keys of one chunk, b * hkv) that loops over the query heads sharing the kv head and stores;
a retrieved block can be chosen by many (chunk, head) pairs, so each (chunk, slot, head) program then adds its
block's gradient with fp32 atomics (no inverse index from blocks to the chunks that chose them).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridlm.kernels.se_attention.torch_ref import select_blocks

BLOCK_M = 16  # queries per program
BLOCK_N = 16  # keys per inner step


def block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


@triton.jit
def _visible(qi, kj, k_hi, CAUSAL: tl.constexpr):
    """(BM, BN): real query rows (qi >= 0) x existing keys (< k_hi), and kj <= qi for the own chunk."""
    ok = (kj < k_hi)[None, :] & (qi >= 0)[:, None]
    if CAUSAL:
        ok = ok & (kj[None, :] <= qi[:, None])
    return ok


@triton.jit
def _attend(acc, m_i, l_i, q, k_base, v_base, sk_l, sv_l, lo, hi, qi, scale, D,
            CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Online-softmax accumulation of keys [lo, hi) into (acc, m_i, l_i); q (BM, BD) fp32."""
    jd = tl.arange(0, BLOCK_D)
    for start in range(lo, hi, BLOCK_N):
        kj = start + tl.arange(0, BLOCK_N)
        km = (kj < hi)[:, None] & (jd < D)[None, :]
        k = tl.load(k_base + kj[:, None] * sk_l + jd[None, :], mask=km, other=0.0).to(tl.float32)
        v = tl.load(v_base + kj[:, None] * sv_l + jd[None, :], mask=km, other=0.0).to(tl.float32)
        s = tl.where(_visible(qi, kj, hi, CAUSAL), tl.dot(q, tl.trans(k)) * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _dq(dq, q, do, lse, delta, k_base, v_base, sk_l, sv_l, lo, hi, qi, scale, D,
        CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dq += sum over keys [lo, hi) of P (dP - delta) k * scale, P recomputed from the saved lse."""
    jd = tl.arange(0, BLOCK_D)
    for start in range(lo, hi, BLOCK_N):
        kj = start + tl.arange(0, BLOCK_N)
        km = (kj < hi)[:, None] & (jd < D)[None, :]
        k = tl.load(k_base + kj[:, None] * sk_l + jd[None, :], mask=km, other=0.0).to(tl.float32)
        v = tl.load(v_base + kj[:, None] * sv_l + jd[None, :], mask=km, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * scale
        p = tl.where(_visible(qi, kj, hi, CAUSAL), tl.exp(s - lse[:, None]), 0.0)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq += tl.dot(ds, k) * scale
    return dq


@triton.jit
def _dkdv(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sq_l, lo, hi, kj, k_hi, scale, D,
          CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """dk, dv (BN, BD) += contributions of queries [lo, hi) of one head (do/lse/delta rows contiguous)."""
    jd = tl.arange(0, BLOCK_D)
    for start in range(lo, hi, BLOCK_M):
        i = start + tl.arange(0, BLOCK_M)
        qm = (i < hi)[:, None] & (jd < D)[None, :]
        q = tl.load(q_base + i[:, None] * sq_l + jd[None, :], mask=qm, other=0.0).to(tl.float32)
        do = tl.load(do_base + i[:, None] * D + jd[None, :], mask=qm, other=0.0).to(tl.float32)
        lse = tl.load(lse_base + i, mask=i < hi, other=0.0)
        delta = tl.load(delta_base + i, mask=i < hi, other=0.0)
        qi = tl.where(i < hi, i, -1)
        s = tl.dot(q, tl.trans(k)) * scale
        p = tl.where(_visible(qi, kj, k_hi, CAUSAL), tl.exp(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p), do)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dk += tl.dot(tl.trans(ds), q) * scale
    return dk, dv


@triton.jit
def _rows(pid, n_sub, L, M, BLOCK_M: tl.constexpr):
    """Chunk n, its end c1, the program's rows i (never crossing the chunk end) and their positions (-1 = pad)."""
    n, sub = pid // n_sub, pid % n_sub
    c1 = tl.minimum(n * M + M, L)
    i = n * M + sub * BLOCK_M + tl.arange(0, BLOCK_M)
    return n, c1, i, tl.where(i < c1, i, -1)


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, sel_ptr, o_ptr, lse_ptr, L, H, HKV, HS, D, scale, S, M, T, n_sub,
                sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1)
    bi, h = bh // H, bh % H
    hk = h // (H // HKV)
    n, c1, i, qi = _rows(pid, n_sub, L, M, BLOCK_M)
    jd = tl.arange(0, BLOCK_D)
    qm = (qi >= 0)[:, None] & (jd < D)[None, :]
    q = tl.load(q_ptr + bi * sq_b + h * sq_h + i[:, None] * sq_l + jd[None, :], mask=qm, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    k_base, v_base = k_ptr + bi * sk_b + hk * sk_h, v_ptr + bi * sv_b + hk * sv_h
    sel_base = sel_ptr + ((bi * HS + h % HS) * T + n) * TOP_K
    for slot in range(TOP_K):
        blk = tl.load(sel_base + slot)
        lo = tl.where(blk >= 0, blk * S, 0)  # an empty slot (-1) is the empty range [0, 0)
        hi = tl.where(blk >= 0, blk * S + S, 0)
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_base, v_base, sk_l, sv_l, lo, hi, qi, scale, D,
                                False, BLOCK_N, BLOCK_D)
    hi = tl.minimum(n * M + (pid % n_sub) * BLOCK_M + BLOCK_M, c1)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_base, v_base, sk_l, sv_l, n * M, hi, qi, scale, D,
                            True, BLOCK_N, BLOCK_D)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    tl.store(o_ptr + (bh * L + i[:, None]) * D + jd[None, :], (acc / l_safe[:, None]).to(o_ptr.dtype.element_ty),
             mask=qm)
    tl.store(lse_ptr + bh * L + i, m_i + tl.log(l_safe), mask=qi >= 0)


@triton.jit
def _dq_kernel(q_ptr, k_ptr, v_ptr, sel_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, L, H, HKV, HS, D, scale, S, M, T,
               n_sub, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
               TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1)
    bi, h = bh // H, bh % H
    hk = h // (H // HKV)
    n, c1, i, qi = _rows(pid, n_sub, L, M, BLOCK_M)
    jd = tl.arange(0, BLOCK_D)
    qm = (qi >= 0)[:, None] & (jd < D)[None, :]
    q = tl.load(q_ptr + bi * sq_b + h * sq_h + i[:, None] * sq_l + jd[None, :], mask=qm, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + (bh * L + i[:, None]) * D + jd[None, :], mask=qm, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + bh * L + i, mask=qi >= 0, other=0.0)
    delta = tl.load(delta_ptr + bh * L + i, mask=qi >= 0, other=0.0)
    k_base, v_base = k_ptr + bi * sk_b + hk * sk_h, v_ptr + bi * sv_b + hk * sv_h
    sel_base = sel_ptr + ((bi * HS + h % HS) * T + n) * TOP_K
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for slot in range(TOP_K):
        blk = tl.load(sel_base + slot)
        lo = tl.where(blk >= 0, blk * S, 0)
        hi = tl.where(blk >= 0, blk * S + S, 0)
        dq = _dq(dq, q, do, lse, delta, k_base, v_base, sk_l, sv_l, lo, hi, qi, scale, D, False, BLOCK_N, BLOCK_D)
    hi = tl.minimum(n * M + (pid % n_sub) * BLOCK_M + BLOCK_M, c1)
    dq = _dq(dq, q, do, lse, delta, k_base, v_base, sk_l, sv_l, n * M, hi, qi, scale, D, True, BLOCK_N, BLOCK_D)
    tl.store(dq_ptr + (bh * L + i[:, None]) * D + jd[None, :], dq, mask=qm)


@triton.jit
def _dkdv_own_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, L, H, HKV, D, scale, M,
                     n_sub, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Stores dk/dv (b, hkv, L, d) from the own-chunk keys: BLOCK_N keys of chunk n, seen by queries kj .. c1."""
    pid, bhk = tl.program_id(0), tl.program_id(1)
    bi, hk = bhk // HKV, bhk % HKV
    n, c1, kj, _ = _rows(pid, n_sub, L, M, BLOCK_N)
    k0 = n * M + (pid % n_sub) * BLOCK_N
    jd = tl.arange(0, BLOCK_D)
    km = (kj < c1)[:, None] & (jd < D)[None, :]
    k = tl.load(k_ptr + bi * sk_b + hk * sk_h + kj[:, None] * sk_l + jd[None, :], mask=km, other=0.0)
    v = tl.load(v_ptr + bi * sv_b + hk * sv_h + kj[:, None] * sv_l + jd[None, :], mask=km, other=0.0)
    k, v = k.to(tl.float32), v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    group = H // HKV
    for j in range(group):
        bh = bi * H + hk * group + j
        dk, dv = _dkdv(dk, dv, k, v, q_ptr + bi * sq_b + (hk * group + j) * sq_h, do_ptr + bh * L * D,
                       lse_ptr + bh * L, delta_ptr + bh * L, sq_l, k0, c1, kj, c1, scale, D, True, BLOCK_M, BLOCK_D)
    off = (bhk * L + kj[:, None]) * D + jd[None, :]
    tl.store(dk_ptr + off, dk, mask=km)
    tl.store(dv_ptr + off, dv, mask=km)


@triton.jit
def _dkdv_retrieved_kernel(q_ptr, k_ptr, v_ptr, sel_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, L, H, HKV, HS,
                           D, scale, S, M, T, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                           TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Adds to dk/dv the gradient through block `slot` of chunk n for query head h (all of the chunk's queries)."""
    pid, bh = tl.program_id(0), tl.program_id(1)
    n, slot = pid // TOP_K, pid % TOP_K
    bi, h = bh // H, bh % H
    hk = h // (H // HKV)
    blk = tl.load(sel_ptr + ((bi * HS + h % HS) * T + n) * TOP_K + slot)
    k_lo = tl.where(blk >= 0, blk * S, 0)
    k_hi = tl.where(blk >= 0, blk * S + S, 0)
    q_lo, q_hi = n * M, tl.minimum(n * M + M, L)
    jd = tl.arange(0, BLOCK_D)
    for start in range(k_lo, k_hi, BLOCK_N):
        kj = start + tl.arange(0, BLOCK_N)
        km = (kj < k_hi)[:, None] & (jd < D)[None, :]
        k = tl.load(k_ptr + bi * sk_b + hk * sk_h + kj[:, None] * sk_l + jd[None, :], mask=km, other=0.0)
        v = tl.load(v_ptr + bi * sv_b + hk * sv_h + kj[:, None] * sv_l + jd[None, :], mask=km, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dk, dv = _dkdv(dk, dv, k.to(tl.float32), v.to(tl.float32), q_ptr + bi * sq_b + h * sq_h, do_ptr + bh * L * D,
                       lse_ptr + bh * L, delta_ptr + bh * L, sq_l, q_lo, q_hi, kj, k_hi, scale, D, False, BLOCK_M,
                       BLOCK_D)
        off = ((bi * HKV + hk) * L + kj[:, None]) * D + jd[None, :]
        tl.atomic_add(dk_ptr + off, dk, mask=km)
        tl.atomic_add(dv_ptr + off, dv, mask=km)


def _inner_strides(*ts: Tensor) -> tuple[int, ...]:
    """(b, h, l) strides of each (b, h, l, d) tensor, whose last dim must be contiguous."""
    return tuple(s for t in ts for s in t.stride()[:3])


def _lastdim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _SEAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, selection, chunk_size, block_size, scale):
        q, k, v = (_lastdim_contiguous(t) for t in (q, k, v))
        selection = selection.contiguous()
        b, h, length, d = q.shape
        hkv = k.shape[1]
        hs, t, top_k = selection.shape[1:]
        n_sub = triton.cdiv(chunk_size, BLOCK_M)
        o = torch.empty(b, h, length, d, device=q.device, dtype=q.dtype)
        lse = torch.empty(b, h, length, device=q.device, dtype=torch.float32)
        _fwd_kernel[(t * n_sub, b * h)](
            q, k, v, selection, o, lse, length, h, hkv, hs, d, scale, block_size, chunk_size, t, n_sub,
            *_inner_strides(q, k, v), TOP_K=top_k, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=block_d(d))
        ctx.save_for_backward(q, k, v, selection, o, lse)
        ctx.cfg = (chunk_size, block_size, scale)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, selection, o, lse = ctx.saved_tensors
        chunk_size, block_size, scale = ctx.cfg
        b, h, length, d = q.shape
        hkv = k.shape[1]
        hs, t, top_k = selection.shape[1:]
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1)  # (b, h, L): rowsum(dO * O) = sum_j P_ij dP_ij
        strides = _inner_strides(q, k, v)
        meta = dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=block_d(d))
        dq = torch.empty(b, h, length, d, device=q.device, dtype=torch.float32)
        n_sub = triton.cdiv(chunk_size, BLOCK_M)
        _dq_kernel[(t * n_sub, b * h)](q, k, v, selection, do, lse, delta, dq, length, h, hkv, hs, d, scale,
                                       block_size, chunk_size, t, n_sub, *strides, TOP_K=top_k, **meta)
        dk = torch.empty(b, hkv, length, d, device=q.device, dtype=torch.float32)
        dv = torch.empty_like(dk)
        n_sub_k = triton.cdiv(chunk_size, BLOCK_N)
        _dkdv_own_kernel[(t * n_sub_k, b * hkv)](q, k, v, do, lse, delta, dk, dv, length, h, hkv, d, scale,
                                                 chunk_size, n_sub_k, *strides, **meta)
        if top_k > 0:
            _dkdv_retrieved_kernel[(t * top_k, b * h)](q, k, v, selection, do, lse, delta, dk, dv, length, h, hkv,
                                                       hs, d, scale, block_size, chunk_size, t, *strides,
                                                       TOP_K=top_k, **meta)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def attend_selected_triton(q: Tensor, k: Tensor, v: Tensor, selection: Tensor, *, chunk_size: int, block_size: int,
                           scale: float | None = None) -> Tensor:
    """Same contract as torch_ref.attend_selected: q (b, h, L, d), k/v (b, hkv, L, d), selection
    (b, h or 1, ceil(L / chunk_size), top_k) -> (b, h, L, d)."""
    b, h, length, d = q.shape
    t = -(-length // chunk_size)
    if selection.dim() != 4 or tuple(selection.shape[:3]) not in ((b, h, t), (b, 1, t)):
        raise ValueError(f"selection must be (b, h or 1, T, top_k) = ({b}, {h} or 1, {t}, top_k); "
                         f"got {tuple(selection.shape)}")
    sc = scale if scale is not None else 1.0 / math.sqrt(d)
    return _SEAttention.apply(q, k, v, selection.to(torch.int64), chunk_size, block_size, sc)


def se_attention_triton(q: Tensor, k: Tensor, v: Tensor, *, chunk_size: int, block_size: int, top_k: int,
                        scorer: str = "paper", shared: bool = False, scale: float | None = None) -> Tensor:
    """The op's triton backend (contract: torch_ref.se_attention_torch): the torch selection (no gradient, cheap
    next to the attention), then this file's attention kernel."""
    sel = select_blocks(q, k, v, chunk_size=chunk_size, block_size=block_size, top_k=top_k, scorer=scorer,
                        shared=shared, scale=scale)
    return attend_selected_triton(q, k, v, sel, chunk_size=chunk_size, block_size=block_size, scale=scale)
