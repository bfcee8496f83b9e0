"""Chunked SSD scan (Mamba-2) in Triton: forward and backward, initial state in, final state out.

Per (batch, head) and chunk of Q tokens, with a_t = dt_t A and Acum its within-chunk cumulative sum,
L[l, s] = exp(Acum_l - Acum_s) for s <= l (else 0), e_s = exp(Acum_{Q-1} - Acum_s), X_s = dt_s x_s:
  CB[l, s] = C_l . B_s                                                  (`_chunk_cb`, per group)
  S_c   = sum_s e_s X_s B_s^T                                           (`_chunk_outer`)
  H_c+1 = exp(Acum_{Q-1}) H_c + S_c,  H_0 = initial state, final = H_last (`_state_passing_fwd`)
  y_l   = sum_s CB[l, s] L[l, s] X_s  +  exp(Acum_l) H_c C_l  +  D x_l   (`_chunk_scan_fwd`)
Backward, with dS_c the gradient w.r.t. S_c (= w.r.t. H_c+1) from `_state_passing_bwd`, which walks the chunks
backwards from the gradients (dy exp(Acum))^T C each chunk's outputs send its incoming state (`_chunk_outer`):
  dX_s  = sum_l CB[l, s] L[l, s] dy_l  +  e_s dS_c B_s                  (`_chunk_dx_bwd`: dx, ddt)
  dC_l  = sum_s (dy_l . X_s) L[l, s] B_s  +  exp(Acum_l) dy_l^T H_c       (`_chunk_dc_bwd`)
  dB_s  = sum_l (dy_l . X_s) L[l, s] C_l  +  e_s X_s^T dS_c               (`_chunk_db_bwd`)
  dAcum_t = C_t . dC_t - B_t . dB_t  (+ <dS_c, H_c+1> at t = Q-1)        (torch: every Acum term is one of these)
The within-chunk cumsum of a, its reverse in backward, dD and the sums over each group's heads stay in torch.
Tokens past the sequence end load dt = 0, which neither decays nor writes the state, so any length works
without padding the inputs.

Tiling: every kernel works on tiles at most 64 wide in each of chunk positions, head dim and state dim
(`ssd_blocks`) and loops over the rest, so its shared memory and registers do not grow with the shape (the
largest official Mamba-2 shape, chunk 256 x headdim 64 x d_state 128, fits sm_80 and sm_90; `python -m
hybridlm.kernels.compile_check` measures it). Everything is computed in fp32: tl.dot on fp32 tiles is tf32 on A100/H100
and exact under the CPU interpreter, where the tests run (TRITON_INTERPRET=1).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_TILE = 64  # widest tile in any dimension
GRID_Y_MAX = 65535  # CUDA's limit on grid dimension 1, which indexes (batch, head)
# The kernels need at most this much shared memory per block at any shape (their tiles are capped at MAX_TILE),
# the smallest per-block limit of any sm_80+ GPU (sm_86/89/120); tests/kernels/test_compile.py checks it.
SHARED_BYTES_BUDGET = 101_376


def _tile_width(n: int) -> int:
    return min(MAX_TILE, max(16, triton.next_power_of_2(n)))  # tl.dot needs every dim >= 16


def ssd_blocks(chunk: int, headdim: int, d_state: int) -> dict[str, int]:
    """Launch meta-parameters of the chunk kernels: tile widths over chunk positions (L), head dim (P) and state
    dim (N), and warps per program. The wrapper and kernels/compile_check.py both take them from here."""
    return dict(BLOCK_L=_tile_width(chunk), BLOCK_P=_tile_width(headdim), BLOCK_N=_tile_width(d_state), num_warps=4)


def state_block(headdim: int, d_state: int) -> int:
    """Elements of one (headdim x d_state) state per program of the state-passing kernels."""
    return min(1024, triton.next_power_of_2(headdim * d_state))


def ssd_triton_fits(x: Tensor, B: Tensor, chunk_size: int) -> Optional[str]:
    """None when the Triton SSD kernels can launch for x (b, l, h, p), B (b, l, g, n) on x's device, else the
    limit that stops them. The tiles do not grow with chunk_size, headdim or d_state, so no shape overflows
    shared memory or registers; what remains are the grid's limit and GPUs older than the ones checked."""
    b, _, h, _ = x.shape
    if b * h > GRID_Y_MAX:
        return f"batch x heads = {b * h} > {GRID_Y_MAX}, the CUDA limit on grid dimension 1"
    if x.device.type == "cuda":
        cap = torch.cuda.get_device_capability(x.device)
        if cap < (8, 0):
            return (f"compute capability {cap[0]}.{cap[1]} < 8.0: the kernels are checked for sm_80 and newer "
                    f"(shared memory per block up to {SHARED_BYTES_BUDGET} B, tf32 tl.dot)")
    return None


