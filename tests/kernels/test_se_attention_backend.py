"""The se_attention op's triton backend through the registry, under the Triton interpreter (see conftest.py): the
paper's SE-Attn layer gives the same outputs and parameter gradients with backend triton as with torch (training,
with a drawn chunk size, and eval), and a call the kernel cannot take (bf16 under the interpreter) falls back to
torch with one log line."""
import logging

import pytest
import torch

from hybridlm import ops
from hybridlm.kernels.se_attention import se_attention_torch
from hybridlm.models import AttentionConfig
from hybridlm.models.se_attention import SpanExpandedAttention
from hybridlm.ops.config import BackendConfig


@pytest.fixture
def reset_backends():
    yield
    ops.configure("torch")


def run(layer, u, backend, seed):
    ops.configure(backend)
    layer.zero_grad()
    torch.manual_seed(seed)  # the same drawn chunk size under both backends
    out, _ = layer(u)
    out.square().sum().backward()
    return out.detach(), layer.last_chunk_size, {n: p.grad.clone() for n, p in layer.named_parameters()}


@pytest.mark.parametrize("training,shared", [(True, False), (False, True)])
def test_layer_matches_torch_backend(training, shared, reset_backends):
    torch.manual_seed(0)
    cfg = AttentionConfig(kind="se_attn", num_heads=4, num_heads_kv=2, chunk_sizes=[8, 16], block_size=4, top_k=2,
                          shared=shared, rotary_emb_dim=4)
    layer = SpanExpandedAttention(32, cfg).train(training)
    u = torch.randn(2, 37, 32)
    before = ops.declined()
    out_t, m_t, grads_t = run(layer, u, "torch", seed=1)
    assert ops.active("se_attention") == "torch"
    out_k, m_k, grads_k = run(layer, u, BackendConfig(se_attn="triton"), seed=1)
    assert ops.active("se_attention") == "triton" and m_k == m_t
    torch.testing.assert_close(out_k, out_t, rtol=1e-4, atol=1e-5)
    assert grads_k.keys() == grads_t.keys() and grads_t
    for name in grads_t:
        torch.testing.assert_close(grads_k[name], grads_t[name], rtol=1e-4, atol=1e-4, msg=name)
    assert not [d for d in ops.declined() - before if d[0] == "se_attention"]  # the kernel ran, no fallback


def test_bf16_call_declines_once_and_falls_back(reset_backends, caplog):
    ops.configure("triton")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 24, 16, generator=g).bfloat16() for n in (2, 1, 1))
    kw = dict(chunk_size=8, block_size=4, top_k=2)
    with caplog.at_level(logging.WARNING, logger="hybridlm.ops.registry"):
        for _ in range(3):
            o = ops.se_attention(q, k, v, **kw)
    torch.testing.assert_close(o, se_attention_torch(q, k, v, **kw))
    lines = [r.getMessage() for r in caplog.records if "se_attention: backend triton declined" in r.getMessage()]
    assert len(lines) == 1 and "bf16" in lines[0]
