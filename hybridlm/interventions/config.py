from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hybridlm.validation import need

INTERVENTIONS = ("none", "random_noise", "fitted_noise", "state_passing", "tbtt")
NOISE = ("random_noise", "fitted_noise")
PASSING = ("state_passing", "tbtt")


@dataclass
class InterventionConfig:
    """Initial-state interventions (Buitrago Ruiz & Gu 2025); see hybridlm/interventions/__init__.py."""

    name: str = "none"  # none | random_noise | fitted_noise | state_passing | tbtt
    sigma: float = 1.0  # random_noise: std of the iid Gaussian initial state
    reset_prob: float = 0.0  # state_passing / tbtt: probability that a row starts from zeros instead
    include_conv: bool = False  # also set the Mamba-2 conv state (noise: sampled; passing: passed)
    include_attention: bool = False  # state_passing / tbtt only: also pass attention key/value windows
    seed: int = 0  # the callbacks' own RNG (noise, resets) is seeded with seed + global rank
    export_path: str | None = None  # fitted_noise: write the statistics here (.pt or .json) at fit end

    def validate(self, data: Any = None, model: Any = None) -> None:
        """Raise ValueError naming the offending key. `data` (DataConfig) and `model` (ModelConfig), when
        given, enable the checks that depend on them (tbtt needs contiguous streams; attention windows)."""
        need(self.name in INTERVENTIONS, "intervention.name",
             f"unknown intervention {self.name!r}; use one of {', '.join(INTERVENTIONS)}")
        need(self.sigma >= 0, "intervention.sigma", f"must be >= 0, got {self.sigma}")
        need(0.0 <= self.reset_prob <= 1.0, "intervention.reset_prob", f"must be in [0, 1], got {self.reset_prob}")
        need(self.export_path is None or str(self.export_path).endswith((".pt", ".json")),
             "intervention.export_path", f"must end in .pt or .json, got {self.export_path!r}")
        if self.include_attention:
            # A key/value cache of random vectors is not a state any prefix produces, and its length would be
            # an arbitrary extra hyperparameter: noise has no sensible attention analogue.
            need(self.name not in NOISE, "intervention.include_attention",
                 f"{self.name} has no attention analogue (random keys/values are not a state any prefix "
                 "produces); use state_passing or tbtt, or set include_attention=false")
            # The cache is one dense tensor for the batch with no per-row mask: one row cannot be emptied alone.
            need(self.reset_prob == 0.0 or self.name not in PASSING, "intervention.reset_prob",
                 "per-row resets cannot empty the attention window of a single row (the cache has no per-row "
                 "mask); set reset_prob=0 or include_attention=false")
        if data is not None and self.name == "tbtt":
            mode = getattr(data, "stream_mode", None)
            need(mode == "contiguous", "data.stream_mode",
                 f"intervention=tbtt needs data.stream_mode=contiguous (row i of batch t must continue row i of "
                 f"batch t-1), got {mode!r}")
        if model is not None and self.include_attention and self.name in PASSING and "A" in model.layer_pattern:
            a = model.attn
            # se_attn (the paper's) retrieves blocks from the whole prefix, so its streamed state is every past key
            # too; se_attn_window with max_memory_blocks=None keeps every key as well.
            unbounded = a.kind in ("full", "se_attn") or (a.kind == "se_attn_window" and a.max_memory_blocks is None)
            what = f"model.attn.kind={a.kind}" + (" with max_memory_blocks=null" if a.kind == "se_attn_window" else "")
            need(not unbounded, "intervention.include_attention",
                 f"{what} caches every past key, so passing it from batch to batch grows memory without bound; "
                 "use a sliding-window kind (swa), se_attn_window with model.attn.max_memory_blocks set, or "
                 "include_attention=false")
