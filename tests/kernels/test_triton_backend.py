"""The `triton` backend through the registry, under the Triton interpreter (see conftest.py): a Mamba-2 layer and
a sliding-window attention layer give the same outputs and parameter gradients as with the torch backend, and a
call the kernel cannot take (bf16 under the interpreter) falls back to torch with one log line."""
import logging

import pytest
import torch

from hybridlm import ops
from hybridlm.kernels.window_attention.torch_ref import window_attention_torch
from hybridlm.models import AttentionConfig, SSMConfig
from hybridlm.models.attention import Attention
from hybridlm.models.mamba2 import Mamba2


@pytest.fixture
def reset_backends():
    yield
    ops.configure("torch")


def run(layer, u, state, backend):
    ops.configure(backend)
    layer.zero_grad()
    out, new_state = layer(u, state)
    loss = out.square().sum() + sum(t.square().sum() for t in new_state.values() if torch.is_tensor(t))
    loss.backward()
    return out.detach(), {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["mamba2", "swa"])
def test_layer_matches_torch_backend(kind, reset_backends):
    torch.manual_seed(0)
    if kind == "mamba2":
        layer = Mamba2(32, SSMConfig(d_state=16, headdim=8, ngroups=2, chunk_size=16))
        state = {"ssm": torch.randn(2, 8, 8, 16), "conv": torch.randn(2, 3, layer.conv_dim)}
    else:
        layer = Attention(32, AttentionConfig(kind="swa", num_heads=4, num_heads_kv=2, window=9))
        state = {"k": torch.randn(2, 2, 8, 8), "v": torch.randn(2, 2, 8, 8), "pos": 8}
    u = torch.randn(2, 27, 32)
    out_t, grads_t = run(layer, u, state, "torch")
    assert ops.active("ssd_scan") == "torch"
    out_k, grads_k = run(layer, u, state, "triton")
    assert ops.active("ssd_scan") == "triton" and ops.active("window_attention") == "triton"
    torch.testing.assert_close(out_k, out_t, rtol=1e-4, atol=1e-5)
    assert grads_k.keys() == grads_t.keys() and grads_t
    for name in grads_t:
        torch.testing.assert_close(grads_k[name], grads_t[name], rtol=1e-4, atol=1e-4, msg=name)


def test_bf16_call_declines_once_and_falls_back(reset_backends, caplog):
    ops.configure("triton")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 16, dtype=torch.bfloat16) for _ in range(3))
    with caplog.at_level(logging.WARNING, logger="hybridlm.ops.registry"):
        for _ in range(3):
            o = ops.window_attention(q, k, v, 4)
    # the fallback is the torch reference
    torch.testing.assert_close(o, window_attention_torch(q, k, v, 4))
    lines = [r.getMessage() for r in caplog.records if "declined" in r.getMessage()]
    assert len(lines) == 1 and "bf16" in lines[0] and "window_attention" in lines[0]
    assert any(op == "window_attention" and name == "triton" for op, name, _ in ops.declined())
