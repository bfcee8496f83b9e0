"""`tbtt` (truncated backpropagation through time): the mechanics of state passing, but the data module yields
consecutive segments (data.stream_mode=contiguous), so row i of batch t continues row i of batch t-1 in the same
token stream and the passed (detached) final state is that stream's true prefix state. Gradients stop at segment
boundaries because the passed state is detached. The contiguous stream is endless (batch k is a function of k),
so nothing is reset at epoch boundaries; should the data ever break a stream, the state is handed on exactly as
in state_passing.
"""
from __future__ import annotations

from hybridlm.interventions.base import data_config
from hybridlm.interventions.state_passing import StatePassingCallback


class TBTTCallback(StatePassingCallback):
    """StatePassingCallback whose `setup` refuses a run whose data is not in contiguous stream mode."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if data_config(trainer, pl_module) is None:
            raise ValueError("data.stream_mode: intervention=tbtt needs data.stream_mode=contiguous, but no data "
                             "config was found to check (neither pl_module.cfg.data nor trainer.datamodule.cfg)")
        super().setup(trainer, pl_module, stage)
