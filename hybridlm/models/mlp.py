from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class GatedMLP(nn.Module):
    """mamba_ssm's GatedMLP: fc1 -> (y, gate) -> y * silu(gate) -> fc2. Names match its checkpoints."""

    def __init__(self, d_model: int, d_hidden: int, bias: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(d_model, 2 * d_hidden, bias=bias)
        self.fc2 = nn.Linear(d_hidden, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        y, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(y * F.silu(gate))
