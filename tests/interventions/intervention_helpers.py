from types import SimpleNamespace

import torch
from helpers import tiny_model, tiny_model_config

from hybridlm.data.config import DataConfig
from hybridlm.models import AttentionConfig, ModelConfig

VOCAB = 23
# Mamba-2 layers: nheads = expand*d_model/headdim = 4, headdim 8, d_state 4, conv_dim = 32 + 2*4 = 40
SIZES = dict(d_model=16, vocab_size=VOCAB, d_state=4)


def tiny_model_cfg(pattern: str = "MAM", kind: str = "swa") -> ModelConfig:
    return tiny_model_config(pattern, attn=AttentionConfig(kind=kind, num_heads=2, window=5), **SIZES)


def make_module(pattern: str = "MAM", stream_mode: str = "random", seed: int = 0, kind: str = "swa"):
    """Stands in for HybridLMModule: the callbacks only touch .model, .cfg and .initial_state. The model's dt / D
    are perturbed so states are not tiny."""
    model = tiny_model(pattern, seed=seed, attn=AttentionConfig(kind=kind, num_heads=2, window=5), **SIZES)
    return SimpleNamespace(model=model, initial_state=None,
                           cfg=SimpleNamespace(model=model.cfg, data=DataConfig(stream_mode=stream_mode)))


def trainer_stub(rank: int = 0, tmp_path=None, world_size: int = 1):
    return SimpleNamespace(global_rank=rank, world_size=world_size, is_global_zero=rank == 0, datamodule=None,
                           default_root_dir=str(tmp_path) if tmp_path else ".")


def step(cb, module, ids, batch_idx=0, grad=False):
    """One training step as Lightning runs it: batch start hook, forward from the initial state, batch end hook.
    Returns (initial state used, final state)."""
    batch = {"input_ids": ids, "labels": ids}
    cb.on_train_batch_start(None, module, batch, batch_idx)
    init = module.initial_state
    module.initial_state = None
    with torch.set_grad_enabled(grad):
        _, final = module.model(ids, init)
    cb.on_train_batch_end(None, module, {"loss": None, "final_state": final}, batch, batch_idx)
    return init, final
