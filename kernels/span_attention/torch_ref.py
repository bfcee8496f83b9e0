"""Windowed SE-Attn (attention kind se_attn_window): a causal sliding window plus k retrieved memory blocks.

The torch op `span_attention_torch`: every query of a chunk attends, in one softmax, to the keys of its chunk's
selected blocks and to its own causal window. Gradients flow into the retrieved keys/values. The blocks are chosen
before, without gradient, by `select_blocks` (selection.py), so a kernel can replace this op alone.

Coordinates (shared with window_attention): k/v hold Lk >= Lq positions and the last Lq belong to the queries,
so query i sits at key index i + (Lk - Lq). Block j is keys [j*M, (j+1)*M). Query chunk n is queries
[n*C, min((n+1)*C, Lq)). Callers that stream keep key index 0 on a block boundary and start q on a chunk
boundary (see models/se_attention_window.py), so these relative coordinates agree with absolute positions.
"""
from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import Tensor

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
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    offset = lk - lq
    # Window tiles: chunk n needs keys [n*C + lo, n*C + lo + C + W - 1) with lo = offset - W + 1. Pad so every tile
    # is in range (front: before key 0; back: the last chunk's missing queries); tiles are unfolded views of these.
    lo = offset - (W - 1)
    back = n_chunks * C - lq
    pad = (0, 0, max(-lo, 0), back)
    kp = torch.nn.functional.pad(k[:, :, max(lo, 0):], pad)
    vp = torch.nn.functional.pad(v[:, :, max(lo, 0):], pad)
    qc = torch.nn.functional.pad(q, (0, 0, 0, back)).view(b, hkv, g, n_chunks, C, d)
    geometry = (W, M, C, lo, offset, scale)

    # Chunks are processed in groups whose logits (b, h, C, keys) and gathered keys and values (b, hkv, keys, d + dv)
    # each stay within ~_MAX_SCORES elements. With several groups and gradients on, each group is recomputed in
    # backward instead of keeping its gathered keys: otherwise training memory grows with
    # (number of chunks) x (top_k*M + C + W - 1) x (d + dv), which short query chunks make large.
    keys_per_chunk = (top_k * M if top_k > 0 and lk // M > 0 else 0) + C + W - 1
    step = max(1, _MAX_SCORES // max(1, b * keys_per_chunk * max(h * C, hkv * (d + dv))))
    recompute = step < n_chunks and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs = []
    for s in range(0, n_chunks, step):
        e = min(n_chunks, s + step)
        args = (qc[:, :, :, s:e], k, v, kp, vp, selected[:, :, s:e], s, geometry)
        if recompute:
            outs.append(torch.utils.checkpoint.checkpoint(_span_chunk_group, *args, use_reentrant=False))
        else:
            outs.append(_span_chunk_group(*args))
    o = torch.cat(outs, dim=3).reshape(b, h, n_chunks * C, dv)
    return o[:, :, :lq].to(q.dtype)


def _span_chunk_group(qc: Tensor, k: Tensor, v: Tensor, kp: Tensor, vp: Tensor, selected: Tensor, first: int,
                      geometry: tuple) -> Tensor:
    """Output of chunks first .. first + n - 1 (see span_attention_torch): qc (b, hkv, g, n, C, d), selected
    (b, hkv, n, top_k) -> (b, hkv, g, n, C, dv). kp/vp are the padded keys/values the window tiles are cut from."""
    W, M, C, lo, offset, scale = geometry
    b, hkv, _, n, _, d = qc.shape
    dv = v.shape[3]
    top_k = selected.shape[-1]
    dev = qc.device
    span = C + W - 1
    # This group's window tiles, (b, hkv, n, span, d), unfolded from its own rows only (a slice of the unfolded
    # whole would cost a full-size gradient of the unfolded whole in backward, per group).
    rows = slice(first * C, (first + n - 1) * C + span)
    kw = kp[:, :, rows].unfold(2, span, C).transpose(-1, -2)
    vw = vp[:, :, rows].unfold(2, span, C).transpose(-1, -2)
    # Window mask: query row r of a chunk sees tile column c iff r <= c <= r + W - 1, and the key exists.
    r = torch.arange(C, device=dev)[:, None]
    c = torch.arange(span, device=dev)[None, :]
    key_idx_w = ((torch.arange(n, device=dev) + first) * C + lo)[:, None, None] + c  # (n, 1, span)
    mask_w = (c >= r) & (c <= r + W - 1) & (key_idx_w >= 0)  # (n, C, span)
    mask_w = mask_w[None, None].expand(b, hkv, -1, -1, -1)

    nb = k.shape[2] // M
    if top_k > 0 and nb > 0:
        sel = selected.clamp(min=0)
        bi = torch.arange(b, device=dev)[:, None, None, None]
        hi = torch.arange(hkv, device=dev)[None, :, None, None]
        kb = k[:, :, : nb * M].reshape(b, hkv, nb, M, d)[bi, hi, sel].flatten(3, 4)  # (b, hkv, n, top_k*M, d)
        vb = v[:, :, : nb * M].reshape(b, hkv, nb, M, dv)[bi, hi, sel].flatten(3, 4)
        key_idx_b = (sel[..., None] * M + torch.arange(M, device=dev)).flatten(3, 4)  # (b, hkv, n, top_k*M)
        slot_ok = (selected >= 0)[..., None].expand(-1, -1, -1, -1, M).flatten(3, 4)
        t = (torch.arange(n, device=dev) + first)[:, None] * C + torch.arange(C, device=dev) + offset  # (n, C)
        mask_b = slot_ok[:, :, :, None, :] & (key_idx_b[:, :, :, None, :] <= t[None, None, :, :, None] - W)
        keys, vals = torch.cat([kb, kw], dim=3), torch.cat([vb, vw], dim=3)
        mask = torch.cat([mask_b, mask_w], dim=4)  # (b, hkv, n, C, top_k*M + span)
    else:
        keys, vals, mask = kw, vw, mask_w
    logits = torch.einsum("bhgncd,bhnkd->bhgnck", qc, keys)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) * scale
    logits = logits.masked_fill(~mask[:, :, None], float("-inf"))  # every row keeps its own key
    p = torch.softmax(logits, dim=-1).to(vals.dtype)
    return torch.einsum("bhgnck,bhnkd->bhgncd", p, vals)
