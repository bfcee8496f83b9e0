from types import SimpleNamespace

import torch

from hybridlm.data.config import DataConfig
from hybridlm.models import AttentionConfig, HybridLM, ModelConfig, SSMConfig

VOCAB = 23


def tiny_model_cfg(pattern: str = "MAM", kind: str = "swa") -> ModelConfig:
    # Mamba-2 layers: nheads = expand*d_model/headdim = 4, headdim 8, d_state 4, conv_dim = 32 + 2*4 = 40
    return ModelConfig(d_model=16, layer_pattern=pattern, vocab_size=VOCAB,
                       ssm=SSMConfig(d_state=4, d_conv=4, expand=2, headdim=8, chunk_size=8),
                       attn=AttentionConfig(kind=kind, num_heads=2, window=5))


def make_module(pattern: str = "MAM", stream_mode: str = "random", seed: int = 0, kind: str = "swa"):
    """Stands in for HybridLMModule: the callbacks only touch .model, .cfg and .initial_state."""
    torch.manual_seed(seed)
    mcfg = tiny_model_cfg(pattern, kind)
    model = HybridLM(mcfg)
    with torch.no_grad():  # non-trivial dt / D so states are not tiny
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return SimpleNamespace(model=model, initial_state=None,
                           cfg=SimpleNamespace(model=mcfg, data=DataConfig(stream_mode=stream_mode)))


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
