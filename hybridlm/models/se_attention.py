"""Span-Expanded Attention mixer as the paper defines it (`attn.kind = "se_attn"`; Nunez et al., "Expansion Span",
NeuS 2025; docs/design.md §4): Attention's parameters, projections and RoPE, then the op `ops.se_attention`
(kernels/se_attention/): non-overlapping query chunks of M tokens, each attending causally to itself and to the
top_k memory blocks of block_size tokens that its scorer ranks highest among the blocks wholly before it.

Chunk size M (`chunk_size()`): in training, drawn uniformly from attn.chunk_sizes at every call of the layer
(the paper draws from {T, 2T} for a model pretrained at T); in eval, attn.eval_chunk_size (None: the largest of
chunk_sizes, the most context a chunk saw in training). The draw uses torch's global CPU generator, which the
training loop reseeds at every batch from (seed, batch index, rank) (RunStateCallback in
hybridlm/checkpointing/callbacks.py): the sizes are a function of the position in training, so a resumed run
draws the sizes the uninterrupted one drew, and the layer keeps no random state of its own. Under DDP the rank is
part of that seed, so ranks draw independently: each rank's micro-batch may run with another M. Nothing is
exchanged inside the layer, so this is harmless for DDP (like per-rank dropout masks). A single chunk size draws
nothing. `last_chunk_size` holds the M of the latest call.

Streaming state (docs/design.md §2): {"q": (b, h, pos, hd), "k", "v": (b, hkv, pos, hd) every query, key and
value so far (after RoPE); "pos"; "conv" with d_conv > 0}; `zero_state` builds it empty. The paper scores a chunk
with all its queries, so a chunk's selection is known only once the chunk is complete. A piece's outputs are
therefore defined as those of one pass over everything seen so far (the layer reruns the op over the cached prefix
and the piece and keeps the piece's rows). With a fixed M (eval mode, or one chunk size):
- pieces whose boundaries are multiples of M give exactly the one-pass outputs and state;
- other pieces (token-by-token decoding) see, in an unfinished chunk, the selection made by its queries so far:
  causal, but not equal to one pass, where later queries of the chunk take part in the selection.
Cost: the state grows like a full-attention cache and each piece costs one op call over the whole prefix; this is
for evaluating in a few long pieces. The windowed variant (se_attention_window.py) streams exactly and cheaply.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from hybridlm import ops
from hybridlm.models.attention import Attention
from hybridlm.models.config import AttentionConfig
from hybridlm.models.state import device_dtype


class SpanExpandedAttention(Attention):
    def __init__(self, d_model: int, cfg: AttentionConfig, layer_idx: int = 0):
        super().__init__(d_model, cfg, layer_idx)
        self.last_chunk_size: Optional[int] = None

    @property
    def window(self) -> Optional[int]:
        return None  # no sliding window: a chunk sees itself and its retrieved blocks

    @torch.compiler.disable  # a python int chosen at random: the compiled graph is specialised on it
    def chunk_size(self) -> int:
        """M for this call: drawn from attn.chunk_sizes in training (global torch CPU generator), fixed in eval."""
        c = self.cfg
        if not self.training:
            m = c.eval_chunk_size or max(c.chunk_sizes)
        elif len(c.chunk_sizes) == 1:
            m = c.chunk_sizes[0]
        else:
            m = c.chunk_sizes[int(torch.randint(len(c.chunk_sizes), ()))]
        self.last_chunk_size = m
        return m

    def zero_state(self, batch: int, device=None, dtype=None) -> dict:
        """Attention's empty cache plus "q": (batch, num_heads, 0, head_dim). device and dtype default to the
        parameters'."""
        device, dtype = device_dtype(self, device, dtype)
        state = super().zero_state(batch, device, dtype)
        state["q"] = torch.zeros(batch, self.num_heads, 0, self.head_dim, device=device, dtype=dtype)
        return state

    def attend(self, q: Tensor, k: Tensor, v: Tensor, state: dict) -> tuple[Tensor, dict]:
        """q (b, h, L, hd) at positions pos..pos+L-1; k, v (b, hkv, pos + L, hd) cached and new."""
        n_new = q.shape[2]
        if "q" in state:
            q = torch.cat([state["q"].to(q.dtype), q], dim=2)
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"se_attn state: {q.shape[2] - n_new} cached queries but {k.shape[2] - n_new} cached "
                             "keys; pass a state produced by this layer")
        c = self.cfg
        o = ops.se_attention(q, k, v, chunk_size=self.chunk_size(), block_size=c.block_size, top_k=c.top_k,
                             scorer=c.scorer, shared=c.shared)  # backend registry
        return o[:, :, q.shape[2] - n_new:], {"q": q, "k": k, "v": v}
