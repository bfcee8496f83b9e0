"""Export (docs/design.md §7): hybridlm -> transformers Mamba2ForCausalLM (checked with transformers itself) and
-> mamba_ssm layout; what each target cannot express is refused; the `python -m hybridlm.export` entry point."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from hybridlm.convert import CheckpointError, export, load_pretrained, load_state_dict_checked
from hybridlm.export import main
from hybridlm.models.config import AttentionConfig, ModelConfig, SSMConfig
from hybridlm.models.hybrid_lm import HybridLM


def tiny_model(seed: int = 0, **overrides) -> HybridLM:
    fields = dict(d_model=64, layer_pattern="MM", vocab_size=100, pad_vocab_size_multiple=16,
                  ssm=SSMConfig(d_state=16, headdim=16, ngroups=2, chunk_size=16))
    cfg = ModelConfig(**{**fields, **overrides})
    torch.manual_seed(seed)
    model = HybridLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # D and the norms start as ones: make them non-trivial
        for name, p in model.named_parameters():
            if name.endswith(".D") or "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
    return model


def reload(path) -> HybridLM:
    cfg, sd = load_pretrained(path)
    model = HybridLM(cfg).eval()
    load_state_dict_checked(model, sd, source=str(path))
    return model


@pytest.mark.parametrize("tie", [True, False])
def test_export_hf_mamba2_loads_in_transformers(tmp_path, tie):
    from transformers import Mamba2ForCausalLM

    model = tiny_model(tie_embeddings=tie)
    if not tie:
        torch.nn.init.normal_(model.lm_head.weight, std=0.05)
    export(model, model.cfg, tmp_path, format="hf_mamba2")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["vocab_size"] == 100 and config["n_groups"] == 2 and config["tie_word_embeddings"] == tie
    hf = Mamba2ForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.backbone.embeddings.weight.shape == (100, 64)  # padded rows are not exported
    ids = torch.randint(0, 100, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(ids)
        torch.testing.assert_close(hf(ids).logits, ours, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(reload(tmp_path)(ids)[0], ours, atol=1e-6, rtol=1e-6)


def test_export_refuses_what_the_target_cannot_compute(tmp_path):
    hybrid = tiny_model(layer_pattern="MA", attn=AttentionConfig(kind="swa", num_heads=4, window=8))
    with pytest.raises(CheckpointError, match="attention layers.*format=mamba_ssm"):
        export(hybrid, hybrid.cfg, tmp_path / "hf", format="hf_mamba2")
    with pytest.raises(CheckpointError, match="d_intermediate = 32"):
        mlp = tiny_model(d_intermediate=32)
        export(mlp, mlp.cfg, tmp_path / "hf", format="hf_mamba2")
    with pytest.raises(CheckpointError, match="norm_epsilon"):
        eps = tiny_model(norm_epsilon=1e-6)
        export(eps, eps.cfg, tmp_path / "hf", format="hf_mamba2")
    assert not (tmp_path / "hf").exists()  # refused before anything is written
    # mamba_ssm's MHA is full attention only: a sliding-window model needs an explicit opt-in.
    with pytest.raises(CheckpointError, match="attn.kind = 'swa'.*allow_full_attention"):
        export(hybrid, hybrid.cfg, tmp_path / "ms", format="mamba_ssm")
    export(hybrid, hybrid.cfg, tmp_path / "ms", format="mamba_ssm", allow_full_attention=True)
    assert load_pretrained(tmp_path / "ms")[0].attn.kind == "full"
    with pytest.raises(ValueError, match="format='onnx'"):
        export(hybrid, hybrid.cfg, tmp_path / "x", format="onnx")


def test_export_mamba_ssm_pads_mlp_to_its_multiple(tmp_path):
    """mamba_ssm's GatedMLP rounds its hidden size up to a multiple of 128; the export zero-pads, so the
    re-imported (wider) model computes the same function."""
    model = tiny_model(layer_pattern="MA", d_intermediate=40, attn=AttentionConfig(kind="full", num_heads=4))
    export(model, model.cfg, tmp_path, format="mamba_ssm")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["d_intermediate"] == 128 and config["attn_layer_idx"] == [1]
    back = reload(tmp_path)
    fc1 = back.backbone.layers[0].mlp.fc1.weight  # (2 * 128, 64): [y rows | gate rows], zeros after 40 each
    assert fc1.shape == (256, 64)
    assert torch.equal(fc1[:40], model.backbone.layers[0].mlp.fc1.weight[:40])
    assert not fc1[40:128].any() and not fc1[168:].any()
    ids = torch.randint(0, 100, (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(back(ids)[0], model(ids)[0], atol=1e-5, rtol=1e-5)


def write_tokenizer(directory) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["state passing for long context"] * 10,
                            trainers.BpeTrainer(vocab_size=40, special_tokens=["[UNK]", "<|endoftext|>"]))
    tok.save(str(directory / "tokenizer.json"))


def test_cli_converts_hybridlm_ckpt_to_hf(tmp_path):
    model = tiny_model()
    run = tmp_path / "run"
    run.mkdir()
    ckpt = run / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"cfg": {"model": dataclasses.asdict(model.cfg)}}}, ckpt)
    write_tokenizer(run)
    out = main([f"ckpt_path={ckpt}", "format=hf_mamba2", f"out={tmp_path / 'hf'}"])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    ids = torch.randint(0, 100, (1, 19))
    with torch.no_grad():
        torch.testing.assert_close(reload(out)(ids)[0], model(ids)[0], atol=1e-6, rtol=1e-6)
    with pytest.raises(SystemExit, match="unknown key"):
        main([f"ckpt_path={ckpt}", f"out={tmp_path / 'x'}", "fromat=hf_mamba2"])
    with pytest.raises(CheckpointError, match="no such file or directory"):
        main([f"ckpt_path={tmp_path / 'missing'}", f"out={tmp_path / 'z'}"])
    with pytest.raises(CheckpointError, match="tokenizer="):
        main([f"ckpt_path={ckpt}", f"out={tmp_path / 'y'}", f"tokenizer={tmp_path / 'hf' / 'nothing'}"])


def test_python_m_entry_point(tmp_path):
    """`python -m hybridlm.export` as a user runs it: transformers checkpoint + tokenizer -> mamba_ssm."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    src = tmp_path / "src"
    hf = Mamba2ForCausalLM(Mamba2Config(hidden_size=32, num_hidden_layers=2, head_dim=16, num_heads=4, state_size=8,
                                        n_groups=1, vocab_size=40, chunk_size=8)).eval()
    hf.save_pretrained(src)
    write_tokenizer(src)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "hybridlm.export", f"ckpt_path={src}", "format=mamba_ssm",
                           f"out={out}"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    written = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json"} <= written
    ids = torch.randint(0, 40, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(reload(out)(ids)[0], hf(ids).logits, atol=1e-4, rtol=1e-4)
