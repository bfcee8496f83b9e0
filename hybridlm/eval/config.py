from __future__ import annotations

from dataclasses import dataclass, field

from hybridlm.eval.attention import check_setting
from hybridlm.kernels.se_attention.scorers import SCORERS
from hybridlm.validation import need

# The length diagnostics of Buitrago Ruiz & Gu (2025), the default selection (eval=length_report), and the SE-Attn
# scorer diagnostic (eval=block_recall), which needs attention layers.
LENGTH_DIAGNOSTICS = ("loss_by_position", "effrem", "state_norms", "passkey", "copy")
DIAGNOSTICS = (*LENGTH_DIAGNOSTICS, "block_recall")
COPY_MODES = ("teacher_forced", "greedy")
PASSKEY_HAYSTACKS = ("neutral", "text")


def recall_geometry(seq_len: int, chunk_size: int, block_size: int, top_k: int) -> None:
    """Refuse a block_recall geometry in which no scorer has a choice to make, naming the key: some chunk must have
    more than top_k complete blocks wholly before its first token (chunk i has (i*M) // S of them)."""
    need(chunk_size < seq_len, "eval.recall_chunk_size",
         f"must be < eval.recall_seq_len ({seq_len}) so that a chunk has a past, got {chunk_size}")
    last_start = (-(-seq_len // chunk_size) - 1) * chunk_size
    need(last_start // block_size > top_k, "eval.recall_top_k",
         f"the last chunk (from token {last_start}) has {last_start // block_size} complete past blocks of "
         f"{block_size} tokens; top_k={top_k} must be smaller (or lengthen eval.recall_seq_len / shrink "
         f"eval.recall_block_size) for the selection to be a choice")


@dataclass
class EvalConfig:
    """Length-generalization diagnostics (hybridlm/eval). T below is the training length (data.seq_len)."""

    diagnostics: list[str] = field(default_factory=lambda: list(LENGTH_DIAGNOSTICS))
    # Attention the model is evaluated with (docs/design.md §4): full (the paper's Table 1), same (the kind it was
    # trained with), or any kind of model.attn.kind holding the same parameters. Applies to every diagnostic and,
    # in `python -m hybridlm.evaluate`, to val/loss; not to the validation during training.
    attention: str = "full"
    max_len: int = 0  # tokens per evaluation sequence; 0: 16x the training length
    n_sequences: int = 8  # validation sequences for loss_by_position / effrem / state_norms
    chunk_len: int = 0  # streaming chunk (memory does not grow with max_len); 0: the training length
    batch_size: int = 8  # sequences streamed together
    effrem_T: int = 0  # EffRem_T(t): the prediction position T; 0: the training length
    effrem_grid: list[int] = field(default_factory=list)  # t values in [0, T-1]; empty: effrem_points evenly spaced
    effrem_points: int = 9
    state_norm_every: int = 0  # sample the SSM state norm every k tokens; 0: chunk_len
    passkey_lengths: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])  # context lengths (tokens)
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # needle depth in [0,1]
    passkey_samples: int = 4  # prompts (different keys) per grid cell
    passkey_digits: int = 5
    # neutral: repeated neutral sentences; text: validation text (one window per sample), RULER's NIAH-single style
    passkey_haystack: str = "neutral"
    copy_lengths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])  # tokens to copy
    copy_samples: int = 16
    copy_mode: str = "teacher_forced"  # teacher_forced | greedy (token accuracy either way)
    copy_vocab_size: int = 0  # ids of the copy task (separator = V-1); 0: data.synthetic.vocab_size, else the model's
    # loss_by_position also reports the loss restricted to positions whose target id is in [lo, hi) (e.g. the
    # answers of a recall task); empty = off
    target_id_range: list[int] = field(default_factory=list)
    every_n_val: int = 0  # LengthEvalCallback: run at every N-th validation; 0: only at the end of fit
    at_fit_end: bool = True  # LengthEvalCallback: also run when fit ends
    # block_recall (docs/design.md §4): per attention layer and head, recall@top_k of the oracle's blocks (the
    # exact full-attention mass per block) for each SE-Attn scorer, on n_sequences validation sequences
    recall_scorers: list[str] = field(default_factory=lambda: ["paper", "moba", "quest", "nsa", "oracle"])
    recall_seq_len: int = 0  # tokens per sequence, one pass; 0: 8x the training length (the paper's 8T)
    recall_chunk_size: int = 0  # query chunk M; 0: the training length (the paper's M = T)
    recall_block_size: int = 32  # memory block S (the paper's 32)
    recall_top_k: int = 8  # blocks retrieved per chunk (the paper's 8)
    recall_shared: bool = False  # one selection for all heads of a layer (else per head)
    out_dir: str = "length_eval"  # relative paths are under the run directory (trainer.default_root_dir)
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the offending key."""
        bad = [d for d in self.diagnostics if d not in DIAGNOSTICS]
        need(not bad, "eval.diagnostics", f"unknown diagnostic(s) {bad}; choose from {list(DIAGNOSTICS)}")
        check_setting(self.attention)
        for key in ("max_len", "chunk_len", "effrem_T", "state_norm_every", "every_n_val", "copy_vocab_size",
                    "recall_seq_len", "recall_chunk_size"):
            need(getattr(self, key) >= 0, f"eval.{key}", f"must be >= 0, got {getattr(self, key)}")
        for key in ("n_sequences", "batch_size", "effrem_points", "passkey_samples", "passkey_digits", "copy_samples",
                    "recall_block_size", "recall_top_k"):
            need(getattr(self, key) > 0, f"eval.{key}", f"must be > 0, got {getattr(self, key)}")
        need(all(t >= 0 for t in self.effrem_grid), "eval.effrem_grid",
             f"values must be >= 0, got {list(self.effrem_grid)}")
        need(all(n > 0 for n in self.passkey_lengths), "eval.passkey_lengths", "values must be > 0")
        need(all(0.0 <= d <= 1.0 for d in self.passkey_depths), "eval.passkey_depths",
             f"values must be in [0, 1], got {list(self.passkey_depths)}")
        need(all(n > 0 for n in self.copy_lengths), "eval.copy_lengths", "values must be > 0")
        need(len(self.target_id_range) in (0, 2) and (not self.target_id_range or
                                                      0 <= self.target_id_range[0] < self.target_id_range[1]),
             "eval.target_id_range", f"must be empty or [lo, hi) with 0 <= lo < hi, got {list(self.target_id_range)}")
        need(self.passkey_haystack in PASSKEY_HAYSTACKS, "eval.passkey_haystack",
             f"must be one of {list(PASSKEY_HAYSTACKS)}, got {self.passkey_haystack!r}")
        need(self.copy_mode in COPY_MODES, "eval.copy_mode",
             f"must be one of {list(COPY_MODES)}, got {self.copy_mode!r}")
        need(self.copy_vocab_size == 0 or self.copy_vocab_size >= 3, "eval.copy_vocab_size",
             f"needs >= 3 ids (filler 0, content, separator), got {self.copy_vocab_size}")
        unknown = [n for n in self.recall_scorers if n not in SCORERS]
        need(not unknown, "eval.recall_scorers", f"unknown scorer(s) {unknown}; choose from {sorted(SCORERS)}")
        need(len(self.recall_scorers) > 0 and len(set(self.recall_scorers)) == len(self.recall_scorers),
             "eval.recall_scorers", f"must name each scorer once, at least one, got {list(self.recall_scorers)}")
        if self.recall_seq_len and self.recall_chunk_size:  # else resolved from the training length at run time
            recall_geometry(self.recall_seq_len, self.recall_chunk_size, self.recall_block_size, self.recall_top_k)