@triton.jit
def _tile(ptr, rows, cols, s_row, s_col, n_rows, n_cols):
    """fp32 tile ptr[rows, cols]; entries with row >= n_rows or col >= n_cols read 0."""
    m = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return tl.load(ptr + rows[:, None] * s_row + cols[None, :] * s_col, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _decay(a_l, a_s, il, js, Q):
    """(len(il), len(js)) tile of L[l, s] = exp(Acum_l - Acum_s) for s <= l < Q, else 0. Rows past the chunk are
    excluded before exp: their Acum reads 0, and exp(0 - Acum_s) could overflow to inf (inf * 0 = nan)."""
    keep = (js[None, :] <= il[:, None]) & (il < Q)[:, None]
    return tl.exp(tl.where(keep, a_l[:, None] - a_s[None, :], float("-inf")))


@triton.jit
def _decay_t(a_s, a_l, js, il, Q):
    """Transposed `_decay`: the (len(js), len(il)) tile of L[l, s] indexed [s, l]."""
    keep = (js[:, None] <= il[None, :]) & (il < Q)[None, :]
    return tl.exp(tl.where(keep, a_l[None, :] - a_s[:, None], float("-inf")))


@triton.jit
def _chunk_cb(
    b_ptr, c_ptr, cb_ptr,  # cb: (b, nc, g, Q, Q) fp32
    L, G, N, Q, n_chunks, sb_b, sb_l, sb_g, sb_n, sc_b, sc_l, sc_g, sc_n,
    BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """CB[l, s] = C_l . B_s of one chunk and group, the tiles on or below the diagonal of row block i."""
    pid, bg = tl.program_id(0), tl.program_id(1)
    bi, g = (bg // G).to(tl.int64), bg % G
    n_lb = tl.cdiv(Q, BLOCK_L)
    c, i = pid // n_lb, pid % n_lb
    t0 = c.to(tl.int64) * Q
    q_len = tl.minimum(Q, L - c * Q)
    b_base = b_ptr + bi * sb_b + t0 * sb_l + g * sb_g
    c_base = c_ptr + bi * sc_b + t0 * sc_l + g * sc_g
    cb_base = cb_ptr + ((bi * n_chunks + c) * G + g) * Q * Q
    il, ar, jn0 = i * BLOCK_L + tl.arange(0, BLOCK_L), tl.arange(0, BLOCK_L), tl.arange(0, BLOCK_N)
    for k in range(0, i + 1):
        js = k * BLOCK_L + ar
        acc = tl.zeros([BLOCK_L, BLOCK_L], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            jn = n0 + jn0
            acc += tl.dot(_tile(c_base, il, jn, sc_l, sc_n, q_len, N), tl.trans(_tile(b_base, js, jn, sb_l, sb_n,
                                                                                      q_len, N)))
        tl.store(cb_base + il[:, None] * Q + js[None, :], acc, mask=(il < Q)[:, None] & (js < Q)[None, :])


@triton.jit
def _chunk_outer(
    u_ptr, v_ptr, dt_ptr, acum_ptr, out_ptr,  # out: (b, nc, h, p, n) fp32
    L, H, P, N, Q, HEADS_PER_GROUP, n_chunks, su_b, su_l, su_h, su_p, sv_b, sv_l, sv_g, sv_n, sdt_b, sdt_l, sdt_h,
    TO_CHUNK_END: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out_c[p, n] = sum_t w_t u_t[p] v_t[n] over the chunk, one (BLOCK_P, BLOCK_N) tile per program.
    TO_CHUNK_END: w_t = e_t dt_t, u = x, v = B, out = S_c (forward). Else w_t = exp(Acum_t), u = dy, v = C, out =
    the gradient w.r.t. the state entering chunk c through the chunk's own outputs (backward)."""
    pid, bh = tl.program_id(0), tl.program_id(1)
    bi, h = (bh // H).to(tl.int64), bh % H
    g = h // HEADS_PER_GROUP
    n_pb, n_nb = tl.cdiv(P, BLOCK_P), tl.cdiv(N, BLOCK_N)
    c, j, m = pid // (n_pb * n_nb), (pid // n_nb) % n_pb, pid % n_nb
    t0 = c.to(tl.int64) * Q
    q_len = tl.minimum(Q, L - c * Q)
    u_base = u_ptr + bi * su_b + t0 * su_l + h * su_h
    v_base = v_ptr + bi * sv_b + t0 * sv_l + g * sv_g
    dt_base = dt_ptr + bi * sdt_b + t0 * sdt_l + h * sdt_h
    a_base = acum_ptr + (bh.to(tl.int64) * n_chunks + c) * Q
    a_last = tl.load(a_base + Q - 1)
    ip, jn, ar = j * BLOCK_P + tl.arange(0, BLOCK_P), m * BLOCK_N + tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_L)
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for s0 in range(0, q_len, BLOCK_L):
        js = s0 + ar
        a = tl.load(a_base + js, mask=js < Q, other=0.0)
        if TO_CHUNK_END:
            w = tl.exp(a_last - a) * tl.load(dt_base + js * sdt_l, mask=js < q_len, other=0.0).to(tl.float32)
        else:
            w = tl.exp(a)
        u_t = _tile(u_base, ip, js, su_p, su_l, P, q_len)  # (BP, BL): u transposed
        acc += tl.dot(u_t * w[None, :], _tile(v_base, js, jn, sv_l, sv_n, q_len, N))
    out = out_ptr + ((bi * n_chunks + c) * H + h) * P * N
    tl.store(out + ip[:, None] * N + jn[None, :], acc, mask=(ip < P)[:, None] & (jn < N)[None, :])


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
        idx = ((bi * n_chunks + c) * H + h).to(tl.int64) * PN + offs
        tl.store(states_ptr + idx, s, mask=m)  # state entering chunk c
        decay = tl.exp(tl.load(acum_ptr + (bh * n_chunks + c).to(tl.int64) * Q + Q - 1))
        s = decay * s + tl.load(chunk_ptr + idx, mask=m, other=0.0)
    tl.store(final_ptr + bh * PN + offs, s, mask=m)


@triton.jit
def _chunk_scan_fwd(
    x_ptr, dt_ptr, acum_ptr, cb_ptr, c_ptr, states_ptr, d_ptr, y_ptr,  # y: (b, l, h, p) contiguous
    L, H, G, P, N, Q, n_chunks, sx_b, sx_l, sx_h, sx_p, sc_b, sc_l, sc_g, sc_n, sdt_b, sdt_l, sdt_h,
    HAS_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """y for one (BLOCK_L positions, BLOCK_P head channels) tile of a chunk."""
    pid, bh = tl.program_id(0), tl.program_id(1)
    bi, h = (bh // H).to(tl.int64), bh % H
    g = h // (H // G)
    n_lb, n_pb = tl.cdiv(Q, BLOCK_L), tl.cdiv(P, BLOCK_P)
    c, i, j = pid // (n_lb * n_pb), (pid // n_pb) % n_lb, pid % n_pb
    t0 = c.to(tl.int64) * Q
    q_len = tl.minimum(Q, L - c * Q)
    x_base = x_ptr + bi * sx_b + t0 * sx_l + h * sx_h
    dt_base = dt_ptr + bi * sdt_b + t0 * sdt_l + h * sdt_h
    c_base = c_ptr + bi * sc_b + t0 * sc_l + g * sc_g
    a_base = acum_ptr + (bh.to(tl.int64) * n_chunks + c) * Q
    cb_base = cb_ptr + ((bi * n_chunks + c) * G + g) * Q * Q
    il, ip, ar = i * BLOCK_L + tl.arange(0, BLOCK_L), j * BLOCK_P + tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_L)
    a_l = tl.load(a_base + il, mask=il < Q, other=0.0)
    acc = tl.zeros([BLOCK_L, BLOCK_P], dtype=tl.float32)
    for k in range(0, i + 1):  # source blocks on or before the diagonal
        js = k * BLOCK_L + ar
        a_s = tl.load(a_base + js, mask=js < Q, other=0.0)
        dt_s = tl.load(dt_base + js * sdt_l, mask=js < q_len, other=0.0).to(tl.float32)
        mt = _tile(cb_base, il, js, Q, 1, Q, Q) * _decay(a_l, a_s, il, js, Q) * dt_s[None, :]
        acc += tl.dot(mt, _tile(x_base, js, ip, sx_l, sx_p, q_len, P))
    st_base = states_ptr + ((bi * n_chunks + c) * H + h) * P * N  # state entering the chunk, (P, N)
    acc_st = tl.zeros([BLOCK_L, BLOCK_P], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        jn = n0 + tl.arange(0, BLOCK_N)
        acc_st += tl.dot(_tile(c_base, il, jn, sc_l, sc_n, q_len, N), tl.trans(_tile(st_base, ip, jn, N, 1, P, N)))
    acc += tl.exp(a_l)[:, None] * acc_st
    if HAS_D:
        acc += tl.load(d_ptr + h).to(tl.float32) * _tile(x_base, il, ip, sx_l, sx_p, q_len, P)
    y = y_ptr + ((bi * L + t0) * H + h) * P
    tl.store(y + il[:, None] * H * P + ip[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(il < q_len)[:, None] & (ip < P)[None, :])


@triton.jit
def _state_passing_bwd(
    dinter_ptr, states_ptr, final_ptr, acum_ptr, dfinal_ptr, dchunk_ptr, dinit_ptr, dlast_ptr,
    H, PN, Q, n_chunks, n_blocks, HAS_DFINAL: tl.constexpr, BLOCK: tl.constexpr,
):
    """Walks chunks backwards. G = gradient w.r.t. the state leaving chunk c (= entering c+1):
    dS_c = G;  gradient w.r.t. H_c = dinter_c + exp(Acum_{Q-1}) G;  and, since H_c+1 = exp(Acum_{Q-1}) (H_c +
    sum_s exp(-Acum_s) X_s B_s^T) scales with exp(Acum_{Q-1}), d Acum_{Q-1} gets <G, H_c+1> (partial sums over
    this program's slice of the state, summed in torch)."""
    pid, bh = tl.program_id(0), tl.program_id(1)
    bi, h = bh // H, bh % H
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < PN
    if HAS_DFINAL:
        gr = tl.load(dfinal_ptr + bh * PN + offs, mask=m, other=0.0).to(tl.float32)
    else:
        gr = tl.zeros([BLOCK], dtype=tl.float32)
    nxt = tl.load(final_ptr + bh * PN + offs, mask=m, other=0.0)  # H_c+1, starting from the final state
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        idx = ((bi * n_chunks + c) * H + h).to(tl.int64) * PN + offs
        tl.store(dchunk_ptr + idx, gr, mask=m)
        tl.store(dlast_ptr + (bh * n_chunks + c) * n_blocks + pid, tl.sum(gr * nxt, axis=0))
        nxt = tl.load(states_ptr + idx, mask=m, other=0.0)
        decay = tl.exp(tl.load(acum_ptr + (bh * n_chunks + c).to(tl.int64) * Q + Q - 1))
        gr = tl.load(dinter_ptr + idx, mask=m, other=0.0) + decay * gr
    tl.store(dinit_ptr + bh * PN + offs, gr, mask=m)


@triton.jit
def _chunk_dx_bwd(
    x_ptr, dt_ptr, acum_ptr, cb_ptr, b_ptr, dchunk_ptr, dy_ptr, d_ptr, dx_ptr, ddt_ptr,
    L, H, G, P, N, Q, n_chunks, sx_b, sx_l, sx_h, sx_p, sb_b, sb_l, sb_g, sb_n, sdt_b, sdt_l, sdt_h,
    HAS_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dx (b, l, h, p) and this head-channel block's part of ddt without its decay term, ddt_part (n_pb, b, l, h),
    for one (BLOCK_L positions s, BLOCK_P channels) tile; dy (b, l, h, p) contiguous."""
    pid, bh = tl.program_id(0), tl.program_id(1)
    bi, h = (bh // H).to(tl.int64), bh % H
    g = h // (H // G)
    n_lb, n_pb = tl.cdiv(Q, BLOCK_L), tl.cdiv(P, BLOCK_P)
    c, i, j = pid // (n_lb * n_pb), (pid // n_pb) % n_lb, pid % n_pb
    t0 = c.to(tl.int64) * Q
    q_len = tl.minimum(Q, L - c * Q)
    x_base = x_ptr + bi * sx_b + t0 * sx_l + h * sx_h
    dt_base = dt_ptr + bi * sdt_b + t0 * sdt_l + h * sdt_h
    b_base = b_ptr + bi * sb_b + t0 * sb_l + g * sb_g
    dy_base = dy_ptr + ((bi * L + t0) * H + h) * P
    a_base = acum_ptr + (bh.to(tl.int64) * n_chunks + c) * Q
    cb_base = cb_ptr + ((bi * n_chunks + c) * G + g) * Q * Q
    js, ip, ar = i * BLOCK_L + tl.arange(0, BLOCK_L), j * BLOCK_P + tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_L)
    a_s = tl.load(a_base + js, mask=js < Q, other=0.0)
    dt_s = tl.load(dt_base + js * sdt_l, mask=js < q_len, other=0.0).to(tl.float32)
    d_big_x = tl.zeros([BLOCK_L, BLOCK_P], dtype=tl.float32)  # gradient w.r.t. X_s = dt_s x_s
    for k in range(i, tl.cdiv(q_len, BLOCK_L)):  # output blocks on or after the diagonal
        il = k * BLOCK_L + ar
        a_l = tl.load(a_base + il, mask=il < Q, other=0.0)
        mt = _tile(cb_base, js, il, 1, Q, Q, Q) * _decay_t(a_s, a_l, js, il, Q)  # [s, l]
        d_big_x += tl.dot(mt, _tile(dy_base, il, ip, H * P, 1, q_len, P))
    ds_base = dchunk_ptr + ((bi * n_chunks + c) * H + h) * P * N  # dS_c, (P, N)
    acc_st = tl.zeros([BLOCK_L, BLOCK_P], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        jn = n0 + tl.arange(0, BLOCK_N)
        acc_st += tl.dot(_tile(b_base, js, jn, sb_l, sb_n, q_len, N), tl.trans(_tile(ds_base, ip, jn, N, 1, P, N)))
    a_last = tl.load(a_base + Q - 1)
    d_big_x += tl.exp(a_last - a_s)[:, None] * acc_st
    dx = dt_s[:, None] * d_big_x
    if HAS_D:
        dx += tl.load(d_ptr + h).to(tl.float32) * _tile(dy_base, js, ip, H * P, 1, q_len, P)
    tok = (bi * L + t0) * H + h
    tl.store(dx_ptr + tok * P + js[:, None] * H * P + ip[None, :], dx, mask=(js < q_len)[:, None] & (ip < P)[None, :])
    ddt = tl.sum(_tile(x_base, js, ip, sx_l, sx_p, q_len, P) * d_big_x, axis=1)
    part = (j * tl.num_programs(1)).to(tl.int64) * L  # ddt_part[j] holds b * l * h values
    tl.store(ddt_ptr + part + tok + js * H, ddt, mask=js < q_len)


@triton.jit
def _chunk_dc_bwd(
    x_ptr, dt_ptr, acum_ptr, b_ptr, states_ptr, dy_ptr, dc_ptr,  # dc: (b, l, h, n) per head
    L, H, G, P, N, Q, n_chunks, sx_b, sx_l, sx_h, sx_p, sb_b, sb_l, sb_g, sb_n, sdt_b, sdt_l, sdt_h,
    BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dC_l for one (BLOCK_L positions l, BLOCK_N state channels) tile; dy (b, l, h, p) contiguous."""
    pid, bh = tl.program_id(0), tl.program_id(1)
    bi, h = (bh // H).to(tl.int64), bh % H
    g = h // (H // G)
    n_lb, n_nb = tl.cdiv(Q, BLOCK_L), tl.cdiv(N, BLOCK_N)
    c, i, m = pid // (n_lb * n_nb), (pid // n_nb) % n_lb, pid % n_nb
    t0 = c.to(tl.int64) * Q
    q_len = tl.minimum(Q, L - c * Q)
    x_base = x_ptr + bi * sx_b + t0 * sx_l + h * sx_h
    dt_base = dt_ptr + bi * sdt_b + t0 * sdt_l + h * sdt_h
    b_base = b_ptr + bi * sb_b + t0 * sb_l + g * sb_g
    dy_base = dy_ptr + ((bi * L + t0) * H + h) * P
    a_base = acum_ptr + (bh.to(tl.int64) * n_chunks + c) * Q
    st_base = states_ptr + ((bi * n_chunks + c) * H + h) * P * N  # H_c, (P, N)
    il, jn, ar, ap = i * BLOCK_L + tl.arange(0, BLOCK_L), m * BLOCK_N + tl.arange(0, BLOCK_N), \
        tl.arange(0, BLOCK_L), tl.arange(0, BLOCK_P)
    a_l = tl.load(a_base + il, mask=il < Q, other=0.0)
    acc = tl.zeros([BLOCK_L, BLOCK_N], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):  # through the incoming state: exp(Acum_l) dy_l^T H_c
        ip = p0 + ap
        acc += tl.dot(_tile(dy_base, il, ip, H * P, 1, q_len, P), _tile(st_base, ip, jn, N, 1, P, N))
    acc *= tl.exp(a_l)[:, None]
    for k in range(0, i + 1):  # within the chunk, sources s <= l
        js = k * BLOCK_L + ar
        a_s = tl.load(a_base + js, mask=js < Q, other=0.0)
        dt_s = tl.load(dt_base + js * sdt_l, mask=js < q_len, other=0.0).to(tl.float32)
        gm = tl.zeros([BLOCK_L, BLOCK_L], dtype=tl.float32)  # dy_l . x_s
        for p0 in range(0, P, BLOCK_P):
            ip = p0 + ap
            gm += tl.dot(_tile(dy_base, il, ip, H * P, 1, q_len, P), _tile(x_base, ip, js, sx_p, sx_l, P, q_len))
        gm = gm * _decay(a_l, a_s, il, js, Q) * dt_s[None, :]
        acc += tl.dot(gm, _tile(b_base, js, jn, sb_l, sb_n, q_len, N))
    dc = dc_ptr + ((bi * L + t0) * H + h) * N
    tl.store(dc + il[:, None] * H * N + jn[None, :], acc, mask=(il < q_len)[:, None] & (jn < N)[None, :])


@triton.jit
def _chunk_db_bwd(
    x_ptr, dt_ptr, acum_ptr, c_ptr, dchunk_ptr, dy_ptr, db_ptr,  # db: (b, l, h, n) per head
    L, H, G, P, N, Q, n_chunks, sx_b, sx_l, sx_h, sx_p, sc_b, sc_l, sc_g, sc_n, sdt_b, sdt_l, sdt_h,
    BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dB_s for one (BLOCK_L positions s, BLOCK_N state channels) tile; dy (b, l, h, p) contiguous."""
    pid, bh = tl.program_id(0), tl.program_id(1)
    bi, h = (bh // H).to(tl.int64), bh % H
    g = h // (H // G)
    n_lb, n_nb = tl.cdiv(Q, BLOCK_L), tl.cdiv(N, BLOCK_N)
    c, i, m = pid // (n_lb * n_nb), (pid // n_nb) % n_lb, pid % n_nb
    t0 = c.to(tl.int64) * Q
    q_len = tl.minimum(Q, L - c * Q)
    x_base = x_ptr + bi * sx_b + t0 * sx_l + h * sx_h
    dt_base = dt_ptr + bi * sdt_b + t0 * sdt_l + h * sdt_h
    c_base = c_ptr + bi * sc_b + t0 * sc_l + g * sc_g
    dy_base = dy_ptr + ((bi * L + t0) * H + h) * P
    a_base = acum_ptr + (bh.to(tl.int64) * n_chunks + c) * Q
    ds_base = dchunk_ptr + ((bi * n_chunks + c) * H + h) * P * N  # dS_c, (P, N)
    js, jn, ar, ap = i * BLOCK_L + tl.arange(0, BLOCK_L), m * BLOCK_N + tl.arange(0, BLOCK_N), \
        tl.arange(0, BLOCK_L), tl.arange(0, BLOCK_P)
    a_s = tl.load(a_base + js, mask=js < Q, other=0.0)
    dt_s = tl.load(dt_base + js * sdt_l, mask=js < q_len, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_L, BLOCK_N], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):  # through this chunk's state contribution: e_s X_s^T dS_c
        ip = p0 + ap
        acc += tl.dot(_tile(x_base, js, ip, sx_l, sx_p, q_len, P), _tile(ds_base, ip, jn, N, 1, P, N))
    acc *= (tl.exp(tl.load(a_base + Q - 1) - a_s) * dt_s)[:, None]
    for k in range(i, tl.cdiv(q_len, BLOCK_L)):  # within the chunk, outputs l >= s
        il = k * BLOCK_L + ar
        a_l = tl.load(a_base + il, mask=il < Q, other=0.0)
        gm = tl.zeros([BLOCK_L, BLOCK_L], dtype=tl.float32)  # x_s . dy_l, indexed [s, l]
        for p0 in range(0, P, BLOCK_P):
            ip = p0 + ap
            gm += tl.dot(_tile(x_base, js, ip, sx_l, sx_p, q_len, P), _tile(dy_base, ip, il, 1, H * P, P, q_len))
        gm = gm * _decay_t(a_s, a_l, js, il, Q) * dt_s[:, None]
        acc += tl.dot(gm, _tile(c_base, il, jn, sc_l, sc_n, q_len, N))
    db = db_ptr + ((bi * L + t0) * H + h) * N
    tl.store(db + js[:, None] * H * N + jn[None, :], acc, mask=(js < q_len)[:, None] & (jn < N)[None, :])


def _strides(t: Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def _chunk_cumsum(dt: Tensor, A: Tensor, q: int) -> Tensor:
    """(b, l, h) -> within-chunk cumsum of dt*A, (b, h, c, q) fp32; the tail is padded with 0 (no decay)."""
    b, l, h = dt.shape
    pad = (-l) % q
    a = (dt.float() * A.float()).transpose(1, 2)  # (b, h, l)
    a = torch.nn.functional.pad(a, (0, pad))
    return a.reshape(b, h, -1, q).cumsum(-1).contiguous()


def _cb(B: Tensor, C: Tensor, q: int, nc: int, meta: dict) -> Tensor:
    b, l, g, n = B.shape
    cb = torch.empty(b, nc, g, q, q, device=B.device, dtype=torch.float32)
    _chunk_cb[(nc * triton.cdiv(q, meta["BLOCK_L"]), b * g)](
        B, C, cb, l, g, n, q, nc, *_strides(B), *_strides(C), BLOCK_L=meta["BLOCK_L"], BLOCK_N=meta["BLOCK_N"],
        num_warps=meta["num_warps"])
    return cb


def _tiles(q: int, p: int, n: int, meta: dict) -> tuple[int, int, int]:
    """Tiles per chunk along positions, head dim and state dim."""
    return triton.cdiv(q, meta["BLOCK_L"]), triton.cdiv(p, meta["BLOCK_P"]), triton.cdiv(n, meta["BLOCK_N"])


class _SSDChunkScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, initial_state, chunk_size):
        b, l, h, p = x.shape
        g, n = B.shape[2], B.shape[3]
        q = min(chunk_size, l)
        nc = triton.cdiv(l, q)
        meta = ssd_blocks(q, p, n)
        n_lb, n_pb, n_nb = _tiles(q, p, n, meta)
        acum = _chunk_cumsum(dt, A, q)
        f32 = dict(device=x.device, dtype=torch.float32)
        chunk_states = torch.empty(b, nc, h, p, n, **f32)
        _chunk_outer[(nc * n_pb * n_nb, b * h)](x, B, dt, acum, chunk_states, l, h, p, n, q, h // g, nc,
                                                *_strides(x), *_strides(B), *_strides(dt), TO_CHUNK_END=True, **meta)
        states = torch.empty_like(chunk_states)
        final = torch.empty(b, h, p, n, **f32)
        init = initial_state.float().contiguous() if initial_state is not None else None
        block = state_block(p, n)
        _state_passing_fwd[(triton.cdiv(p * n, block), b * h)](
            chunk_states, acum, init, states, final, h, p * n, q, nc, HAS_INIT=init is not None, BLOCK=block)
        cb = _cb(B, C, q, nc, meta)
        y = torch.empty(b, l, h, p, device=x.device, dtype=x.dtype)
        _chunk_scan_fwd[(nc * n_lb * n_pb, b * h)](x, dt, acum, cb, C, states, D, y, l, h, g, p, n, q, nc,
                                                   *_strides(x), *_strides(C), *_strides(dt), HAS_D=D is not None,
                                                   **meta)
        ctx.save_for_backward(x, dt, A, B, C, D, acum, states, final)
        ctx.has_init, ctx.q = initial_state is not None, q
        ctx.init_dtype = initial_state.dtype if initial_state is not None else None
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, acum, states, final = ctx.saved_tensors
        b, l, h, p = x.shape
        g, n, q = B.shape[2], B.shape[3], ctx.q
        nc = acum.shape[2]
        meta = ssd_blocks(q, p, n)
        n_lb, n_pb, n_nb = _tiles(q, p, n, meta)
        f32 = dict(device=x.device, dtype=torch.float32)
        dy = torch.zeros_like(x) if dy is None else dy.contiguous()
        dinter = torch.empty(b, nc, h, p, n, **f32)
        _chunk_outer[(nc * n_pb * n_nb, b * h)](dy, C, dt, acum, dinter, l, h, p, n, q, h // g, nc, *_strides(dy),
                                                *_strides(C), *_strides(dt), TO_CHUNK_END=False, **meta)
        block = state_block(p, n)
        n_blocks = triton.cdiv(p * n, block)
        dchunk, dinit = torch.empty_like(dinter), torch.empty(b, h, p, n, **f32)
        dlast = torch.empty(b, h, nc, n_blocks, **f32)
        dfinal = dfinal.float().contiguous() if dfinal is not None else None
        _state_passing_bwd[(n_blocks, b * h)](dinter, states, final, acum, dfinal, dchunk, dinit, dlast, h, p * n,
                                              q, nc, n_blocks, HAS_DFINAL=dfinal is not None, BLOCK=block)
        cb = _cb(B, C, q, nc, meta)
        dx = torch.empty(b, l, h, p, **f32)
        ddt_part = torch.empty(n_pb, b, l, h, **f32)
        common = (l, h, g, p, n, q, nc, *_strides(x))
        _chunk_dx_bwd[(nc * n_lb * n_pb, b * h)](x, dt, acum, cb, B, dchunk, dy, D, dx, ddt_part, *common,
                                                 *_strides(B), *_strides(dt), HAS_D=D is not None, **meta)
        dc_h, db_h = torch.empty(b, l, h, n, **f32), torch.empty(b, l, h, n, **f32)
        _chunk_dc_bwd[(nc * n_lb * n_nb, b * h)](x, dt, acum, B, states, dy, dc_h, *common, *_strides(B),
                                                 *_strides(dt), **meta)
        _chunk_db_bwd[(nc * n_lb * n_nb, b * h)](x, dt, acum, C, dchunk, dy, db_h, *common, *_strides(C),
                                                 *_strides(dt), **meta)
        # gradient w.r.t. Acum (see the module docstring), then Acum -> a by a reverse cumsum within each chunk
        hpg = h // g
        dacum_tok = ((dc_h.view(b, l, g, hpg, n) * C.float()[:, :, :, None]).sum(-1)
                     - (db_h.view(b, l, g, hpg, n) * B.float()[:, :, :, None]).sum(-1)).reshape(b, l, h)
        dacum = torch.nn.functional.pad(dacum_tok.transpose(1, 2), (0, nc * q - l)).reshape(b, h, nc, q)
        dacum[..., -1] += dlast.sum(-1)
        da = dacum.flip(-1).cumsum(-1).flip(-1).reshape(b, h, nc * q)[:, :, :l].transpose(1, 2)  # (b, l, h)
        ddt = ddt_part.sum(0) + da * A.float()
        dA = (da * dt.float()).sum((0, 1))
        dB = db_h.view(b, l, g, hpg, n).sum(3)
        dC = dc_h.view(b, l, g, hpg, n).sum(3)
        dD = (dy.float() * x.float()).sum((0, 1, 3)).to(D.dtype) if D is not None else None
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
