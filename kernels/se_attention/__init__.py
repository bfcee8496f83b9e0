"""Span-Expanded Attention (SE-Attn) as the paper defines it: Nunez, Zancato, Bowman, Golatkar, Xia & Soatto,
"Expansion Span: Combining Fading Memory and Retrieval in Hybrid State Space Models", NeuS 2025,
PMLR 288:570-596. docs/design.md §4 summarises it.

What is implemented, with the paper's numbering:
- Sec. 3.2: Q, K, V (positions already applied) are split into T = ceil(L / M) non-overlapping query chunks of
  M = chunk_size tokens. top_k = 0 gives the paper's "SE-Attn-NoMem" (each chunk alone, causal).
- Sec. 3.3 and its footnote 2: a second split into memory blocks of S = block_size tokens; chunk i may retrieve
  only blocks from "the past", i.e. blocks that end at or before the chunk's first token ((j+1) S <= i M).
- Sec. 3.3, "Compressed Memory Blocks": c_j = mean over the S rows of softmax(Q_j K_j^T / sqrt(d)) V_j,
  non-causal attention inside the block (scorers.block_summaries).
- Sec. 3.3, "Memory Retrieval": R_ij = sum over the chunk's M queries of q_t . c_j; Eq. (4) masks future
  blocks with -inf, applies softmax((R_i + M_i) / sqrt(d_model)) and keeps the top k. The softmax is monotone
  within a row and does not change the top-k, so scorer "paper" returns R_ij (masked).
- Eqs. (1)-(3): each chunk's queries attend, in one softmax, to [the k retrieved blocks' keys/values ; the
  chunk's own keys/values]; retrieved tokens do not attend back ("a form of Cross-Attention", after Eq. 3).
  Causal inside the chunk (a language model); no window across the chunk boundary.
- Sec. 4.2: the paper's settings are S = 32, k = 8, and M drawn at random per layer call from {2048, 4096} for a
  model pretrained at 2048 (Sec. 4.3, "Chunk size"); drawing M is the caller's job, this op takes one M.
- Appendix A: the paper fine-tunes with SE-Attn and evaluates with full attention; Appendix H: cost
  O(d L S + d L M + d L^2 / S).

Where the paper is silent (Sec. 3.1, footnote 1: it describes a single head), this op chooses:
- per-head selection by default (each query head its own blocks; a block summary per query head, since the
  block's own queries enter it; grouped KV heads serve their query heads); `shared=True` ranks blocks once for
  all heads by the sum of the heads' scores, which for "paper" is the single-head formula over all heads'
  channels concatenated;
- scale 1/sqrt(head_dim) wherever the paper writes 1/sqrt(d_model);
- a chunk with fewer than k eligible blocks takes the ones there are (empty slots = -1); a block straddling a
  chunk start is not eligible; a trailing partial block is never eligible; the last chunk may be short;
- no gradient reaches the selection (hard top-k of scores computed under no_grad);
- the scores use all of a chunk's queries, as the paper does, so which blocks query t sees depends on later
  queries of its chunk: a one-pass forward is not reproducible token by token (streamed decoding);
- further scorers beside "paper" (scorers.SCORERS: moba, quest, nsa, oracle) and recall.block_recall to
  measure them against the exact attention mass per block.

Files: torch_ref.py (selection + attention, the reference op), scorers.py (geometry, scorer registry, oracle
mass), recall.py (recall@k diagnostic), naive.py (loops), triton_kernel.py (attention given a selection,
forward and backward; imports triton, so it is imported only once its backend is chosen).

The op `se_attention` below dispatches through the backend registry (hybridlm/ops/registry.py; per-op override
`backend.se_attn` or HYBRIDLM_BACKEND_SE_ATTN): torch = se_attention_torch; triton = the same torch selection,
then attend_selected_triton.
"""
from __future__ import annotations

from torch import Tensor

from hybridlm.kernels.availability import triton_auto_skip, triton_available, triton_tensors
from hybridlm.kernels.se_attention.naive import se_attention_naive
from hybridlm.kernels.se_attention.recall import BlockRecall, block_recall
from hybridlm.kernels.se_attention.scorers import SCORERS, block_attention_mass, block_summaries, register_scorer
from hybridlm.kernels.se_attention.torch_ref import (
    attend_selected,
    block_scores,
    se_attention_torch,
    select_blocks,
    top_blocks,
)
from hybridlm.ops.registry import PRIORITY, Backend, Reason, call, register

__all__ = ["SCORERS", "BlockRecall", "attend_selected", "block_attention_mass", "block_recall", "block_scores",
           "block_summaries", "register_scorer", "se_attention", "se_attention_naive", "se_attention_torch",
           "select_blocks", "top_blocks", "verify_se_attention_triton"]


def se_attention(q: Tensor, k: Tensor, v: Tensor, *, chunk_size: int, block_size: int, top_k: int,
                 scorer: str = "paper", shared: bool = False, scale: float | None = None) -> Tensor:
    """SE-Attn: q (b, h, L, d), k/v (b, hkv, L, d) with positions applied -> o (b, h, L, d); chunks of chunk_size
    queries, each attending to its top_k retrieved blocks of block_size keys and causally to itself
    (semantics in torch_ref.py)."""
    return call("se_attention", q, k, v, chunk_size=chunk_size, block_size=block_size, top_k=top_k, scorer=scorer,
                shared=shared, scale=scale)


def verify_se_attention_triton(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Reason:
    reason = triton_tensors(q, k, v)
    if reason:
        return reason
    if q.shape[-1] > 256:
        return f"head_dim {q.shape[-1]} > 256"
    return None


def _load_triton():
    from hybridlm.kernels.se_attention.triton_kernel import se_attention_triton

    return se_attention_triton


register(Backend("se_attention", "torch", PRIORITY["torch"], load=lambda: se_attention_torch))
register(Backend("se_attention", "triton", PRIORITY["triton"], load=_load_triton, available=triton_available,
                 verify=verify_se_attention_triton, auto_skip=triton_auto_skip))
