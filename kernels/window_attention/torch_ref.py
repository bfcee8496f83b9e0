"""Causal (optionally sliding-window) attention over a query block whose keys may be preceded by a cache.

Convention: k/v hold `Lk >= Lq` positions and the last Lq of them belong to the queries, so query i sits at
key index i + (Lk - Lq). A query sees key j iff j <= its own index and (window is None or j > index - window).

Paths, all on torch's fused CPU flash kernel:
  * banded, direct (a window shorter than the keys, CPU, equal head dims): queries in blocks of bq = 64; block n
    attends to the one tile of T = bq + W - 1 keys (rounded up to a multiple of 16: the kernel is ~10% faster on
    aligned widths) its queries can see, through one (bq, T) band mask; the tiles are strided views of k/v and
    the blocks go, ~2M tile elements at a time, into the flash forward op as batch entries: T / W times the
    useful FLOPs (1.25 at W = 256; bq = 64 beat 96 and 128 at head dims 32-128 in interleaved A/B runs, though
    the old SDPA path's 128 was best there), linear in length. The queries with fewer than W - 1 earlier keys
    (head) and the last < 2 bq queries (tail) are small masked calls of their own. A custom autograd.Function
    calls the flash forward and backward ops (aten::_scaled_dot_product_flash_attention_for_cpu[_backward])
    itself and writes the output and the gradients into one buffer each: the earlier SDPA-autograd version
    padded q/k/v, concatenated the head, and its backward zero-filled and summed gradients of the duplicated key
    tiles, of the slices and of the pads (fill_/copy_/add_/cat were ~25% of its forward + backward).
    banded_forward/banded_backward also serve span_attention, whose window part this is. bf16/fp16 key
    gradients are summed in float32.
  * banded, through SDPA autograd (other devices, head dims that differ): the same tiling.
  * full (no window, or a window covering every key): SDPA's causal kernel, or query blocks against the key
    prefix when the scores of one call would be too many.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.torch_version import TorchVersion

# Above this many query x key scores in one block, split queries into blocks so memory stays bounded (full path).
_MAX_SCORES = 1 << 22


def _mask(q_idx: Tensor, k_idx: Tensor, window: Optional[int]) -> Tensor:
    allowed = k_idx[None, :] <= q_idx[:, None]
    if window is not None:
        allowed = allowed & (k_idx[None, :] > q_idx[:, None] - window)
    return allowed


def _band_block(window: int, lq: int) -> int:
    """Queries per block of the banded path. A block computes bq x (bq + W - 1) scores for bq x W useful ones:
    smaller blocks waste less, but below ~32 rows the fused kernel's per-block overhead dominates. Measured on one
    AVX-512 core (head dim 32, fwd and fwd+bwd): W/2 was best or tied at W = 64-256, and 128 beat W/2 at W = 512."""
    return max(1, min(lq, 128, max(32, window // 2)))


def _full(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], gqa: bool) -> Tensor:
    b, h, lq, d = q.shape
    lk = k.shape[2]
    offset = lk - lq
    if lq == lk and lq * lk <= _MAX_SCORES:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    block = max(1, min(lq, _MAX_SCORES // lk))
    outs = []
    for s in range(0, lq, block):
        e = min(lq, s + block)
        q_idx = torch.arange(s + offset, e + offset, device=q.device)
        k_idx = torch.arange(0, e + offset, device=q.device)
        outs.append(F.scaled_dot_product_attention(
            q[:, :, s:e], k[:, :, : e + offset], v[:, :, : e + offset], attn_mask=_mask(q_idx, k_idx, None),
            scale=scale, enable_gqa=gqa))
    return torch.cat(outs, dim=2)


class KeyTiles(torch.autograd.Function):
    """KeyTiles.apply(x, bq, m): x (b, hkv, (nb + m - 1) * bq, d) -> its overlapping tiles (nb, b * hkv, m * bq, d),
    tile j = rows [j*bq, (j + m)*bq), as a strided view (no copy). The backward adds the m shifted block
    gradients, several times cheaper than autograd's generic unfold backward. Also used by span_attention."""

    @staticmethod
    def forward(ctx, x: Tensor, bq: int, m: int) -> Tensor:
        b, hkv, rows, d = x.shape
        nb = rows // bq - m + 1
        ctx.shape, ctx.bq, ctx.m = x.shape, bq, m
        x = x.contiguous()
        return x.as_strided((nb, b * hkv, m * bq, d), (bq * d, rows * d, d, 1))

    @staticmethod
    def backward(ctx, g: Tensor):
        b, hkv, rows, d = ctx.shape
        bq, m = ctx.bq, ctx.m
        nb = rows // bq - m + 1
        g = g.reshape(nb, b * hkv, m, bq, d)
        out = g.new_zeros(b * hkv, rows // bq, bq, d)
        for i in range(m):
            out[:, i: i + nb] += g[:, :, i].transpose(0, 1)
        return out.view(ctx.shape), None, None


def _banded_sdpa(q: Tensor, k: Tensor, v: Tensor, window: int, scale: Optional[float], gqa: bool) -> Tensor:
    b, h, lq, d = q.shape
    lk, dv = k.shape[2], v.shape[3]
    W = window
    offset = lk - lq
    bq = _band_block(W, lq)
    # Queries before `head` see fewer than W - 1 earlier keys (their window starts before key 0); they take the
    # full path with the window mask, so the tiles below never reach before key 0 and need no padding mask.
    head = min(lq, max(0, W - 1 - offset))
    o_head = None
    if head:
        q_idx = torch.arange(offset, head + offset, device=q.device)
        k_idx = torch.arange(0, head + offset, device=q.device)
        o_head = F.scaled_dot_product_attention(q[:, :, :head], k[:, :, : head + offset], v[:, :, : head + offset],
                                                attn_mask=_mask(q_idx, k_idx, W), scale=scale, enable_gqa=gqa)
        if head == lq:
            return o_head
    n = lq - head
    nb = -(-n // bq)
    m = -(-(bq + W - 1) // bq)  # key blocks per tile: the tile's bq + W - 1 keys, rounded up to whole blocks
    # Block j holds queries head + j*bq + r (r < bq) at key index t = head + offset + j*bq + r; it sees keys from
    # t - W + 1 on, so tile j is key blocks [j, j + m) of the keys from head + offset - W + 1 (>= 0) on, padded at
    # the back for the last blocks.
    k0 = head + offset - (W - 1)
    back = (nb + m - 1) * bq - (lk - k0)
    kt = KeyTiles.apply(F.pad(k[:, :, k0:], (0, 0, 0, back)), bq, m)  # (nb, b*hkv, m*bq, d)
    vt = KeyTiles.apply(F.pad(v[:, :, k0:], (0, 0, 0, back)), bq, m)
    # Blocks go first and the batch joins the heads: q (nb, b*h, bq, d). GQA stays right: query head i of batch
    # entry e is row e*h + i, its kv head e*hkv + i // (h/hkv) = row // (h/hkv).
    qb = F.pad(q[:, :, head:], (0, 0, 0, nb * bq - n)).reshape(b * h, nb, bq, d).transpose(0, 1)
    # Row r sees tile column c iff its key is not after the query (c <= r + W - 1) and inside the window (c >= r).
    r = torch.arange(bq, device=q.device)[:, None]
    c = torch.arange(m * bq, device=q.device)[None, :]
    band = (c >= r) & (c <= r + W - 1)
    o = F.scaled_dot_product_attention(qb, kt, vt, attn_mask=band, scale=scale, enable_gqa=gqa)  # (nb, b*h, bq, dv)
    o = o.transpose(0, 1).reshape(b, h, nb * bq, dv)[:, :, :n]
    return o if o_head is None else torch.cat([o_head, o], dim=2)


# The direct path calls the CPU flash ops with masks and grouped kv heads, as torch >= 2.5 has them (written
# against 2.13); with an older torch every caller keeps the SDPA-autograd path.
_DIRECT = TorchVersion(torch.__version__) >= (2, 5, 0)
_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu if _DIRECT else None
_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward if _DIRECT else None
# Queries per block of the direct banded path (measured at W = 256, head dims 32-128; see the module docstring).
_BQ = 64
_ALIGN = 16
# Key-tile elements per flash call: the kernel's buffers (zero-filled tile gradients) then come from the heap
# and stay in cache instead of being fresh, page-faulting allocations of the whole sequence's tiles.
_GROUP_ELEMS = 1 << 21


def _band_bias(rows: int, cols: int, q0: int, k0: int, window: int, dtype: torch.dtype, device) -> Tensor:
    """Additive mask (rows, cols): query row r (key index q0 + r) sees column c (key index k0 + c) iff it is not
    after the query and inside the window; 0 there, -inf elsewhere (the flash op takes a mask of q's dtype)."""
    allowed = _mask(torch.arange(q0, q0 + rows, device=device), torch.arange(k0, k0 + cols, device=device), window)
    return torch.zeros(rows, cols, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))


def _rows(x: Tensor, r0: int, count: int, rows: int, step: Optional[int] = None) -> Tensor:
    """count blocks of `rows` consecutive positions of x (b, H, len) or (b, H, len, e), contiguous, the first at
    position r0 and each `step` (default rows) after the previous one -> (count, b*H, rows[, e]), a strided view."""
    step = rows if step is None else step
    e = x.shape[3] if x.dim() == 4 else 1
    shape, strides = (count, x.shape[0] * x.shape[1], rows), (step * e, x.shape[2] * e, e)
    if x.dim() == 4:
        shape, strides = shape + (e,), strides + (1,)
    return x.as_strided(shape, strides, x.storage_offset() + r0 * e)


def _pieces(q: Tensor, k: Tensor, v: Tensor, W: int, bq: int, *per_query: Tensor):
    """The flash calls of the direct banded path, as (q, k, v, mask, key index of k's first row, tiled, per_query)
    with views of q/k/v and of the per-query tensors (b, h, lq[, e]), e.g. the output and its logsumexp: the head
    (queries with fewer than W - 1 earlier keys), the full blocks of bq queries (their overlapping key tiles of T
    keys are strided views: tile j = keys [k0 + j*bq, k0 + j*bq + T)) and the tail (at most 2 bq - 1 queries)."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    offset = lk - lq
    head = min(lq, max(0, W - 1 - offset))
    n = lq - head
    k0 = head + offset - (W - 1)  # >= 0: the first key of the first block's tile
    T = -(-(bq + W - 1) // _ALIGN) * _ALIGN  # tile width, rounded up (the flash kernel is faster on aligned widths)
    nb = max(0, min(n // bq, (lk - k0 - T) // bq + 1))  # full blocks whose whole tile lies within the keys
    tail = n - nb * bq
    dev, dt = q.device, q.dtype
    out = []
    if head:
        out.append((q[:, :, :head], k[:, :, : head + offset], v[:, :, : head + offset],
                    _band_bias(head, head + offset, offset, 0, W, dt, dev), 0, False,
                    [x[:, :, :head] for x in per_query]))
    if nb:
        r = torch.arange(bq, device=dev)[:, None]
        c = torch.arange(T, device=dev)[None, :]
        band = torch.zeros(bq, T, dtype=dt, device=dev).masked_fill_((c < r) | (c > r + W - 1), float("-inf"))
        step = max(1, _GROUP_ELEMS // (k.shape[0] * k.shape[1] * T * d))
        for j0 in range(0, nb, step):
            j1 = min(nb, j0 + step)
            s, t0 = head + j0 * bq, k0 + j0 * bq
            out.append((_rows(q, s, j1 - j0, bq), _rows(k, t0, j1 - j0, T, bq), _rows(v, t0, j1 - j0, T, bq), band,
                        t0, True, [_rows(x, s, j1 - j0, bq) for x in per_query]))
    if tail:
        s = head + nb * bq  # first tail query; key index s + offset
        t0 = s + offset - (W - 1)
        out.append((q[:, :, s:], k[:, :, t0:], v[:, :, t0:], _band_bias(tail, lk - t0, s + offset, t0, W, dt, dev),
                    t0, False, [x[:, :, s:] for x in per_query]))
    return out


def _add_tiles(acc: Tensor, g: Tensor, k0: int, bq: int) -> None:
    """acc (b, hkv, lk, e) += the tile gradients g (nb, b*hkv, T, e) of the tiles starting at key k0 + j*bq.
    Key block p gets slice i (keys [i*bq, (i+1)*bq) of a tile) of tile p - i: for the blocks that all m = T // bq
    slices reach, one strided view of g sums them in one reduction (a strided view because stepping to the next
    tile and back one slice is a positive stride), instead of m read-modify-write passes over acc."""
    nb, _, T, _ = g.shape
    m = T // bq
    if nb < m or m < 2:
        for i in range(0, T, bq):
            _rows(acc, k0 + i, nb, min(bq, T - i), bq).add_(g[:, :, i: i + bq])
        return
    s0, s1, s2, s3 = g.stride()
    inner = nb - m + 1  # blocks p = m-1 .. nb-1 get all m slices
    diag = g.as_strided((inner, m, bq, g.shape[1], g.shape[3]), (s0, s0 - bq * s2, s2, s1, s3),
                        g.storage_offset() + (m - 1) * bq * s2)
    _rows(acc, k0 + (m - 1) * bq, inner, bq).add_(diag.sum(1).transpose(1, 2))
    for i in range(m):  # the first m - 1 and the last m - 1 blocks, slice by slice
        lo = min(nb, max(0, m - 1 - i))  # tiles j < lo: block j + i < m - 1
        if lo:
            _rows(acc, k0 + i * bq, lo, bq).add_(g[:lo, :, i * bq: (i + 1) * bq])
        hi = max(lo, nb - i)  # tiles j >= nb - i: block j + i >= nb
        if hi < nb:
            _rows(acc, k0 + (hi + i) * bq, nb - hi, bq).add_(g[hi:, :, i * bq: (i + 1) * bq])
    if T > m * bq:
        _rows(acc, k0 + m * bq, nb, T - m * bq, bq).add_(g[:, :, m * bq:])


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def banded_forward(q: Tensor, k: Tensor, v: Tensor, W: int, scale: Optional[float], bq: int) -> tuple[Tensor, Tensor]:
    """Sliding-window attention of contiguous q, k, v through the flash forward op -> (out (b, h, lq, d), its
    logsumexp (b, h, lq) in float32 or wider). Also the window part of span_attention."""
    out = q.new_empty(q.shape)
    lse = q.new_empty(q.shape[:3], dtype=lse_dtype(q.dtype))
    for qp, kp, vp, mask, _, _, (op, lp) in _pieces(q, k, v, W, bq, out, lse):
        o, l_ = _FLASH(qp, kp, vp, attn_mask=mask, scale=scale)
        op.copy_(o)
        lp.copy_(l_)
    return out, lse


def banded_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, gout: Tensor, W: int,
                    scale: Optional[float], bq: int, dq: Tensor, dk: Tensor, dv: Tensor) -> None:
    """Gradients of the window keys given the final output and logsumexp (those of the window alone, or of a
    softmax over more keys, e.g. span_attention's): written into dq (every row), added into dk and dv."""
    for qp, kp, vp, mask, k0, tiled, (op, lp, gp, dqp) in _pieces(q, k, v, W, bq, out, lse, gout, dq):
        gq, gk, gv = _FLASH_BWD(gp, qp, kp, vp, op, lp, 0.0, False, attn_mask=mask, scale=scale)
        dqp.copy_(gq)
        if tiled:
            _add_tiles(dk, gk, k0, bq)
            _add_tiles(dv, gv, k0, bq)
        else:
            dk[:, :, k0: k0 + gk.shape[2]] += gk
            dv[:, :, k0: k0 + gv.shape[2]] += gv


def merge_lse(out: Tensor, lse: Tensor, o1: Tensor, l1: Tensor, o2: Tensor, l2: Tensor, any2: Tensor) -> None:
    """Writes into out/lse the softmax over the keys of two flash calls on the same queries, from each call's
    output and logsumexp (o1/l1 may be out/lse themselves); rows where any2 is False have no key in the second
    call (its logsumexp there is not finite) and keep the first. Used by span_attention and se_attention."""
    merged = torch.where(any2, torch.logaddexp(l1, l2), l1)
    w2 = torch.where(any2, torch.exp(l2 - merged), 0.0)[..., None]
    out.copy_(o1.to(lse.dtype) * torch.exp(l1 - merged)[..., None] + o2.to(lse.dtype) * w2)
    lse.copy_(merged)


def gather_rows(kf: Tensor, vf: Tensor, tok: Tensor, n: int, heads: int, d: int) -> tuple[Tensor, Tensor]:
    """Rows `tok` of k and v viewed as (rows, e) (whole blocks or single keys) -> (n, heads, keys, d) each."""
    return kf.index_select(0, tok).view(n, heads, -1, d), vf.index_select(0, tok).view(n, heads, -1, d)


class _BandedAttention(torch.autograd.Function):
    """Sliding-window attention through the CPU flash kernel's forward and backward ops directly: the output and
    the gradients are written into one buffer each (no padding copies, no cat, no zero-filled slice gradients)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, W: int, scale: Optional[float], bq: int) -> Tensor:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = banded_forward(q, k, v, W, scale, bq)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.W, ctx.scale, ctx.bq = W, scale, bq
        return out

    @staticmethod
    def backward(ctx, gout: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        acc = lse.dtype  # bf16/fp16 key gradients are summed over several tiles in float32
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k, dtype=acc), torch.zeros_like(v, dtype=acc)
        banded_backward(q, k, v, out, lse, gout.contiguous(), ctx.W, ctx.scale, ctx.bq, dq, dk, dv)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None


def direct_inputs(q: Tensor, k: Tensor, v: Tensor) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """q, k, v as the direct flash path takes them (cast to the autocast dtype under CPU autocast, as SDPA would
    be), or None where it cannot (torch < 2.5, not CPU, head dims differ, dtypes differ or are not floating)."""
    if not _DIRECT or q.device.type != "cpu" or v.shape[3] != q.shape[3]:
        return None
    if torch.is_autocast_enabled("cpu"):
        dt = torch.get_autocast_dtype("cpu")
        q, k, v = (t.to(dt) if t.dtype != torch.float64 else t for t in (q, k, v))
    if len({q.dtype, k.dtype, v.dtype}) > 1 or q.dtype not in (torch.float32, torch.float64, torch.bfloat16,
                                                                 torch.float16):
        return None
    return q, k, v


def _banded(q: Tensor, k: Tensor, v: Tensor, window: int, scale: Optional[float], gqa: bool) -> Tensor:
    direct = direct_inputs(q, k, v)
    if direct is None:
        return _banded_sdpa(q, k, v, window, scale, gqa)
    with torch.autocast("cpu", enabled=False):
        return _BandedAttention.apply(*direct, window, scale, min(_BQ, q.shape[2]))


def window_attention_torch(
    q: Tensor,  # (b, h, lq, d)
    k: Tensor,  # (b, hkv, lk, d)
    v: Tensor,  # (b, hkv, lk, d)
    window: Optional[int] = None,
    softmax_scale: Optional[float] = None,
) -> Tensor:
    gqa = k.shape[1] != q.shape[1]
    if window is None or window >= k.shape[2]:  # every key the causal mask allows is inside the window
        return _full(q, k, v, softmax_scale, gqa)
    return _banded(q, k, v, window, softmax_scale, gqa)
