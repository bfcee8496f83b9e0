"""Windowed SE-Attn (attention kind se_attn_window): a causal sliding window plus k retrieved memory blocks.

The torch op `span_attention_torch`: every query of a chunk attends, in one softmax, to the keys of its chunk's
selected blocks and to its own causal window. Gradients flow into the retrieved keys/values. The blocks are chosen
before, without gradient, by `select_blocks` (selection.py), so a kernel can replace this op alone.

Coordinates (shared with window_attention): k/v hold Lk >= Lq positions and the last Lq belong to the queries,
so query i sits at key index i + (Lk - Lq). Block j is keys [j*M, (j+1)*M). Query chunk n is queries
[n*C, min((n+1)*C, Lq)). Callers that stream keep key index 0 on a block boundary and start q on a chunk
boundary (see models/se_attention_window.py), so these relative coordinates agree with absolute positions.

CPU path (_SpanAttention, when no used block reaches into a chunk's window and the head dims are equal): the one
softmax is computed as two flash calls merged through their logsumexps: the window part is window_attention's
banded path, the retrieved part one call per group of chunks (queries as strided views) against the chunk's
gathered blocks, with a (chunk, head, 1, keys) mask for empty slots. Its backward calls the flash backward op
with the merged output and logsumexp, which gives each part its exact share of the gradients. The earlier
version (kept for other devices and row-masked selections) concatenated per chunk the retrieved keys and a
copy of the window tile with an extra bias channel and, past _MAX_SCORES, recomputed every group of chunks in
backward under checkpointing: forward + backward was 4.5-9x its forward (now ~3.5x); 16K fwd+bwd 577 -> 322 ms,
64K 3324 -> 1240 ms (old vs new interleaved, 2 shared threads).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

from hybridlm.kernels.window_attention import torch_ref as _win
from hybridlm.kernels.window_attention.torch_ref import KeyTiles, window_attention_torch

# Upper bound on the score elements materialised per step; above it, chunks are processed in bounded groups.
_MAX_SCORES = 1 << 22


def span_attention_torch(
    q: Tensor,  # (b, h, Lq, d)
    k: Tensor,  # (b, hkv, Lk, d), Lk >= Lq, h % hkv == 0
    v: Tensor,  # (b, hkv, Lk, dv)
    selected: Tensor,  # (b, hkv, ceil(Lq / C), top_k) long block indices, -1 = empty slot
    window: int,
    block_size: int,
    query_chunk: int,
    softmax_scale: float | None = None,
) -> Tensor:
    """SE-Attn output o (b, h, Lq, dv), same dtype as q.

    Exact semantics (a kernel must match them):
      * query i has key index t_i = i + Lk - Lq; it belongs to chunk n = i // C; query head hq uses kv head
        hq // (h // hkv) (repeat-interleave GQA, as torch SDPA's enable_gqa).
      * its key set is the union of
          - the window  {j : t_i - W < j <= t_i, j >= 0}, and
          - the retrieved keys {s*M + m : s in selected[b, kv, n], s >= 0, 0 <= m < M, s*M + m <= t_i - W},
        one softmax over that set with logits softmax_scale * <q, k> (default 1/sqrt(d)), softmax in float32
        (float64 inputs: float64).
      * the bound s*M + m <= t_i - W keeps retrieved keys strictly before the window, so no key counts twice and
        none lies in the future. `select_blocks` only returns blocks that satisfy it for the whole chunk.
      * requirements: W, M, C >= 1; top_k >= 0 (0 = sliding-window attention); within one (b, kv, n) row the
        indices s >= 0 are distinct and satisfy (s+1)*M <= Lk; -1 slots may sit anywhere in the row.
    Gradients flow to q, k and v (retrieved and window keys alike); `selected` is treated as a constant.
    """
    b, h, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    W, M, C = window, block_size, query_chunk
    g = h // hkv
    n_chunks = -(-lq // C)
    top_k = selected.shape[-1]
    if selected.shape != (b, hkv, n_chunks, top_k):
        raise ValueError(f"selected must be (b, hkv, ceil(Lq/C), top_k) = {(b, hkv, n_chunks, top_k)}, "
                         f"got {tuple(selected.shape)}")
    nb = lk // M
    if top_k == 0 or nb == 0:  # nothing can be retrieved: exactly sliding-window attention
        return window_attention_torch(q, k, v, W, softmax_scale)
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    offset = lk - lq
    dev, dt = q.device, q.dtype
    first_key = torch.arange(n_chunks, device=dev) * C + offset - W  # last key visible to the chunk's first query
    row_masked = bool(((selected >= 0) & ((selected + 1) * M - 1 > first_key[:, None])).any())
    direct = None if row_masked else _win.direct_inputs(q, k, v)
    if direct is not None:
        with torch.autocast("cpu", enabled=False):
            return _SpanAttention.apply(*direct, selected, W, M, C, scale).to(q.dtype)
    # Keys that must not count (front/back padding, empty retrieval slots) carry a large negative bias in an
    # extra key channel, matched by a constant 1 in an extra query channel: their logit is ~ -finfo.max/4 * scale,
    # exp() gives exactly 0 and so do their gradients. The SDPA mask then depends on the row only (the window
    # band), a small broadcast mask, instead of one bool per logit (which SDPA's CPU kernel turns into a float
    # tensor of every logit: 3-4x the cost of the attention itself).
    neg = -torch.finfo(dt).max / 4
    kx = F.pad(k, (0, 1))  # (b, hkv, lk, d + 1), bias 0
    vx = F.pad(v, (0, 1))  # v gets the extra channel too (zero): the fused kernel needs equal head dims
    # Queries (b, hkv, g, n, C, d+1) -> (n, b*hkv, g*C, d+1): a chunk's query heads that share a kv head are rows
    # of one SDPA problem against that kv head's keys.
    qx = F.pad(F.pad(q, (0, 1), value=1.0), (0, 0, 0, n_chunks * C - lq))
    qc = qx.reshape(b, hkv, g, n_chunks, C, d + 1).permute(3, 0, 1, 2, 4, 5).reshape(n_chunks, b * hkv, g * C, d + 1)
    # Window tiles (n, b*hkv, m*C, d+1): chunk n needs keys [n*C + lo, n*C + lo + C + W - 1), lo = offset - W + 1,
    # i.e. key blocks [n, n + m) of C keys from lo on (m*C >= C + W - 1; the extra columns are masked). Padded so
    # every tile is in range (front: before key 0; back: the last chunk's missing queries); views, not copies.
    lo = offset - (W - 1)
    m = -(-(C + W - 1) // C)
    front, back = max(-lo, 0), (n_chunks + m - 1) * C - (lk - lo)
    kp = F.pad(kx[:, :, max(lo, 0):], (0, 0, front, back))
    pad_bias = torch.zeros(kp.shape[2], 1, dtype=dt, device=dev)
    pad_bias[:front], pad_bias[kp.shape[2] - back:] = neg, neg
    kw = KeyTiles.apply(kp + F.pad(pad_bias, (d, 0)), C, m)
    vw = KeyTiles.apply(F.pad(vx[:, :, max(lo, 0):], (0, 0, front, back)), C, m)
    # Retrieved blocks (n, b*hkv, top_k*M, d+1), gathered once for all chunks; empty slots (-1) read an extra
    # "null" block nb of zero keys with the negative bias.
    null_k = F.pad(kx.new_zeros(b * hkv, 1, M, d), (0, 1), value=neg)
    blocks_k = torch.cat([kx[:, :, : nb * M].reshape(b * hkv, nb, M, d + 1), null_k], dim=1)
    blocks_v = torch.cat([vx[:, :, : nb * M].reshape(b * hkv, nb, M, dv + 1), vx.new_zeros(b * hkv, 1, M, dv + 1)],
                         dim=1)
    sel = torch.where(selected >= 0, selected, nb).permute(2, 0, 1, 3)  # (n, b, hkv, top_k)
    flat = (sel + (torch.arange(b * hkv, device=dev) * (nb + 1)).view(1, b, hkv, 1)).reshape(-1)
    kb = blocks_k.view(-1, M * (d + 1)).index_select(0, flat).view(n_chunks, b * hkv, top_k * M, d + 1)
    vb = blocks_v.view(-1, M * (dv + 1)).index_select(0, flat).view(n_chunks, b * hkv, top_k * M, dv + 1)
    # A used block must lie wholly before the window of its chunk's first query for the row-independent mask
    # (select_blocks only returns such blocks); otherwise its keys are masked row by row (the general path).
    geometry = (W, M, C, m, offset, scale, g, row_masked)

    # Chunks are processed in groups whose concatenated keys and values (b*hkv*keys*(d + dv) per chunk) and, on the
    # general path, mask (b*h*C*keys per chunk) stay within ~_MAX_SCORES elements. With several groups and
    # gradients on, each group is recomputed in backward instead of keeping its keys: otherwise training memory
    # grows with (number of chunks) x (top_k*M + C + W - 1) x (d + dv), which short query chunks make large. The
    # groups' inputs come from one split per tensor, whose backward assembles the full gradient once (slicing per
    # group would allocate a sequence-sized gradient per group: quadratic time at long lengths).
    keys_per_chunk = top_k * M + m * C
    step = max(1, _MAX_SCORES // max(1, b * keys_per_chunk * max(h * C if row_masked else 0, hkv * (d + dv))))
    recompute = step < n_chunks and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    pieces = zip(*(t.split(step, dim=0) for t in (qc, kb, vb, kw, vw, sel)))
    outs = []
    for i, (qg, kbg, vbg, kwg, vwg, selg) in enumerate(pieces):
        args = (qg, kbg, vbg, kwg, vwg, selg, i * step, geometry)
        if recompute:
            outs.append(torch.utils.checkpoint.checkpoint(_span_chunk_group, *args, use_reentrant=False))
        else:
            outs.append(_span_chunk_group(*args))
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)  # (n, b*hkv, g*C, dv+1)
    o = o[..., :dv].reshape(n_chunks, b, hkv, g, C, dv).permute(1, 2, 3, 0, 4, 5).reshape(b, h, n_chunks * C, dv)
    return o[:, :, :lq].to(q.dtype)


def _span_chunk_group(qc: Tensor, kb: Tensor, vb: Tensor, kw: Tensor, vw: Tensor, sel: Tensor, first: int,
                      geometry: tuple) -> Tensor:
    """Output of chunks first .. first + n - 1 (see span_attention_torch): qc (n, b*hkv, g*C, d+1), retrieved
    keys/values kb, vb (n, b*hkv, top_k*M, d+1), window tiles kw, vw (n, b*hkv, m*C, d+1), sel (n, b, hkv, top_k)
    block ids (nb = empty) -> (n, b*hkv, g*C, dv+1)."""
    W, M, C, m, offset, scale, g, row_masked = geometry
    n, b, hkv, top_k = sel.shape
    dev = qc.device
    # Window band: query row r of a chunk sees tile column c iff r <= c <= r + W - 1 (padding: by its bias).
    r = torch.arange(C, device=dev)[:, None]
    c = torch.arange(m * C, device=dev)[None, :]
    band = (c >= r) & (c <= r + W - 1)  # (C, m*C)
    if row_masked:
        # Retrieved key j is visible to the query at key index t iff j <= t - W (empty slots: by their bias).
        key_idx_b = (sel[..., None] * M + torch.arange(M, device=dev)).flatten(3)  # (n, b, hkv, top_k*M)
        t = (torch.arange(n, device=dev) + first)[:, None] * C + torch.arange(C, device=dev) + offset  # (n, C)
        mask_b = key_idx_b[:, :, :, None, :] <= t[:, None, None, :, None] - W  # (n, b, hkv, C, top_k*M)
        mask = torch.cat([mask_b, band.expand(n, b, hkv, C, m * C)], dim=4)
        # One row per (query head of the kv group, query of the chunk): the mask repeats over the g query heads.
        mask = mask[:, :, :, None].expand(-1, -1, -1, g, -1, -1).reshape(n, b * hkv, g * C, -1)
    else:
        mask = torch.cat([band.new_ones(C, top_k * M), band], dim=1).repeat(g, 1)  # (g*C, keys), broadcast
    keys, vals = torch.cat([kb, kw], dim=2), torch.cat([vb, vw], dim=2)  # (n, b*hkv, top_k*M + m*C, d+1)
    return F.scaled_dot_product_attention(qc, keys, vals, attn_mask=mask, scale=scale)


def _retrieved_groups(q: Tensor, k: Tensor, sel: Tensor, M: int, C: int, *per_query: Tensor):
    """The flash calls of the retrieved keys, in groups of chunks: (q view (n, b*h, R, d), row index of each
    retrieved block into k viewed as (b*hkv*lk/M, M*d) (or, when M does not divide lk, of each retrieved key into k
    viewed as (b*hkv*lk, d)), mask (n, b*h, 1, top_k*M) (0, or -inf on
    empty slots), rows with any key (n, b*h, 1), per-query views (n, b*h, R[, e])). A group's gathered keys and
    values stay within ~_MAX_SCORES elements; the ragged last chunk (R < C rows) is a group of its own."""
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = h // hkv
    top_k = sel.shape[-1]
    full = lq // C
    step = max(1, _win._GROUP_ELEMS // (b * hkv * top_k * M * d))
    ranges = [(s, min(full, s + step), C) for s in range(0, full, step)]
    if lq % C:
        ranges.append((full, full + 1, lq % C))
    per_block = lk % M == 0  # k viewed as (b*hkv*lk/M, M*d) rows of whole blocks: gather blocks, not tokens
    base = torch.arange(b * hkv, device=q.device).view(1, b * hkv, 1) * (lk // M if per_block else lk)
    for c0, c1, R in ranges:
        sg = sel[:, :, c0:c1].permute(2, 0, 1, 3).reshape(c1 - c0, b * hkv, top_k)
        valid = sg >= 0
        if per_block:
            tok = sg.clamp(min=0) + base  # (n, b*hkv, top_k)
        else:
            tok = (sg.clamp(min=0) * M + base)[..., None] + torch.arange(M, device=q.device)  # (n, b*hkv, top_k, M)
        mask = torch.zeros(valid.shape + (M,), dtype=q.dtype, device=q.device)
        mask.masked_fill_(~valid[..., None], float("-inf"))
        mask = mask.view(c1 - c0, b * hkv, 1, top_k * M).repeat_interleave(g, dim=1)
        any_ = valid.any(-1).repeat_interleave(g, dim=1)[..., None]
        yield (_win._rows(q, c0 * C, c1 - c0, R, C), tok.reshape(-1), mask, any_,
               [_win._rows(x, c0 * C, c1 - c0, R, C) for x in per_query])


class _SpanAttention(torch.autograd.Function):
    """span_attention_torch on CPU through the flash kernel's forward and backward ops: the window part is
    window_attention's banded path, the retrieved part one call per group of chunks against its gathered blocks,
    and the two are merged through their logsumexps. The backward op, given the merged output and logsumexp,
    gives each part's exact share of the gradients, so neither part is recomputed nor are keys concatenated."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, sel: Tensor, W: int, M: int, C: int, scale: float) -> Tensor:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        bq = min(_win._BQ, q.shape[2])
        out, lse = _win.banded_forward(q, k, v, W, scale, bq)
        d = q.shape[3]
        e = d * M if k.shape[2] % M == 0 else d
        kf, vf = k.view(-1, e), v.view(-1, e)
        for qg, tok, mask, any_, (og, lg) in _retrieved_groups(q, k, sel, M, C, out, lse):
            kb, vb = _win.gather_rows(kf, vf, tok, mask.shape[0], k.shape[0] * k.shape[1], d)
            o_r, l_r = _FLASH(qg, kb, vb, attn_mask=mask, scale=scale)
            _win.merge_lse(og, lg, og, lg, o_r, l_r, any_)
        ctx.save_for_backward(q, k, v, sel, out, lse)
        ctx.geometry = W, M, C, scale, bq
        return out

    @staticmethod
    def backward(ctx, gout: Tensor):
        q, k, v, sel, out, lse = ctx.saved_tensors
        W, M, C, scale, bq = ctx.geometry
        gout = gout.contiguous()
        acc = lse.dtype  # bf16/fp16 gradients are summed in float32, as they come from several calls
        dq, dk, dv = (torch.empty_like(q, dtype=acc), torch.zeros_like(k, dtype=acc), torch.zeros_like(v, dtype=acc))
        _win.banded_backward(q, k, v, out, lse, gout, W, scale, bq, dq, dk, dv)
        d = q.shape[3]
        e = d * M if k.shape[2] % M == 0 else d
        kf, vf, dkf, dvf = k.view(-1, e), v.view(-1, e), dk.view(-1, e), dv.view(-1, e)
        for qg, tok, mask, _, (og, lg, gg, dqg) in _retrieved_groups(q, k, sel, M, C, out, lse, gout, dq):
            kb, vb = _win.gather_rows(kf, vf, tok, mask.shape[0], k.shape[0] * k.shape[1], d)
            gq, gk, gv = _FLASH_BWD(gg, qg, kb, vb, og, lg, 0.0, False, attn_mask=mask, scale=scale)
            dqg.add_(gq)
            # empty slots read real keys but get exactly zero gradient
            dkf.index_add_(0, tok, gk.reshape(-1, e).to(acc))
            dvf.index_add_(0, tok, gv.reshape(-1, e).to(acc))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


_FLASH, _FLASH_BWD = _win._FLASH, _win._FLASH_BWD
