"""Norm of each Mamba-2 layer's SSM state against position (streaming).

The state is sampled after every `every` tokens (the streaming chunk length; the state at a position does not
depend on how the sequence is chunked) and at the end. Norm: Frobenius norm of the (nheads, headdim, d_state)
state of one sequence, averaged over sequences. A state whose norm keeps growing beyond the training length is
in territory the model never saw (the unexplored-states hypothesis).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hybridlm.eval.streaming import chunks, model_device


@dataclass
class StateNorms:
    positions: list[int]  # tokens consumed at each sample
    layers: list[int]  # indices of the Mamba-2 layers
    norms: Tensor  # (len(layers), len(positions)) float64

    def rows(self) -> list[list]:
        return [[layer, pos, self.norms[i, j].item()] for i, layer in enumerate(self.layers)
                for j, pos in enumerate(self.positions)]


@torch.no_grad()
def state_norms(model, sequences: Tensor, every: int, batch_size: int = 8) -> StateNorms:
    layers = [i for i, _ in model.mamba_layers()]
    if not layers:
        raise ValueError("state_norms: the model has no Mamba-2 layer")
    n, L = sequences.shape
    positions = [min(s + every, L) for s in range(0, L, every)]
    total = torch.zeros(len(layers), len(positions), dtype=torch.float64)
    device = model_device(model)
    for rows in sequences.split(batch_size):
        rows, state = rows.to(device), None
        for j, (_, piece) in enumerate(chunks(rows, every)):
            _, state = model(piece, state)
            for i, layer in enumerate(layers):
                total[i, j] += state[layer]["ssm"].double().flatten(1).norm(dim=1).sum().cpu()
    return StateNorms(positions=positions, layers=layers, norms=total / n)
