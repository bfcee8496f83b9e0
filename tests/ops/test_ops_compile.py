"""Dispatch through the registry stays out of torch.compile's way: a Mamba-2 layer traces with no graph break,
and compiled (aot_eager: fast; inductor: the real CPU compiler, slow) matches eager in outputs and gradients."""
import pytest
import torch

from hybridlm import ops
from hybridlm.models import SSMConfig
from hybridlm.models.mamba2 import Mamba2


def layer_and_input():
    torch.manual_seed(0)
    layer = Mamba2(32, SSMConfig(d_state=16, headdim=8, ngroups=2, chunk_size=8))
    return layer, torch.randn(2, 21, 32), {"ssm": torch.randn(2, 8, 8, 16)}


def outputs_and_grads(fn, layer, u, state):
    layer.zero_grad()
    out, new_state = fn(u, state)
    (out.square().sum() + new_state["ssm"].square().sum()).backward()
    return out.detach(), new_state["ssm"].detach(), [p.grad.clone() for p in layer.parameters()]


def test_no_graph_break_in_mamba2_layer():
    ops.configure()
    layer, u, state = layer_and_input()
    explanation = torch._dynamo.explain(layer)(u, state)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_layer_matches_eager(backend):
    ops.configure()
    layer, u, state = layer_and_input()
    eager = outputs_and_grads(layer, layer, u, state)
    torch._dynamo.reset()
    compiled = outputs_and_grads(torch.compile(layer, backend=backend, fullgraph=False), layer, u, state)
    for a, r in zip(compiled[:2], eager[:2]):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
    for a, r in zip(compiled[2], eager[2]):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)
