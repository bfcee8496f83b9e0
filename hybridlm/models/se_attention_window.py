"""Windowed SE-Attn mixer (`attn.kind = "se_attn_window"`): Attention's parameters and projections, with the op
`ops.span_attention` (kernels/span_attention/) instead of plain windowed attention: a causal sliding window plus
top_k blocks retrieved per query chunk, each chunk scored with the queries that end at its first query.

This is the earlier variant (called se_attn before issue 12; the paper's chunked SE-Attn is se_attention.py). It
is kept because it is causal and streams exactly: generation token by token equals one pass, with a bounded
state when max_memory_blocks is set (docs/design.md §4).

Query chunks are aligned at absolute positions that are multiples of C and memory blocks at multiples of M, so
streaming in pieces of any length reproduces one pass.

Streaming state (every tensor batch-first; a missing key means "empty"):
  "k", "v"             (b, hkv, min(pos, W-1), hd)  the window: last W-1 keys/values (as kind "swa")
  "mem_k", "mem_v"     (b, hkv, n_mem, hd)          the memory bank: keys/values at positions
                                                    [bank_start, pos - W + 1), bank_start a multiple of M
  "mem_sum"            (b, hkv, n_sum, hd) float32  block summaries (mean key) of the complete blocks from
                                                    bank_start on (n_sum = pos // M - bank_start // M)
  "q"                  (b, h, min(pos, C-1), hd)    the last queries, to score the next chunk (causal scoring)
  "sel"                (b, hkv, top_k) long         absolute blocks selected by the chunk containing `pos`
                                                    (present only while pos is inside a chunk)
  "pos"                int                          tokens seen
With top_k = 0 nothing is ever retrieved and only "k", "v", "pos" are kept. `zero_state` builds the empty state.

Bank bound (`max_memory_blocks` = B): the candidates of a chunk are only the B most recent blocks that lie
entirely before its first query's window (one pass applies the same rule, so streaming still equals one pass).
The bank therefore drops its oldest blocks and keeps positions from (J - B) * M on, J = number of blocks wholly
before the window of the current chunk's first query: at most B*M + M + C - 2 keys besides the window.
With B = None the bank keeps every key (memory grows like full attention; compute stays W + k*M per query).
"""
from __future__ import annotations

import torch
from torch import Tensor

from hybridlm import ops
from hybridlm.kernels.span_attention.selection import SCORERS, block_summaries, select_blocks
from hybridlm.models.attention import Attention
from hybridlm.models.config import AttentionConfig
from hybridlm.models.state import device_dtype


