"""Moving a state dict into a model (every key and shape checked first) and out of one (tied parameters once)."""
from __future__ import annotations

import torch
from torch import nn

from hybridlm.checkpointing.io import CheckpointError
from hybridlm.convert.base import StateDict


def load_state_dict_checked(model: nn.Module, sd: StateDict, source: str = "checkpoint") -> None:
    """Load sd into model after checking every key and shape; all problems are reported in one error.
    A parameter shared under several names (tied embeddings) needs only one of them in sd."""
    expected = model.state_dict()
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    aliases = {name: group for group in groups.values() if len(group) > 1 for name in group}
    problems = []
    for key, value in expected.items():
        if key not in sd:
            if not any(a in sd for a in aliases.get(key, ())):
                problems.append(f"missing from the checkpoint: {key} {tuple(value.shape)}")
        elif sd[key].shape != value.shape:
            problems.append(f"shape mismatch: {key}: checkpoint {tuple(sd[key].shape)} vs model {tuple(value.shape)}")
    problems += [f"unexpected in the checkpoint: {k} {tuple(v.shape)}" for k, v in sd.items() if k not in expected]
    for group in {tuple(g) for g in aliases.values()}:
        present = [k for k in group if k in sd]
        if len(present) > 1 and not all(torch.equal(sd[present[0]], sd[k]) for k in present[1:]):
            problems.append(f"tied parameters differ in the checkpoint: {present}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model ({len(problems)} problem(s)):\n  "
                              + "\n  ".join(problems))
    # strict=False only because tied aliases may be absent; every key and shape was checked above.
    model.load_state_dict(sd, strict=False)


def cpu_state_dict(model: nn.Module) -> StateDict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def drop_tied(sd: StateDict, model: nn.Module) -> StateDict:
    """One name per tied parameter of model (safetensors refuses tensors that share memory; loaders re-tie)."""
    seen, out = set(), {}
    named = dict(model.named_parameters(remove_duplicate=False))
    for key, value in sd.items():
        p = named.get(key)
        if p is not None and id(p) in seen:
            continue
        if p is not None:
            seen.add(id(p))
        out[key] = value
    return out
