"""Adapter recipes (docs/design.md §5): exactly the promised parameters train; merge, save and load keep the logits."""
import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors import safe_open

from hybridlm.adapters import (
    AdapterConfig,
    apply_adapter,
    format_parameter_table,
    load_adapter,
    merge_adapter,
    merged_state_dict,
    recipe_attention_kind,
    save_adapter,
    trainable_parameter_table,
)
from hybridlm.config import register_configs, to_config
from hybridlm.models import AttentionConfig, HybridLM, ModelConfig, SSMConfig

PATTERN = "MAMA"


def model_cfg(pattern=PATTERN, tie=True, kind="swa"):
    return ModelConfig(d_model=16, layer_pattern=pattern, vocab_size=40, d_intermediate=24, tie_embeddings=tie,
                       ssm=SSMConfig(d_state=8, headdim=8, chunk_size=8),
                       attn=AttentionConfig(kind=kind, num_heads=2, window=6, d_conv=2, qkv_proj_bias=True))


def fresh(seed=0, **kw):
    torch.manual_seed(seed)
    return HybridLM(model_cfg(**kw))


def expected_trainable(recipe, pattern=PATTERN):
    """The docs/design.md §5 rule, written out name by name. HyLoRA (Nunez et al. 2025): LoRA on the attention
    projections, embedding and norms trained, the Mamba-2 conv1d trained whole; nothing else of Mamba-2 (no LoRA
    on in_proj / out_proj; A_log, dt_bias, D frozen)."""
    A = [i for i, c in enumerate(pattern) if c == "A"]
    M = [i for i, c in enumerate(pattern) if c == "M"]
    lora = lambda layers: [f"backbone.layers.{i}.mixer.{p}.lora_{ab}.default.weight"
                           for i in layers for p in ("in_proj", "out_proj") for ab in "AB"]
    norms = (["backbone.norm_f.weight"] + [f"backbone.layers.{i}.norm.weight" for i in range(len(pattern))]
             + [f"backbone.layers.{i}.norm2.weight" for i in range(len(pattern))]
             + [f"backbone.layers.{i}.mixer.norm.weight" for i in M])  # Mamba-2's gated RMSNorm is a norm too
    plus = lora(A) + ["backbone.embedding.weight"] + norms
    return {
        "lora": lora(A),
        "lora_plus": plus,
        "longlora": plus,
        "hylora": plus + [f"backbone.layers.{i}.mixer.conv1d.{w}" for i in M for w in ("weight", "bias")],
        "full": [n for n, _ in fresh().named_parameters()],
        "none": [n for n, _ in fresh().named_parameters()],
    }[recipe]


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 40, (2, 24), generator=g)


