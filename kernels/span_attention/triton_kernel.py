"""Span-expanded attention (SE-Attn) in Triton: one online softmax over a query chunk's retrieved blocks and
its causal sliding window; forward and backward. Semantics: span_attention_torch in torch_ref.py.

Forward / dq: a program owns BLOCK_M queries of one query chunk (so they share the chunk's `selected` row),
streams the top_k selected blocks (keys j <= t_i - W) and then the window keys, reusing the window-attention
jit helpers. dk/dv: the window part is exactly window attention's key-block kernel (fed the joint lse/delta);
a retrieved block can be selected by many chunks, so each (chunk, slot) program adds its block's gradient with
atomics (fp32), which keeps memory O(L d) without an inverse index from blocks to the chunks that chose them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridlm.kernels.window_attention.triton_kernel import (
    _attend_range,
    _dkdv_range,
    _dq_range,
    _window_range,
    attention_blocks,
    inner_strides,
    lastdim_contiguous,
    window_dkdv,
)


@triton.jit
def _rows(pid, n_sub, LQ, LK, C, BLOCK_M: tl.constexpr):
    """Chunk n and rows i of this program (never crossing a chunk end); key index qi (-1 = padding row)."""
    n, sub = pid // n_sub, pid % n_sub
    m0 = n * C + sub * BLOCK_M
    i = m0 + tl.arange(0, BLOCK_M)
    ok = i < tl.minimum(n * C + C, LQ)
    return n, m0, i, ok, tl.where(ok, i + LK - LQ, -1)


@triton.jit
def _span_fwd_kernel(q_ptr, k_ptr, v_ptr, sel_ptr, o_ptr, lse_ptr, LQ, LK, H, HKV, D, window, scale, M, C,
                     n_chunks, n_sub, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                     TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1)
    bi, h = bh // H, bh % H
    hk = h // (H // HKV)
    n, m0, i, ok, qi = _rows(pid, n_sub, LQ, LK, C, BLOCK_M)
    jd = tl.arange(0, BLOCK_D)
    qm = ok[:, None] & (jd < D)[None, :]
    q = tl.load(q_ptr + bi * sq_b + h * sq_h + i[:, None] * sq_l + jd[None, :], mask=qm, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    k_base, v_base = k_ptr + bi * sk_b + hk * sk_h, v_ptr + bi * sv_b + hk * sv_h
    sel_base = sel_ptr + ((bi * HKV + hk) * n_chunks + n) * TOP_K
    for slot in range(TOP_K):
        blk = tl.load(sel_base + slot)
        lo = tl.where(blk >= 0, blk * M, 0)  # an empty slot (-1) is the empty range [0, 0)
        hi = tl.where(blk >= 0, blk * M + M, 0)
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, sk_l, sv_l, lo, hi, qi, window, scale, D,
                                      True, True, BLOCK_N, BLOCK_D)
    lo, hi = _window_range(m0, LK - LQ, LK, window, True, BLOCK_M)
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, sk_l, sv_l, lo, hi, qi, window, scale, D,
                                  True, False, BLOCK_N, BLOCK_D)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    tl.store(o_ptr + (bh * LQ + i[:, None]) * D + jd[None, :], (acc / l_safe[:, None]).to(o_ptr.dtype.element_ty),
             mask=qm)
    tl.store(lse_ptr + bh * LQ + i, m_i + tl.log(l_safe), mask=ok)


@triton.jit
def _span_dq_kernel(q_ptr, k_ptr, v_ptr, sel_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, LQ, LK, H, HKV, D, window,
                    scale, M, C, n_chunks, n_sub, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1)
    bi, h = bh // H, bh % H
    hk = h // (H // HKV)
    n, m0, i, ok, qi = _rows(pid, n_sub, LQ, LK, C, BLOCK_M)
    jd = tl.arange(0, BLOCK_D)
    qm = ok[:, None] & (jd < D)[None, :]
    q = tl.load(q_ptr + bi * sq_b + h * sq_h + i[:, None] * sq_l + jd[None, :], mask=qm, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + (bh * LQ + i[:, None]) * D + jd[None, :], mask=qm, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + bh * LQ + i, mask=ok, other=0.0)
    delta = tl.load(delta_ptr + bh * LQ + i, mask=ok, other=0.0)
    k_base, v_base = k_ptr + bi * sk_b + hk * sk_h, v_ptr + bi * sv_b + hk * sv_h
    sel_base = sel_ptr + ((bi * HKV + hk) * n_chunks + n) * TOP_K
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for slot in range(TOP_K):
        blk = tl.load(sel_base + slot)
        lo = tl.where(blk >= 0, blk * M, 0)
        hi = tl.where(blk >= 0, blk * M + M, 0)
        dq = _dq_range(dq, q, do, lse, delta, k_base, v_base, sk_l, sv_l, lo, hi, qi, window, scale, D,
                       True, True, BLOCK_N, BLOCK_D)
    lo, hi = _window_range(m0, LK - LQ, LK, window, True, BLOCK_M)
    dq = _dq_range(dq, q, do, lse, delta, k_base, v_base, sk_l, sv_l, lo, hi, qi, window, scale, D,
                   True, False, BLOCK_N, BLOCK_D)
    tl.store(dq_ptr + (bh * LQ + i[:, None]) * D + jd[None, :], dq, mask=qm)


@triton.jit
def _span_dkdv_kernel(q_ptr, k_ptr, v_ptr, sel_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, LQ, LK, H, HKV, D,
                      window, scale, M, C, n_chunks, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                      TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Adds to dk/dv (b, hkv, lk, d) the gradient through retrieved block `slot` of chunk n."""
    pid, bhk = tl.program_id(0), tl.program_id(1)
    n, slot = pid // TOP_K, pid % TOP_K
    bi, hk = bhk // HKV, bhk % HKV
    blk = tl.load(sel_ptr + ((bi * HKV + hk) * n_chunks + n) * TOP_K + slot)
    k_lo = tl.where(blk >= 0, blk * M, 0)
    k_hi = tl.where(blk >= 0, blk * M + M, 0)
    q_lo, q_hi = n * C, tl.minimum(n * C + C, LQ)
    jd = tl.arange(0, BLOCK_D)
    group = H // HKV
    for start in range(k_lo, k_hi, BLOCK_N):
        kj = start + tl.arange(0, BLOCK_N)
        km = (kj < k_hi)[:, None] & (jd < D)[None, :]
        k = tl.load(k_ptr + bi * sk_b + hk * sk_h + kj[:, None] * sk_l + jd[None, :], mask=km, other=0.0)
        v = tl.load(v_ptr + bi * sv_b + hk * sv_h + kj[:, None] * sv_l + jd[None, :], mask=km, other=0.0)
        k, v = k.to(tl.float32), v.to(tl.float32)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for j in range(group):
            bh = bi * H + hk * group + j
            dk, dv = _dkdv_range(dk, dv, k, v, q_ptr + bi * sq_b + (hk * group + j) * sq_h, do_ptr + bh * LQ * D,
                                 lse_ptr + bh * LQ, delta_ptr + bh * LQ, sq_l, D, q_lo, q_hi, kj, k_hi, LK - LQ,
                                 window, scale, D, True, True, BLOCK_M, BLOCK_D)
        off = (bhk * LK + kj[:, None]) * D + jd[None, :]
        tl.atomic_add(dk_ptr + off, dk, mask=km)
        tl.atomic_add(dv_ptr + off, dv, mask=km)


