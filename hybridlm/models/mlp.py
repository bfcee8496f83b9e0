"""The MLPs of a block (`model.mlp_activation`): after a mixer when d_intermediate > 0, and alone in an F layer.
Both keep mamba_ssm's names fc1 / fc2, so a checkpoint's MLP weights load whichever block holds them."""
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


class Relu2MLP(nn.Module):
    """Non-gated MLP with squared ReLU (NemotronH's `relu2`): fc2(relu(fc1 x)^2)."""

    def __init__(self, d_model: int, d_hidden: int, bias: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_hidden, bias=bias)
        self.fc2 = nn.Linear(d_hidden, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)).square())


# model.mlp_activation -> MLP class
MLPS = {"swiglu": GatedMLP, "relu2": Relu2MLP}
