"""SE-Attn."""
from kernels.se_attention.naive import se_attention_naive
from kernels.se_attention.recall import BlockRecall, block_recall
from kernels.se_attention.scorers import SCORERS, block_attention_mass, block_summaries, register_scorer
from kernels.se_attention.torch_ref import (
    attend_selected,
    block_scores,
    se_attention_torch,
    select_blocks,
    top_blocks,
)

__all__ = ["SCORERS", "BlockRecall", "attend_selected", "block_attention_mass", "block_recall", "block_scores",
           "block_summaries", "register_scorer", "se_attention_naive", "se_attention_torch", "select_blocks",
           "top_blocks"]
