"""Length-generalization diagnostics (Buitrago Ruiz & Gu 2025): loss by position, EffRem, SSM state norms,
passkey grid and copying accuracy; the SE-Attn scorer diagnostic (block_recall). Pure functions over a HybridLM
and token data, a report runner that writes tables/plots and logs them, and a Lightning callback; eval.attention
swaps the attention kind evaluated with (attention.py)."""
from hybridlm.eval.attention import check_eval_attention, with_eval_attention
from hybridlm.eval.block_recall import captured_qkv, head_recalls
from hybridlm.eval.callback import LengthEvalCallback
from hybridlm.eval.config import EvalConfig
from hybridlm.eval.effrem import default_grid, effrem
from hybridlm.eval.position import LossByPosition, log_bucket_edges, loss_by_position, per_position_loss
from hybridlm.eval.run import run_length_report
from hybridlm.eval.sequences import eval_sequences
from hybridlm.eval.state_norms import StateNorms, state_norms
from hybridlm.eval.streaming import greedy_generate, prefill
from hybridlm.eval.tasks import copy_accuracy, passkey_grid

__all__ = ["EvalConfig", "LengthEvalCallback", "run_length_report", "loss_by_position", "per_position_loss",
           "log_bucket_edges", "LossByPosition", "effrem", "default_grid", "state_norms", "StateNorms",
           "passkey_grid", "copy_accuracy", "eval_sequences", "greedy_generate", "prefill", "with_eval_attention",
           "check_eval_attention", "captured_qkv", "head_recalls"]
