"""Training interventions on the initial state (Buitrago Ruiz & Gu 2025, "Understanding and Improving Length
Generalization in Recurrent Models"), as Lightning callbacks built from an InterventionConfig:

    none           -> no callback (zero initial state)
    random_noise   -> RandomNoiseCallback   (noise.py)
    fitted_noise   -> FittedNoiseCallback   (noise.py)
    state_passing  -> StatePassingCallback  (state_passing.py)
    tbtt           -> TBTTCallback          (tbtt.py; needs data.stream_mode=contiguous)
"""
from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from hybridlm.interventions.base import InitialStateCallback
from hybridlm.interventions.config import InterventionConfig
from hybridlm.interventions.noise import FittedNoiseCallback, RandomNoiseCallback, RunningMoments
from hybridlm.interventions.state_passing import StatePassingCallback
from hybridlm.interventions.tbtt import TBTTCallback

CALLBACKS = {
    "random_noise": RandomNoiseCallback,
    "fitted_noise": FittedNoiseCallback,
    "state_passing": StatePassingCallback,
    "tbtt": TBTTCallback,
}


def build_intervention(cfg: InterventionConfig) -> Callback | None:
    """The callback implementing cfg.name, or None for "none". Raises ValueError on an invalid config."""
    cfg.validate()
    return None if cfg.name == "none" else CALLBACKS[cfg.name](cfg)


__all__ = ["build_intervention", "InterventionConfig", "InitialStateCallback", "RandomNoiseCallback",
           "FittedNoiseCallback", "StatePassingCallback", "TBTTCallback", "RunningMoments"]
