"""`compile=true`: training steps run the model's forward through torch.compile, and a compiled step gives the
eager step's loss and gradients (two steps, the second from the first one's final state, as state passing runs
them) on a tiny hybrid model. aot_eager traces and runs the same graphs without generating code (seconds);
inductor, the compiler `compile=true` uses, generates C++ and takes minutes on a 2-core machine (slow)."""
import pytest
import torch

from hybridlm import ops
from hybridlm.config import to_config
from hybridlm.lit import HybridLMModule
from hybridlm.models.state import detach_state

VOCAB = 40
# training_step outside a Trainer: self.log has no trainer to log to and says so
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


def module(compile_: bool) -> HybridLMModule:
    cfg = to_config({"compile": compile_, "model": {
        "d_model": 32, "layer_pattern": "MA", "vocab_size": VOCAB,
        "ssm": {"d_state": 16, "headdim": 16, "chunk_size": 8}, "attn": {"kind": "swa", "window": 6}}})
    torch.manual_seed(0)
    return HybridLMModule(cfg)


def two_steps(m: HybridLMModule) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    out = []
    ids = torch.randint(0, VOCAB, (2, 3, 25), generator=torch.Generator().manual_seed(1))
    for i in range(2):
        m.zero_grad()
        res = m.training_step({"input_ids": ids[:, i, :-1], "labels": ids[:, i, 1:]}, i)
        res["loss"].backward()
        out.append((res["loss"].detach(), [p.grad.clone() for p in m.model.parameters()]))
        m.initial_state = detach_state(res["final_state"])  # the next step starts from this one's final state
    return out


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_training_steps_equal_eager(backend, monkeypatch):
    ops.configure("torch")
    eager = two_steps(module(False))
    compiled_module = module(True)
    calls = []
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(fn) or compile_(fn, backend=backend, **kw))
    torch._dynamo.reset()
    compiled = two_steps(compiled_module)
    assert calls == [compiled_module.model.forward]  # compiled once, the model's forward
    for (loss, grads), (loss_ref, grads_ref) in zip(compiled, eager):
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
        for a, r in zip(grads, grads_ref):
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_compile_keeps_checkpoint_parameter_names():
    assert module(True).state_dict().keys() == module(False).state_dict().keys()
