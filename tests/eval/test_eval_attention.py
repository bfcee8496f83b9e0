"""eval.attention (docs/design.md §4): a model evaluated with another attention kind than it was trained with
equals a model of that kind built independently with the same weights; `same` is the model itself."""
import copy
import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from eval_helpers import tiny_model
from torch import nn

from hybridlm.adapters import AdapterConfig, apply_adapter, merge_adapter
from hybridlm.config import Config
from hybridlm.eval import EvalConfig, LengthEvalCallback, check_eval_attention, run_length_report, with_eval_attention
from hybridlm.models import HybridLM
from hybridlm.models import config as model_config_module
from hybridlm.models import hybrid_lm as hybrid_lm_module
from hybridlm.models.attention import Attention


def seqs(n, L, vocab=257, seed=0):
    return torch.randint(0, vocab, (n, L), generator=torch.Generator().manual_seed(seed))


def trained_swa_model(steps=3):
    """tiny_model (swa, window 6) after a few SGD steps: weights no initialisation would give."""
    model = tiny_model(vocab=257, double=False).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for s in range(steps):
        x = seqs(2, 33, seed=10 + s)
        logits, _ = model(x[:, :-1])
        F.cross_entropy(logits.transpose(1, 2), x[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def rebuilt(model, kind, state_dict=None):
    """The reference: a HybridLM of `kind` built from the config, loaded the ordinary way."""
    ref = HybridLM(dataclasses.replace(model.cfg, attn=dataclasses.replace(model.cfg.attn, kind=kind)))
    ref.load_state_dict(state_dict if state_dict is not None else model.state_dict())
    return ref.eval()


def report(model, tmp_path, name, **kw):
    cfg = EvalConfig(diagnostics=["loss_by_position", "passkey"], max_len=64, n_sequences=3, chunk_len=16,
                     batch_size=2, passkey_lengths=[80], passkey_depths=[0.0, 1.0], passkey_samples=2, **kw)
    run_length_report(model, seqs(3, 64), cfg, tmp_path / name, train_len=8)
    return {d: json.loads((tmp_path / name / f"{d}.json").read_text()) for d in ("loss_by_position", "passkey")}


def test_full_on_a_swa_trained_model_equals_a_full_model_with_the_same_weights(tmp_path):
    model = trained_swa_model()
    got = report(model, tmp_path, "full")  # the default: eval.attention=full
    ref = report(rebuilt(model, "full"), tmp_path, "ref", attention="same")
    same = report(model, tmp_path, "same", attention="same")
    for d in got:
        assert got[d]["rows"] == ref[d]["rows"] and got[d]["scalars"] == ref[d]["scalars"]
        assert got[d]["meta"]["attention"] == ref[d]["meta"]["attention"] == "full"
        assert same[d]["meta"]["attention"] == "swa"
    # 64 tokens through a 6-token window: the swa model itself is another model
    assert same["loss_by_position"]["rows"] != got["loss_by_position"]["rows"]
    assert model.cfg.attn.kind == "swa" and type(model.backbone.layers[1].mixer) is Attention


def test_same_is_the_model_itself(tmp_path):
    model = trained_swa_model()
    assert with_eval_attention(model, "same") is model
    assert with_eval_attention(model, "swa") is model  # the trained kind, named
    mamba_only = tiny_model(pattern="MM", double=False)
    assert with_eval_attention(mamba_only, "full") is mamba_only
    assert check_eval_attention(mamba_only.cfg, "full") is None


@pytest.mark.parametrize("kind", ["full", "s2", "se_attn"])
def test_swapped_model_gives_the_logits_of_the_rebuilt_one(kind):
    model = trained_swa_model()
    x = seqs(2, 40)[:, :-1]
    other = with_eval_attention(model, kind)
    assert other.cfg.attn.kind == kind and not other.training and model.cfg.attn.kind == "swa"
    assert not any(p.requires_grad for p in other.parameters())
    assert other.lm_head.weight is other.backbone.embedding.weight
    with torch.no_grad():
        torch.testing.assert_close(other(x)[0], rebuilt(model, kind)(x)[0], rtol=0, atol=0)


def test_an_adapted_model_is_evaluated_with_its_lora_folded_in():
    model = tiny_model(vocab=257, double=False)
    apply_adapter(model, AdapterConfig(name="hylora", r=4, alpha=8.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)  # a non-zero adapter
    x = seqs(2, 40)[:, :-1]
    with torch.no_grad():
        before = model(x)[0]
        other = with_eval_attention(model, "full")
        got = other(x)[0]
        torch.testing.assert_close(model(x)[0], before, rtol=0, atol=0)  # the adapted model is left as it was
        ref = rebuilt(model, "full", merge_adapter(copy.deepcopy(model)).state_dict())
        torch.testing.assert_close(got, ref(x)[0], rtol=1e-6, atol=1e-6)
    assert model.adapter_cfg is not None and any(".lora_A." in n for n, _ in model.named_parameters())


class WideAttention(Attention):
    """An attention kind with one parameter more than Attention: the trained weights cannot run it."""

    def __init__(self, d_model, cfg, layer_idx=0):
        super().__init__(d_model, cfg, layer_idx)
        self.gate = nn.Parameter(torch.zeros(cfg.num_heads))


def test_unknown_kinds_and_kinds_with_other_parameters_are_refused(monkeypatch):
    with pytest.raises(ValueError, match=r"^eval.attention: unknown attention 'flash'"):
        EvalConfig(attention="flash").validate()
    with pytest.raises(ValueError, match=r"^eval.attention: unknown attention 'flash'"):
        Config(eval=EvalConfig(attention="flash")).validate()
    monkeypatch.setitem(hybrid_lm_module.ATTENTION_MIXERS, "wide", WideAttention)  # a kind the model can build
    monkeypatch.setattr(model_config_module, "ATTENTION_KINDS", (*model_config_module.ATTENTION_KINDS, "wide"))
    EvalConfig(attention="wide").validate()  # the kinds are ATTENTION_MIXERS': known now
    model = tiny_model(double=False)
    with pytest.raises(ValueError, match=r"^eval.attention: attention 'wide' holds other parameters .*gate"):
        with_eval_attention(model, "wide")
    cb = LengthEvalCallback(EvalConfig(diagnostics=["passkey"], attention="wide"))
    with pytest.raises(ValueError, match=r"^eval.attention: attention 'wide' holds other parameters"):
        cb.setup(SimpleNamespace(datamodule=None), SimpleNamespace(model=model), "fit")  # before training