class _SpanAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, selected, window, block_size, query_chunk, scale):
        q, k, v = (lastdim_contiguous(t) for t in (q, k, v))
        selected = selected.contiguous()
        b, h, lq, d = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        n_chunks, top_k = selected.shape[2], selected.shape[3]
        blocks = attention_blocks(d)
        n_sub = triton.cdiv(query_chunk, blocks["BLOCK_M"])
        o = torch.empty(b, h, lq, d, device=q.device, dtype=q.dtype)
        lse = torch.empty(b, h, lq, device=q.device, dtype=torch.float32)
        _span_fwd_kernel[(n_chunks * n_sub, b * h)](
            q, k, v, selected, o, lse, lq, lk, h, hkv, d, window, scale, block_size, query_chunk, n_chunks, n_sub,
            *inner_strides(q, k, v), TOP_K=top_k, **blocks)
        ctx.save_for_backward(q, k, v, selected, o, lse)
        ctx.cfg = (window, block_size, query_chunk, scale)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, selected, o, lse = ctx.saved_tensors
        window, block_size, query_chunk, scale = ctx.cfg
        b, h, lq, d = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        n_chunks, top_k = selected.shape[2], selected.shape[3]
        blocks = attention_blocks(d)
        n_sub = triton.cdiv(query_chunk, blocks["BLOCK_M"])
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1)  # (b, h, lq)
        common = (lq, lk, h, hkv, d, window, scale, block_size, query_chunk, n_chunks)
        meta = dict(TOP_K=top_k, **blocks)
        dq = torch.empty(b, h, lq, d, device=q.device, dtype=torch.float32)
        _span_dq_kernel[(n_chunks * n_sub, b * h)](q, k, v, selected, do, lse, delta, dq, *common, n_sub,
                                                   *inner_strides(q, k, v), **meta)
        dk, dv = window_dkdv(q, k, v, do, lse, delta, window, scale)
        if top_k > 0:
            _span_dkdv_kernel[(n_chunks * top_k, b * hkv)](q, k, v, selected, do, lse, delta, dk, dv, *common,
                                                           *inner_strides(q, k, v), **meta)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def span_attention_triton(
    q: Tensor,  # (b, h, Lq, d)
    k: Tensor,  # (b, hkv, Lk, d)
    v: Tensor,  # (b, hkv, Lk, d)
    selected: Tensor,  # (b, hkv, ceil(Lq / C), top_k) long block indices, -1 = empty slot
    window: int,
    block_size: int,
    query_chunk: int,
    softmax_scale: Optional[float] = None,
) -> Tensor:
    """Same contract as span_attention_torch (torch_ref.py), with v's head dim equal to q's."""
    n_chunks = -(-q.shape[2] // query_chunk)
    expect = (q.shape[0], k.shape[1], n_chunks)
    if tuple(selected.shape[:3]) != expect:
        raise ValueError(f"selected must be (b, hkv, ceil(Lq/C), top_k) with leading dims {expect}, "
                         f"got {tuple(selected.shape)}")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return _SpanAttention.apply(q, k, v, selected, window, block_size, query_chunk, scale)