class WindowedSpanAttention(Attention):
    def __init__(self, d_model: int, cfg: AttentionConfig, layer_idx: int = 0):
        super().__init__(d_model, cfg, layer_idx)
        if cfg.scorer not in SCORERS:
            raise ValueError(f"model.attn.scorer: unknown se_attn_window scorer {cfg.scorer!r}; use one of "
                             f"{sorted(SCORERS)}")

    @property
    def window(self) -> int | None:
        return self.cfg.window

    def zero_state(self, batch: int, device=None, dtype=None) -> dict:
        """The empty state of `batch` sequences, which forward treats like None: Attention's empty cache and, with
        top_k > 0, an empty memory bank: "mem_k", "mem_v" (batch, hkv, 0, hd), "mem_sum" (batch, hkv, 0, hd)
        float32, "q" (batch, h, 0, hd); no "sel" (kept only while a chunk is unfinished). device and dtype default
        to the parameters'."""
        device, dtype = device_dtype(self, device, dtype)
        state = super().zero_state(batch, device, dtype)
        if self.cfg.top_k > 0:
            empty = lambda heads, dt: torch.zeros(batch, heads, 0, self.head_dim, device=device, dtype=dt)
            hkv = self.num_heads_kv
            state.update(mem_k=empty(hkv, dtype), mem_v=empty(hkv, dtype), mem_sum=empty(hkv, torch.float32),
                         q=empty(self.num_heads, dtype))
        return state

    def _select(self, q: Tensor, summaries: Tensor, n_keys: int, q_prev: Tensor | None) -> Tensor:
        c = self.cfg
        return select_blocks(q, summaries, n_keys, c.window, c.block_size, c.query_chunk, c.top_k, c.scorer,
                             c.max_memory_blocks, q_prev)

    def _op(self, q: Tensor, k: Tensor, v: Tensor, selected: Tensor) -> Tensor:
        c = self.cfg
        return ops.span_attention(q, k, v, selected, c.window, c.block_size, c.query_chunk)  # backend registry

    def attend(self, q: Tensor, k: Tensor, v: Tensor, state: dict) -> tuple[Tensor, dict]:
        """q (b, h, L, hd) at positions pos..pos+L-1; k, v (b, hkv, cached window + L, hd)."""
        c = self.cfg
        W, M, C, K = c.window, c.block_size, c.query_chunk, c.top_k
        b, h, L, hd = q.shape
        pos = state.get("pos", 0)
        if K > 0 and "mem_k" in state:
            k = torch.cat([state["mem_k"].to(k.dtype), k], dim=2)
            v = torch.cat([state["mem_v"].to(v.dtype), v], dim=2)
        lk = k.shape[2]
        start = pos + L - lk  # absolute position of key index 0
        if K > 0 and start % M != 0:
            raise ValueError(f"SE-Attn state: cached keys start at position {start}, not a multiple of "
                             f"block_size={M}; pass a state produced by this layer")
        hkv = k.shape[1]
        empty_sel = q.new_full((b, hkv, K), -1, dtype=torch.long)
        summaries = None
        if K > 0:
            stored = state.get("mem_sum", q.new_zeros(b, hkv, 0, hd, dtype=torch.float32))
            n_sum = stored.shape[2]
            summaries = torch.cat([stored, block_summaries(k[:, :, n_sum * M: (lk // M) * M], M)], dim=2)

        # Part 1: queries finishing a chunk begun in an earlier call reuse that chunk's selection.
        r = min(L, (-pos) % C)
        outs, sel_abs = [], state.get("sel", empty_sel)
        if r > 0:
            rel = torch.where(sel_abs >= 0, sel_abs - start // M, -1)[:, :, None]  # (b, hkv, 1, K)
            outs.append(self._op(q[:, :, :r], k[:, :, : lk - (L - r)], v[:, :, : lk - (L - r)], rel))
        # Part 2: the remaining queries start on a chunk boundary.
        q_all = torch.cat([state["q"].to(q.dtype), q], dim=2) if "q" in state else q
        if r < L:
            n2, nq = L - r, q_all.shape[2]
            if K > 0:
                selected = self._select(q[:, :, r:], summaries, lk, q_all[:, :, max(0, nq - n2 - (C - 1)): nq - n2])
            else:
                selected = q.new_zeros(b, hkv, -(-n2 // C), 0, dtype=torch.long)
            outs.append(self._op(q[:, :, r:], k, v, selected))
            if (pos + L) % C != 0 and K > 0:
                last = selected[:, :, -1]
                sel_abs = torch.where(last >= 0, last + start // M, -1)
        o = torch.cat(outs, dim=2)

        # New state.
        end = pos + L
        win = min(lk, W - 1)
        new_state = {"k": k[:, :, lk - win:], "v": v[:, :, lk - win:]}
        if K > 0:
            new_start = start
            if c.max_memory_blocks is not None:
                chunk_start = (end // C) * C
                n_before = (chunk_start - W + 1) // M
                new_start = max(start, max(0, n_before - c.max_memory_blocks) * M)
            drop = new_start - start
            new_state.update(mem_k=k[:, :, drop: lk - win], mem_v=v[:, :, drop: lk - win],
                             mem_sum=summaries[:, :, drop // M:], q=q_all[:, :, max(0, q_all.shape[2] - (C - 1)):])
            if end % C != 0:
                new_state["sel"] = sel_abs
        return o, new_state
