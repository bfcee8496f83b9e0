from __future__ import annotations

from dataclasses import dataclass, field

from hybridlm.validation import need

DIAGNOSTICS = ("loss_by_position", "effrem", "state_norms", "passkey", "copy")
COPY_MODES = ("teacher_forced", "greedy")


@dataclass
class EvalConfig:
    """Length-generalization diagnostics (hybridlm/eval). T below is the training length (data.seq_len)."""

    diagnostics: list[str] = field(default_factory=lambda: list(DIAGNOSTICS))
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
    copy_lengths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])  # tokens to copy
    copy_samples: int = 16
    copy_mode: str = "teacher_forced"  # teacher_forced | greedy (token accuracy either way)
    copy_vocab_size: int = 0  # ids of the copy task (separator = V-1); 0: data.synthetic.vocab_size, else the model's
    # loss_by_position also reports the loss restricted to positions whose target id is in [lo, hi) (e.g. the
    # answers of a recall task); empty = off
    target_id_range: list[int] = field(default_factory=list)
    every_n_val: int = 0  # LengthEvalCallback: run at every N-th validation; 0: only at the end of fit
    at_fit_end: bool = True  # LengthEvalCallback: also run when fit ends
    out_dir: str = "length_eval"  # relative paths are under the run directory (trainer.default_root_dir)
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the offending key."""
        bad = [d for d in self.diagnostics if d not in DIAGNOSTICS]
        need(not bad, "eval.diagnostics", f"unknown diagnostic(s) {bad}; choose from {list(DIAGNOSTICS)}")
        for key in ("max_len", "chunk_len", "effrem_T", "state_norm_every", "every_n_val", "copy_vocab_size"):
            need(getattr(self, key) >= 0, f"eval.{key}", f"must be >= 0, got {getattr(self, key)}")
        for key in ("n_sequences", "batch_size", "effrem_points", "passkey_samples", "passkey_digits", "copy_samples"):
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
        need(self.copy_mode in COPY_MODES, "eval.copy_mode",
             f"must be one of {list(COPY_MODES)}, got {self.copy_mode!r}")
        need(self.copy_vocab_size == 0 or self.copy_vocab_size >= 3, "eval.copy_vocab_size",
             f"needs >= 3 ids (filler 0, content, separator), got {self.copy_vocab_size}")
