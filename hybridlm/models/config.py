"""Architecture configs. Field names follow mamba_ssm's `MambaConfig`/`ssm_cfg`/`attn_cfg` where they exist,
so a config.json from an official checkpoint maps onto these with few renames."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hybridlm.kernels.se_attention.scorers import SCORERS as SE_SCORERS
from hybridlm.kernels.span_attention.selection import SCORERS as SE_WINDOW_SCORERS
from hybridlm.validation import need

LAYER_KINDS = {"M": "Mamba-2 mixer", "A": "attention mixer", "F": "MLP-only block of hidden size d_ffn"}
ATTENTION_KINDS = ("full", "swa", "se_attn", "se_attn_window", "s2")
# swiglu: mamba_ssm's GatedMLP, fc1 -> (y, gate), y * silu(gate); relu2: non-gated, relu(fc1 x)^2 (NemotronH)
MLP_ACTIVATIONS = ("swiglu", "relu2")


@dataclass
class SSMConfig:
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    headdim: int = 32
    ngroups: int = 1
    chunk_size: int = 64
    A_init_range: tuple[float, float] = (1.0, 16.0)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit: tuple[float, float] = (0.0, float("inf"))
    conv_bias: bool = True
    bias: bool = False  # in_proj / out_proj bias
    norm_before_gate: bool = False
    d_inner: Optional[int] = None  # None: expand * d_model; NemotronH sets nheads * headdim independently


@dataclass
class AttentionConfig:
    kind: str = "swa"  # full | swa | se_attn | se_attn_window | s2
    num_heads: int = 4
    num_heads_kv: Optional[int] = None  # None: same as num_heads (no grouped KV)
    head_dim: Optional[int] = None  # None: d_model // num_heads
    window: int = 128  # keys each query sees (itself included) for swa / se_attn_window
    rotary_emb_dim: int = 0  # 0: no RoPE (as in NVIDIA's Mamba-2-Hybrid)
    rotary_emb_base: float = 10000.0
    qkv_proj_bias: bool = False
    out_proj_bias: bool = False
    d_conv: int = 0  # mamba_ssm's optional depthwise causal conv over qkv; 0 = off
    # SE-Attn (Nunez et al. 2025, docs/design.md §4), kinds se_attn and se_attn_window: each query chunk
    # retrieves `top_k` memory blocks of `block_size` tokens, ranked by `scorer`.
    block_size: int = 32
    top_k: int = 8
    scorer: str = "paper"  # se_attn: paper | moba | quest | nsa | oracle; se_attn_window: mean_dot | max_dot | ...
    # se_attn (the paper's): in training the chunk size M is drawn per layer call from `chunk_sizes` (the paper:
    # {T, 2T} for a model pretrained at T); in eval M = eval_chunk_size (None: the largest of chunk_sizes).
    chunk_sizes: list[int] = field(default_factory=lambda: [128, 256])
    eval_chunk_size: Optional[int] = None
    shared: bool = False  # one selection for all heads instead of one per head
    # se_attn_window (sliding window + retrieval, streams exactly): chunks of query_chunk queries
    query_chunk: int = 64
    max_memory_blocks: Optional[int] = None  # bound on the streamed memory bank (None: unbounded)
    # S2-Attn (LongLoRA): group size = group_ratio * sequence length, training only
    group_ratio: float = 0.25

    def validate_se(self) -> None:
        """The SE-Attn keys of kind se_attn or se_attn_window (called by ModelConfig.validate)."""
        _positive_int(self.block_size, "block_size")
        need(_is_int(self.top_k) and self.top_k >= 0, "model.attn.top_k",
             f"must be an integer >= 0, got {self.top_k!r}")
        if self.kind == "se_attn_window":
            _positive_int(self.query_chunk, "query_chunk")
            need(self.scorer in SE_WINDOW_SCORERS, "model.attn.scorer",
                 f"unknown scorer {self.scorer!r} for kind se_attn_window; known: {sorted(SE_WINDOW_SCORERS)}")
            return
        # Configs and checkpoints written before issue 12 called the windowed variant se_attn; its scorers say so.
        need(self.scorer not in SE_WINDOW_SCORERS, "model.attn.scorer",
             f"{self.scorer!r} is a scorer of kind se_attn_window, the windowed SE-Attn that was called se_attn "
             f"before issue 12 (so are checkpoints of then with kind se_attn): use model.attn.kind=se_attn_window, "
             f"or a se_attn scorer: {sorted(SE_SCORERS)}")
        need(self.scorer in SE_SCORERS, "model.attn.scorer",
             f"unknown scorer {self.scorer!r} for kind se_attn; known: {sorted(SE_SCORERS)}")
        sizes = self.chunk_sizes
        need(isinstance(sizes, (list, tuple)) and len(sizes) > 0, "model.attn.chunk_sizes",
             f"must be a non-empty list of chunk sizes, got {sizes!r}")
        for m in sizes:
            need(_is_int(m) and m > 0 and m % self.block_size == 0, "model.attn.chunk_sizes",
                 f"every chunk size must be a positive multiple of block_size={self.block_size}, got {list(sizes)}")
        need(len(set(sizes)) == len(sizes), "model.attn.chunk_sizes", f"has repeated sizes: {list(sizes)}")
        m = self.eval_chunk_size
        need(m is None or (_is_int(m) and m > 0 and m % self.block_size == 0), "model.attn.eval_chunk_size",
             f"must be null (the largest of chunk_sizes) or a positive multiple of block_size={self.block_size}, "
             f"got {m!r}")
        need(isinstance(self.shared, bool), "model.attn.shared", f"must be true or false, got {self.shared!r}")

    def check_se_geometry(self, seq_len: int) -> None:
        """se_attn trained on rows of seq_len tokens: with at least one of the chunk sizes, the last chunk of a row
        must have a past of more than top_k whole blocks; otherwise every layer call takes every past block (or a
        chunk is the whole row) and SE-Attn is full attention. Called by the top-level Config, which knows
        data.seq_len."""
        def past_blocks(m: int) -> int:  # whole blocks before the last chunk of a row
            return ((-(-seq_len // m) - 1) * m) // self.block_size

        if any(m < seq_len and past_blocks(m) > self.top_k for m in self.chunk_sizes):
            return
        smallest = min(self.chunk_sizes)
        need(smallest < seq_len, "model.attn.chunk_sizes",
             f"every chunk size ({list(self.chunk_sizes)}) is >= data.seq_len={seq_len}: a row would be one chunk with "
             "nothing to retrieve; use chunk sizes below the training length (the paper: {T, 2T} when fine-tuning "
             "at 4T)")
        need(False, "model.attn.top_k",
             f"with every chunk size ({list(self.chunk_sizes)}), the last chunk of a {seq_len}-token row has at most "
             f"{max(past_blocks(m) for m in self.chunk_sizes if m < seq_len)} whole past blocks of "
             f"{self.block_size}; top_k={self.top_k} would retrieve all of them (full attention): lower top_k or the "
             "chunk sizes, or raise data.seq_len")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _positive_int(x, key: str) -> None:
    need(_is_int(x) and x > 0, f"model.attn.{key}", f"must be a positive integer, got {x!r}")


@dataclass
class ModelConfig:
    d_model: int = 128
    layer_pattern: str = "MMAM"  # one letter per layer: M = Mamba-2, A = attention, F = MLP only (NemotronH)
    vocab_size: int = 257
    d_intermediate: int = 0  # hidden size of the MLP after every mixer (M, A); 0 = no MLP
    pad_vocab_size_multiple: int = 16
    tie_embeddings: bool = True
    norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    initializer_range: float = 0.02
    d_ffn: int = 0  # hidden size of the MLP of each F layer (needed when layer_pattern has an F)
    mlp_activation: str = "swiglu"  # every MLP (after mixers and F layers): one of MLP_ACTIVATIONS
    mlp_bias: bool = False  # fc1 / fc2 bias of every MLP
    ssm: SSMConfig = field(default_factory=SSMConfig)
    attn: AttentionConfig = field(default_factory=AttentionConfig)

    @property
    def n_layer(self) -> int:
        return len(self.layer_pattern)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return ((self.vocab_size + m - 1) // m) * m

    def validate(self) -> None:
        """Raise ValueError naming the offending key; called before any module is built."""
        need(self.d_model > 0, "model.d_model", f"must be positive, got {self.d_model}")
        need(len(self.layer_pattern) > 0, "model.layer_pattern", "must name at least one layer")
        bad = sorted(set(self.layer_pattern) - set(LAYER_KINDS))
        need(not bad, "model.layer_pattern",
             f"unknown layer kind(s) {bad} in {self.layer_pattern!r}; use "
             + ", ".join(f"{k} ({v})" for k, v in LAYER_KINDS.items()))
        need(self.vocab_size > 0, "model.vocab_size", f"must be positive, got {self.vocab_size}")
        need(self.d_intermediate >= 0, "model.d_intermediate", f"must be >= 0, got {self.d_intermediate}")
        need(self.pad_vocab_size_multiple > 0, "model.pad_vocab_size_multiple", "must be positive")
        need(self.d_ffn >= 0, "model.d_ffn", f"must be >= 0, got {self.d_ffn}")
        if "F" in self.layer_pattern:
            need(self.d_ffn > 0, "model.d_ffn", f"must be positive: layer_pattern {self.layer_pattern!r} has F layers")
        need(self.mlp_activation in MLP_ACTIVATIONS, "model.mlp_activation",
             f"unknown MLP activation {self.mlp_activation!r}; use one of {MLP_ACTIVATIONS}")
        s = self.ssm
        if "M" in self.layer_pattern:
            for k in ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size"):
                need(getattr(s, k) > 0, f"model.ssm.{k}", f"must be positive, got {getattr(s, k)}")
            if s.d_inner is not None:
                need(s.d_inner > 0, "model.ssm.d_inner", f"must be positive or null, got {s.d_inner}")
            d_inner = s.expand * self.d_model if s.d_inner is None else s.d_inner
            need(d_inner % s.headdim == 0, "model.ssm.headdim",
                 f"d_inner = {d_inner} (ssm.d_inner, or expand*d_model) is not divisible by headdim = {s.headdim}")
            nheads = d_inner // s.headdim
            need(nheads % s.ngroups == 0, "model.ssm.ngroups",
                 f"nheads = {nheads} is not divisible by ngroups = {s.ngroups}")
            need(0 < s.dt_min <= s.dt_max, "model.ssm.dt_min", f"need 0 < dt_min <= dt_max, got {s.dt_min}, {s.dt_max}")
            need(0 < s.A_init_range[0] <= s.A_init_range[1], "model.ssm.A_init_range",
                 f"need 0 < low <= high, got {s.A_init_range}")
        a = self.attn
        if "A" in self.layer_pattern:
            need(a.kind in ATTENTION_KINDS, "model.attn.kind",
                 f"unknown attention kind {a.kind!r}; use one of {ATTENTION_KINDS}")
            need(a.num_heads > 0, "model.attn.num_heads", f"must be positive, got {a.num_heads}")
            kv = a.num_heads_kv or a.num_heads
            need(kv > 0 and a.num_heads % kv == 0, "model.attn.num_heads_kv",
                 f"num_heads = {a.num_heads} must be a multiple of num_heads_kv = {kv}")
            if a.head_dim is None:
                need(self.d_model % a.num_heads == 0, "model.attn.num_heads",
                     f"d_model = {self.d_model} is not divisible by num_heads = {a.num_heads}; set attn.head_dim")
            else:
                need(a.head_dim > 0, "model.attn.head_dim", f"must be positive, got {a.head_dim}")
            hd = a.head_dim or self.d_model // a.num_heads
            need(a.rotary_emb_dim >= 0 and a.rotary_emb_dim % 2 == 0 and a.rotary_emb_dim <= hd,
                 "model.attn.rotary_emb_dim", f"must be even and in [0, head_dim={hd}], got {a.rotary_emb_dim}")
            need(a.d_conv >= 0, "model.attn.d_conv", f"must be >= 0, got {a.d_conv}")
            if a.kind in ("swa", "se_attn_window"):
                need(a.window > 0, "model.attn.window", f"must be positive for kind={a.kind}, got {a.window}")
            if a.kind in ("se_attn", "se_attn_window"):
                a.validate_se()
            if a.kind == "s2":
                need(0 < a.group_ratio <= 1, "model.attn.group_ratio", f"must be in (0, 1], got {a.group_ratio}")
