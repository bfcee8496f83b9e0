"""HybridLM: embeddings -> pre-norm residual blocks (Mamba-2 or attention mixer, optional MLP; or an MLP-only
F block) -> final RMSNorm -> (tied) LM head. Parameter names follow mamba_ssm's MambaLMHeadModel
(`backbone.layers.{i}.mixer.*`), so official checkpoints map onto it directly."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from hybridlm.models.attention import Attention, S2Attention
from hybridlm.models.config import ModelConfig
from hybridlm.models.mamba2 import Mamba2
from hybridlm.models.mlp import MLPS
from hybridlm.models.norm import RMSNorm
from hybridlm.models.se_attention import SpanExpandedAttention
from hybridlm.models.se_attention_window import WindowedSpanAttention
from hybridlm.models.state import State

# attn.kind -> mixer class. All share Attention's parameters (in_proj, out_proj, optional conv1d), so a
# checkpoint loads whatever kind the model is built with.
ATTENTION_MIXERS = {"full": Attention, "swa": Attention, "se_attn": SpanExpandedAttention,
                    "se_attn_window": WindowedSpanAttention, "s2": S2Attention}


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        kind = cfg.layer_pattern[layer_idx]
        self.kind = kind
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_epsilon)
        if kind == "M":
            self.mixer = Mamba2(cfg.d_model, cfg.ssm, layer_idx)
        elif kind == "F":  # MLP only (NemotronH's "-" layer): self.norm feeds self.mlp; no mixer, no state
            self.mixer = None
        else:
            self.mixer = ATTENTION_MIXERS[cfg.attn.kind](cfg.d_model, cfg.attn, layer_idx)
        mlp = MLPS[cfg.mlp_activation]
        if kind == "F":
            self.mlp = mlp(cfg.d_model, cfg.d_ffn, bias=cfg.mlp_bias)
        elif cfg.d_intermediate > 0:
            self.norm2 = RMSNorm(cfg.d_model, eps=cfg.norm_epsilon)
            self.mlp = mlp(cfg.d_model, cfg.d_intermediate, bias=cfg.mlp_bias)
        else:
            self.mlp = None
        self.residual_in_fp32 = cfg.residual_in_fp32

    def forward(self, x: Tensor, state: Optional[dict]) -> tuple[Tensor, dict]:
        if self.mixer is None:  # an F layer holds no state: its entry is always {} (docs/design.md §2)
            return x + self.mlp(self.norm(x).to(self.norm.weight.dtype)), {}
        if x.shape[1] == 0:  # no tokens: nothing to mix, the state stays as it was (zeros when none was given)
            return x, state if state is not None else self.mixer.zero_state(x.shape[0], x.device)
        # The residual stream may be fp32 while the weights are bf16: mixers see the weights' dtype.
        h, new_state = self.mixer(self.norm(x).to(self.norm.weight.dtype), state)
        x = x + h
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x).to(self.norm2.weight.dtype))
        return x, new_state


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model, eps=cfg.norm_epsilon)


class HybridLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        std = self.cfg.initializer_range
        nn.init.normal_(self.backbone.embedding.weight, std=std)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        # Residual adds in the whole model: one per mixer, one per MLP.
        n_adds = sum((layer.mixer is not None) + (layer.mlp is not None) for layer in self.backbone.layers)
        for layer in self.backbone.layers:
            for m in layer.modules():
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
            # GPT-2 style: output projections into the residual stream scaled by 1/sqrt(#residual adds).
            outs = ([layer.mixer.out_proj] if layer.mixer is not None else []) + (
                [layer.mlp.fc2] if layer.mlp is not None else [])
            for lin in outs:
                nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5))
                lin.weight /= math.sqrt(n_adds)

    def forward(self, input_ids: Tensor, state: Optional[State] = None) -> tuple[Tensor, State]:
        """input_ids: (b, l) -> logits (b, l, vocab_size), final state (one entry per layer)."""
        x = self.backbone.embedding(input_ids)
        if self.cfg.residual_in_fp32 and x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        layer_states = state if state is not None else [None] * len(self.backbone.layers)
        if len(layer_states) != len(self.backbone.layers):
            raise ValueError(f"state has {len(layer_states)} layer entries, "
                             f"model has {len(self.backbone.layers)} layers")
        new_state: State = []
        for layer, s in zip(self.backbone.layers, layer_states):
            x, s_new = layer(x, s)
            new_state.append(s_new)
        x = self.backbone.norm_f(x)
        logits = self.lm_head(x.to(self.lm_head.weight.dtype))
        return logits[..., : self.cfg.vocab_size], new_state

    def zero_state(self, batch: int, device=None, dtype=None) -> State:
        """The explicit initial state of `batch` sequences, one entry per layer: each mixer's `zero_state` (zeros
        for Mamba-2, an empty cache for attention, {} for an F layer). Running from it equals running from None.
        device and dtype default to the parameters' (dtype: the activations'; see each mixer for its entries)."""
        return [{} if layer.mixer is None else layer.mixer.zero_state(batch, device, dtype)
                for layer in self.backbone.layers]

    def mamba_layers(self) -> list[tuple[int, Mamba2]]:
        """(layer index, mixer) of every Mamba-2 layer, in layer order."""
        return [(i, layer.mixer) for i, layer in enumerate(self.backbone.layers) if isinstance(layer.mixer, Mamba2)]

    def attention_layers(self) -> list[tuple[int, Attention]]:
        """(layer index, mixer) of every attention layer (any attn.kind: Attention or a subclass), in layer order."""
        return [(i, layer.mixer) for i, layer in enumerate(self.backbone.layers) if isinstance(layer.mixer, Attention)]

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.backbone.embedding.weight.numel() if non_embedding else n