def sgd_steps(model, n=2):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for s in range(n):
        logits, _ = model(batch(s))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch(s)[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


RECIPES = ["none", "full", "lora", "lora_plus", "hylora", "longlora"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_exactly_the_promised_parameters(recipe):
    model = apply_adapter(fresh(), AdapterConfig(name=recipe, r=4, alpha=8.0))
    want = set(expected_trainable(recipe))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == want
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sgd_steps(model)  # step 1 moves lora_B (initialised to 0), step 2 then moves lora_A
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == want
    assert model.lm_head.weight is model.backbone.embedding.weight


def test_untied_lm_head_stays_frozen_under_lora_plus():
    model = apply_adapter(fresh(tie=False), AdapterConfig(name="lora_plus"))
    params = dict(model.named_parameters())
    assert params["backbone.embedding.weight"].requires_grad and not params["lm_head.weight"].requires_grad


def test_parameter_table_counts():
    cfg = AdapterConfig(name="hylora", r=4)
    model = apply_adapter(fresh(), cfg)
    rows = {g: (t, n) for g, t, n in trainable_parameter_table(model)}
    d, r = 16, 4
    n_att, n_mamba = PATTERN.count("A"), PATTERN.count("M")
    d_inner, d_state, nheads = 2 * d, 8, 2 * d // 8
    conv_dim = d_inner + 2 * d_state
    in_proj = 2 * d_inner + 2 * d_state + nheads
    assert rows["embedding"] == (48 * d, 48 * d)  # vocab 40 padded to 48, tied head counted once
    assert rows["mamba conv1d"] == (n_mamba * conv_dim * 5, n_mamba * conv_dim * 5)  # d_conv 4 weights + bias
    assert rows["mamba in_proj"] == (0, n_mamba * in_proj * d)
    assert rows["mamba ssm params (A_log, D, dt_bias)"] == (0, n_mamba * 3 * nheads)
    assert rows["attention"][0] == 0 and rows["mlp"][0] == 0
    qkv = 3 * d
    assert rows["mamba out_proj"] == (0, n_mamba * d_inner * d)
    lora_a = n_att * 2 * r * d  # attention in_proj (d -> 3d) and out_proj (d -> d) only
    lora_b = n_att * (qkv * r + d * r)
    assert rows["lora_A"] == (lora_a, lora_a) and rows["lora_B"] == (lora_b, lora_b)
    assert sum(n for t, n in rows.values()) == sum(p.numel() for p in model.parameters())
    text = format_parameter_table(trainable_parameter_table(model))
    assert text.splitlines()[-1].split()[0] == "total" and "lora_B" in text


@pytest.mark.parametrize("recipe", ["lora", "hylora", "longlora"])
def test_merged_model_gives_same_logits_and_plain_names(recipe):
    model = apply_adapter(fresh(), AdapterConfig(name=recipe, r=4, alpha=8.0))
    sgd_steps(model)
    model.eval()
    ids = batch(7)
    with torch.no_grad():
        before, _ = model(ids)
        merged = merge_adapter(model)
        after, _ = merged(ids)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    plain = fresh(seed=3)
    assert list(merged.state_dict()) == list(plain.state_dict())
    assert merged.lm_head.weight is merged.backbone.embedding.weight
    assert all(p.requires_grad for p in merged.parameters())
    plain.load_state_dict(merged.state_dict())  # a merged checkpoint is an ordinary HybridLM checkpoint
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(ids)[0], before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe", ["lora", "lora_plus", "hylora", "full"])
def test_adapter_checkpoint_round_trip(recipe, tmp_path):
    cfg = AdapterConfig(name=recipe, r=4, alpha=8.0)
    model = apply_adapter(fresh(), cfg)
    sgd_steps(model)
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    # Only what the recipe trains, LoRA keys in peft's layout (no adapter name).
    assert keys == {n.replace(".default", "") for n in expected_trainable(recipe)}
    loaded = load_adapter(fresh(), path)
    assert loaded.adapter_cfg == cfg
    ids = batch(9)
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids)[0], model(ids)[0], rtol=0, atol=0)
    assert loaded.lm_head.weight is loaded.backbone.embedding.weight
    with pytest.raises(ValueError, match="does not match"):
        load_adapter(apply_adapter(fresh(), dataclasses.replace(cfg, r=2)), path)


def test_longlora_trains_with_s2_attention():
    cfg = AdapterConfig(name="longlora", r=4)
    assert recipe_attention_kind(cfg) == "s2"
    assert all(recipe_attention_kind(AdapterConfig(name=n)) is None for n in RECIPES if n != "longlora")
    model = apply_adapter(fresh(kind=recipe_attention_kind(cfg)), cfg)
    assert type(model.backbone.layers[1].mixer.in_proj).__module__.startswith("peft")
    sgd_steps(model)
    assert model.backbone.layers[1].mixer.in_proj.lora_A.default.weight.grad.abs().sum() > 0


def test_misuse_is_rejected():
    with pytest.raises(ValueError, match="adapter.name"):
        apply_adapter(fresh(), AdapterConfig(name="qlora"))
    with pytest.raises(ValueError, match="no layer to put LoRA on"):
        apply_adapter(fresh(pattern="MM"), AdapterConfig(name="lora"))
    model = apply_adapter(fresh(), AdapterConfig(name="lora"))
    with pytest.raises(ValueError, match="already has adapter"):
        apply_adapter(model, AdapterConfig(name="lora"))


@pytest.mark.parametrize("recipe", ["lora", "hylora", "full", "none"])
def test_merged_state_dict_is_merge_adapter_without_touching_the_model(recipe):
    model = apply_adapter(fresh(), AdapterConfig(name=recipe, r=4, alpha=8.0))
    sgd_steps(model)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    got = merged_state_dict(model)
    want = merge_adapter(copy.deepcopy(model)).state_dict()
    assert list(got) == list(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[n], before[n]) for n in before)


def test_sespan_recipes_use_the_papers_lora_settings():
    """Nunez et al. 2025, Sec. 4.2: r 32, alpha 64, for every recipe the adaptation step is run with."""
    register_configs()
    conf = Path(__file__).resolve().parents[2] / "conf"
    for recipe in ("hylora", "lora", "lora_plus", "longlora"):
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = to_config(compose("train", ["+experiment=sespan/adapt", "init_from=x", f"adapter={recipe}"]))
        assert (cfg.adapter.name, cfg.adapter.r, cfg.adapter.alpha) == (recipe, 32, 64.0)
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        assert compose("train", ["+experiment=sespan/adapt", "init_from=x"]).adapter.name == "hylora"
