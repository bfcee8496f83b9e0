"""Depthwise causal conv1d with a streaming state in Triton: forward and backward.

With xs = [conv_state, x] along time (k-1+l rows), y[t] = bias + sum_i w[i] * xs[t+i] per channel. A program owns
BLOCK_L time steps x BLOCK_D channels of one sequence and reads each tap row p of xs from conv_state (p < k-1) or
from x (row p-k+1), so the concatenation is never materialised; the k taps are unrolled (k is a constexpr) and
accumulated in fp32.
Backward: dxs[p] = sum_i w[i] * dy[p-i] is the same stencil reversed, tiled over the rows of xs and written to
dx or d(conv_state); dw[i] = sum_{b,t} dy[t] * xs[t+i] and dbias = sum_{b,t} dy[t] are written as one partial
sum per program and reduced in torch (deterministic, no atomics).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_L = 16  # time steps per program
BLOCK_D = 32  # channels per program


@triton.jit
def _load_xs(x_ptr, s_ptr, p, c, L, D, sx_l, ss_l, K: tl.constexpr, HAS_STATE: tl.constexpr):
    """(BL, BD) fp32: rows p of xs = [conv_state, x] of one sequence, channels c; zero outside xs (or all of
    conv_state when there is none, i.e. a zero state). x_ptr / s_ptr point at the sequence; channels are stride 1."""
    cm = (c < D)[None, :]
    xrow = p - (K - 1)
    v = tl.load(x_ptr + xrow[:, None] * sx_l + c[None, :], mask=((xrow >= 0) & (xrow < L))[:, None] & cm,
                other=0.0).to(tl.float32)
    if HAS_STATE:
        sm = ((p >= 0) & (p < K - 1))[:, None] & cm
        v += tl.load(s_ptr + p[:, None] * ss_l + c[None, :], mask=sm, other=0.0).to(tl.float32)
    return v


@triton.jit
def _fwd_kernel(x_ptr, s_ptr, w_ptr, bias_ptr, y_ptr, L, D, sx_b, sx_l, ss_b, ss_l,
                K: tl.constexpr, HAS_STATE: tl.constexpr, HAS_BIAS: tl.constexpr,
                BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    pl, pc, bi = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pl * BLOCK_L + tl.arange(0, BLOCK_L)
    c = pc * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    for i in tl.static_range(K):
        w = tl.load(w_ptr + c * K + i, mask=c < D, other=0.0).to(tl.float32)  # (BD,) tap i
        acc += _load_xs(x_ptr + bi * sx_b, s_ptr + bi * ss_b, t + i, c, L, D, sx_l, ss_l, K, HAS_STATE) * w[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c, mask=c < D, other=0.0).to(tl.float32)[None, :]
    ym = (t < L)[:, None] & (c < D)[None, :]
    tl.store(y_ptr + (bi * L + t[:, None]) * D + c[None, :], acc.to(y_ptr.dtype.element_ty), mask=ym)


@triton.jit
def _dxs_kernel(dy_ptr, w_ptr, dx_ptr, ds_ptr, L, D, K: tl.constexpr, HAS_STATE: tl.constexpr,
                BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Gradient of rows p of xs: rows p >= K-1 go to dx (b, L, D), the first K-1 to d(conv_state) (b, K-1, D)."""
    pl, pc, bi = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    p = pl * BLOCK_L + tl.arange(0, BLOCK_L)
    c = pc * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = (c < D)[None, :]
    acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    for i in tl.static_range(K):
        w = tl.load(w_ptr + c * K + i, mask=c < D, other=0.0).to(tl.float32)
        t = p - i  # the output that reads row p through tap i
        g = tl.load(dy_ptr + (bi * L + t[:, None]) * D + c[None, :], mask=((t >= 0) & (t < L))[:, None] & cm,
                    other=0.0).to(tl.float32)
        acc += g * w[None, :]
    xrow = p - (K - 1)
    tl.store(dx_ptr + (bi * L + xrow[:, None]) * D + c[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=((xrow >= 0) & (xrow < L))[:, None] & cm)
    if HAS_STATE:
        tl.store(ds_ptr + (bi * (K - 1) + p[:, None]) * D + c[None, :], acc.to(ds_ptr.dtype.element_ty),
                 mask=(p < K - 1)[:, None] & cm)


@triton.jit
def _dw_kernel(x_ptr, s_ptr, dy_ptr, dw_ptr, db_ptr, L, D, sx_b, sx_l, ss_b, ss_l,
               K: tl.constexpr, HAS_STATE: tl.constexpr, HAS_BIAS: tl.constexpr,
               BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's partial sums over its time steps: dw (P, K, D) and dbias (P, D), P = one row per program."""
    pl, pc, bi = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pl * BLOCK_L + tl.arange(0, BLOCK_L)
    c = pc * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = c < D
    g = tl.load(dy_ptr + (bi * L + t[:, None]) * D + c[None, :], mask=(t < L)[:, None] & cm[None, :],
                other=0.0).to(tl.float32)  # zero past L, so taps read there add nothing
    part = bi * tl.num_programs(0) + pl
    for i in tl.static_range(K):
        xs = _load_xs(x_ptr + bi * sx_b, s_ptr + bi * ss_b, t + i, c, L, D, sx_l, ss_l, K, HAS_STATE)
        tl.store(dw_ptr + (part * K + i) * D + c, tl.sum(g * xs, axis=0), mask=cm)
    if HAS_BIAS:
        tl.store(db_ptr + part * D + c, tl.sum(g, axis=0), mask=cm)


def _grid(rows: int, d: int, b: int) -> tuple[int, int, int]:
    return triton.cdiv(rows, BLOCK_L), triton.cdiv(d, BLOCK_D), b


class _CausalConv1d(torch.autograd.Function):
    """y only; x, w (d, k), bias, conv_state all in x's dtype (the wrapper casts, so autograd casts back)."""

    @staticmethod
    def forward(ctx, x, w, bias, conv_state):
        x = x if x.stride(-1) == 1 else x.contiguous()
        w = w.contiguous()
        if conv_state is not None and conv_state.stride(-1) != 1:
            conv_state = conv_state.contiguous()
        b, l, d = x.shape
        k = w.shape[-1]
        y = torch.empty(b, l, d, device=x.device, dtype=x.dtype)
        s = conv_state if conv_state is not None else x  # a pointer the kernel never reads without HAS_STATE
        _fwd_kernel[_grid(l, d, b)](x, s, w, bias if bias is not None else w, y, l, d, x.stride(0), x.stride(1),
                                    s.stride(0), s.stride(1), K=k, HAS_STATE=conv_state is not None,
                                    HAS_BIAS=bias is not None, BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D)
        ctx.save_for_backward(x, w, conv_state)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, conv_state = ctx.saved_tensors
        b, l, d = x.shape
        k = w.shape[-1]
        dy = dy.contiguous()
        has_state = conv_state is not None
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        ds = torch.empty(b, k - 1, d, device=x.device, dtype=x.dtype) if has_state else None
        _dxs_kernel[_grid(k - 1 + l, d, b)](dy, w, dx, ds if has_state else dx, l, d, K=k, HAS_STATE=has_state,
                                            BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D)
        grid = _grid(l, d, b)
        dw_part = torch.empty(grid[0] * b, k, d, device=x.device, dtype=torch.float32)
        db_part = torch.empty(grid[0] * b, d, device=x.device, dtype=torch.float32)
        s = conv_state if has_state else x
        _dw_kernel[grid](x, s, dy, dw_part, db_part, l, d, x.stride(0), x.stride(1), s.stride(0), s.stride(1),
                         K=k, HAS_STATE=has_state, HAS_BIAS=ctx.has_bias, BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D)
        dw = dw_part.sum(0).t().to(w.dtype)  # (d, k)
        db = db_part.sum(0).to(x.dtype) if ctx.has_bias else None
        return dx, dw, db, ds


def causal_conv1d_triton(
    x: Tensor,  # (b, l, d), l >= 1
    weight: Tensor,  # (d, 1, k) as stored by nn.Conv1d(groups=d)
    bias: Optional[Tensor],  # (d,)
    conv_state: Optional[Tensor] = None,  # (b, k-1, d): the last k-1 inputs before x; None means zeros
) -> tuple[Tensor, Tensor]:
    """Same contract as causal_conv1d_torch (torch_ref.py): y (b, l, d) (no activation), new state (b, k-1, d)."""
    b, l, d = x.shape
    k = weight.shape[-1]
    state = conv_state.to(x.dtype) if conv_state is not None else None
    y = _CausalConv1d.apply(x, weight[:, 0, :].to(x.dtype), bias.to(x.dtype) if bias is not None else None, state)
    # The new state, the last k-1 rows of [state, x], is a copy with no arithmetic: left to torch, whose autograd
    # routes its gradient to x and conv_state.
    prev = state if state is not None else x.new_zeros(b, k - 1, d)
    return y, torch.cat([prev[:, min(l, k - 1):], x[:, max(0, l - (k - 1)):]], dim=1)
