"""Each intervention callback, driven hook by hook on a real tiny HybridLM: the initial state it sets is exactly
the one it promises (compared with the model's own final states or with closed-form statistics)."""
import io
import json
import math

import pytest
import torch
from intervention_helpers import VOCAB, make_module, step, tiny_model_cfg, trainer_stub

from hybridlm.data.config import DataConfig
from hybridlm.interventions import (
    FittedNoiseCallback,
    InterventionConfig,
    RandomNoiseCallback,
    StatePassingCallback,
    TBTTCallback,
    build_intervention,
)
from hybridlm.interventions.base import state_to_cpu
from hybridlm.models.state import map_state

MAMBA, ATTN = [0, 2], 1  # layer indices of the "MAM" pattern


def ids(b, t, seed):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def roundtrip(sd):
    """A state dict as it comes back from a checkpoint file."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# ---- config validation -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(sigma=-1), "intervention.sigma: must be >= 0, got -1"),
    (dict(reset_prob=1.5), "intervention.reset_prob: must be in [0, 1], got 1.5"),
    (dict(reset_prob=-0.1), "intervention.reset_prob: must be in [0, 1]"),
    (dict(name="noise"), "intervention.name: unknown intervention 'noise'"),
    (dict(name="random_noise", include_attention=True), "intervention.include_attention: random_noise has no"),
    (dict(name="fitted_noise", include_attention=True), "intervention.include_attention: fitted_noise has no"),
    (dict(name="state_passing", include_attention=True, reset_prob=0.5), "intervention.reset_prob: per-row resets"),
    (dict(name="fitted_noise", export_path="stats.txt"), "intervention.export_path: must end in .pt or .json"),
])
def test_validate_names_the_key(kwargs, message):
    with pytest.raises(ValueError) as e:
        InterventionConfig(**kwargs).validate()
    assert str(e.value).startswith(message)
    with pytest.raises(ValueError):
        build_intervention(InterventionConfig(**kwargs))


def test_validate_with_data_and_model():
    with pytest.raises(ValueError, match=r"^data\.stream_mode: intervention=tbtt needs data.stream_mode=contiguous"):
        InterventionConfig(name="tbtt").validate(data=DataConfig(stream_mode="random"))
    InterventionConfig(name="tbtt").validate(data=DataConfig(stream_mode="contiguous"))
    InterventionConfig(name="state_passing").validate(data=DataConfig(stream_mode="random"))
    with pytest.raises(ValueError, match=r"^intervention.include_attention: model.attn.kind=full"):
        InterventionConfig(name="state_passing", include_attention=True).validate(model=tiny_model_cfg(kind="full"))
    InterventionConfig(name="state_passing", include_attention=True).validate(model=tiny_model_cfg(kind="swa"))
    # the paper's SE-Attn retrieves from the whole prefix, and the windowed one keeps every key unless bounded
    for kind in ("se_attn", "se_attn_window"):
        with pytest.raises(ValueError, match=rf"^intervention.include_attention: model.attn.kind={kind}.* every past"):
            InterventionConfig(name="tbtt", include_attention=True).validate(model=tiny_model_cfg(kind=kind))
    bounded = tiny_model_cfg(kind="se_attn_window")
    bounded.attn.max_memory_blocks = 4
    InterventionConfig(name="tbtt", include_attention=True).validate(model=bounded)


def test_build_intervention_classes():
    assert build_intervention(InterventionConfig()) is None
    expected = {"random_noise": RandomNoiseCallback, "fitted_noise": FittedNoiseCallback,
                "state_passing": StatePassingCallback, "tbtt": TBTTCallback}
    for name, cls in expected.items():
        assert type(build_intervention(InterventionConfig(name=name))) is cls


def test_tbtt_setup_refuses_random_stream_mode():
    cb = TBTTCallback(InterventionConfig(name="tbtt"))
    with pytest.raises(ValueError, match=r"^data\.stream_mode: .*got 'random'"):
        cb.setup(trainer_stub(), make_module(stream_mode="random"), "fit")
    cb.setup(trainer_stub(), make_module(stream_mode="contiguous"), "fit")
    no_data = make_module()
    no_data.cfg.data = None
    with pytest.raises(ValueError, match=r"^data\.stream_mode: .*no data config"):
        cb.setup(trainer_stub(), no_data, "fit")


# ---- state passing / tbtt --------------------------------------------------------------------------------------
def test_first_batch_starts_from_zeros(module):
    init, _ = step(StatePassingCallback(InterventionConfig(name="state_passing")), module, ids(3, 6, 0))
    assert init is None  # None = the model's zero state


@pytest.mark.parametrize("include_conv, include_attention", [(False, False), (True, False), (True, True)])
def test_state_passing_is_previous_final_state_row_by_row(module, include_conv, include_attention):
    cb = StatePassingCallback(InterventionConfig(name="state_passing", include_conv=include_conv,
                                                 include_attention=include_attention))
    _, final = step(cb, module, ids(4, 9, 0), grad=True)
    assert final[0]["ssm"].requires_grad  # the callback is the one that must detach
    init, _ = step(cb, module, ids(4, 7, 1))
    for i in MAMBA:
        assert set(init[i]) == ({"ssm", "conv"} if include_conv else {"ssm"})
        for k in init[i]:
            assert not init[i][k].requires_grad
            for row in range(4):
                assert torch.equal(init[i][k][row], final[i][k][row].detach())
    if include_attention:
        assert init[ATTN]["pos"] == 9
        for k in ("k", "v"):
            assert torch.equal(init[ATTN][k], final[ATTN][k].detach())
    else:
        assert init[ATTN] is None


def test_batch_size_changes(module):
    cb = StatePassingCallback(InterventionConfig(name="state_passing", include_conv=True, include_attention=True))
    _, final = step(cb, module, ids(4, 6, 0))
    init, final2 = step(cb, module, ids(2, 6, 1))  # smaller (last) batch: the first rows
    for i in MAMBA:
        for k in ("ssm", "conv"):
            assert torch.equal(init[i][k], final[i][k][:2])
    assert torch.equal(init[ATTN]["k"], final[ATTN]["k"][:2])
    init, _ = step(cb, module, ids(5, 6, 2))  # larger batch: extra rows start from zeros
    for i in MAMBA:
        for k in ("ssm", "conv"):
            assert init[i][k].shape[0] == 5
            assert torch.equal(init[i][k][:2], final2[i][k])
            assert torch.count_nonzero(init[i][k][2:]) == 0
    assert init[ATTN] is None  # a dense cache cannot be empty for some rows only


def test_reset_prob_one_gives_zeros(module):
    cb = StatePassingCallback(InterventionConfig(name="state_passing", reset_prob=1.0, include_conv=True))
    step(cb, module, ids(3, 6, 0))
    init, _ = step(cb, module, ids(3, 6, 1))
    for i in MAMBA:
        for k in ("ssm", "conv"):
            assert init[i][k].shape[0] == 3 and torch.count_nonzero(init[i][k]) == 0


def test_reset_prob_resets_whole_rows(module):
    cb = StatePassingCallback(InterventionConfig(name="state_passing", reset_prob=0.5, include_conv=True, seed=3))
    _, final = step(cb, module, ids(32, 5, 0))
    init, _ = step(cb, module, ids(32, 5, 1))
    kinds = []
    for row in range(32):
        passed = all(torch.equal(init[i][k][row], final[i][k][row]) for i in MAMBA for k in ("ssm", "conv"))
        zero = all(torch.count_nonzero(init[i][k][row]) == 0 for i in MAMBA for k in ("ssm", "conv"))
        assert passed != zero  # each row is entirely passed or entirely reset
        kinds.append(zero)
    assert 4 <= sum(kinds) <= 28  # Binomial(32, 0.5) far inside these bounds for any seed in practice


def test_tbtt_segments_reproduce_one_pass():
    """TBTT with every state passed (ssm, conv, attention window): consecutive segments of the same streams give
    the logits and final state of one pass over the whole streams."""
    module = make_module(stream_mode="contiguous")
    module.model.double()
    cb = TBTTCallback(InterventionConfig(name="tbtt", include_conv=True, include_attention=True))
    cb.setup(trainer_stub(), module, "fit")
    streams = ids(3, 24, 5)
    seg_logits = []
    for t, s in enumerate(range(0, 24, 8)):
        batch = {"input_ids": streams[:, s:s + 8], "labels": streams[:, s:s + 8]}
        cb.on_train_batch_start(None, module, batch, t)
        logits, final = module.model(batch["input_ids"], module.initial_state)
        module.initial_state = None
        cb.on_train_batch_end(None, module, {"final_state": final}, batch, t)
        seg_logits.append(logits)
    full_logits, full_final = module.model(streams)
    torch.testing.assert_close(torch.cat(seg_logits, 1), full_logits, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(final[0]["ssm"], full_final[0]["ssm"], rtol=1e-9, atol=1e-9)


def test_state_passing_state_dict_roundtrip(module):
    cfg = InterventionConfig(name="state_passing", reset_prob=0.5, include_conv=True, seed=7)
    cb = StatePassingCallback(cfg)
    for t in range(3):
        step(cb, module, ids(6, 5, t))
    restored = StatePassingCallback(cfg)
    restored.load_state_dict(roundtrip(cb.state_dict()))
    a, _ = step(cb, module, ids(6, 5, 10))
    b, _ = step(restored, module, ids(6, 5, 10))
    for i in MAMBA:
        for k in ("ssm", "conv"):
            assert torch.equal(a[i][k], b[i][k])
    assert any(torch.count_nonzero(a[i]["ssm"][r]) == 0 for i in MAMBA for r in range(6))  # resets did happen


def test_each_rank_restores_its_own_passed_states_and_resets(module):
    """Under DDP state_dict gathers {"ranks": [rank 0's state, rank 1's state]} (built here from each rank's
    rank_state_dict, as the gather does); each rank continues from its own entry, as if never interrupted."""
    cfg = InterventionConfig(name="state_passing", reset_prob=0.5, seed=3)
    ranks = [StatePassingCallback(cfg) for _ in range(2)]
    for r, cb in enumerate(ranks):
        cb.setup(trainer_stub(rank=r, world_size=2), module, "fit")
        for t in range(2):
            step(cb, module, ids(4, 5, 10 * r + t))  # each rank sees its own data
    saved = roundtrip({"ranks": [cb.rank_state_dict() for cb in ranks]})
    for r, cb in enumerate(ranks):
        restored = StatePassingCallback(cfg)
        restored.setup(trainer_stub(rank=r, world_size=2), module, "fit")
        restored.load_state_dict(saved)
        for t in range(2, 4):  # two more steps: the passed states and the reset draws of rank r
            a, _ = step(cb, module, ids(4, 5, 10 * r + t))
            b, _ = step(restored, module, ids(4, 5, 10 * r + t))
            assert all(torch.equal(a[i]["ssm"], b[i]["ssm"]) for i in MAMBA), (r, t)
    # the ranks' buffers differ, so the equalities above hold only if rank 1 restored rank 1's entry
    assert not torch.equal(ranks[0].prev[0]["ssm"], ranks[1].prev[0]["ssm"])


def test_a_rank_missing_from_the_checkpoint_starts_from_zeros(module):
    cfg = InterventionConfig(name="state_passing")
    cb = StatePassingCallback(cfg)
    step(cb, module, ids(2, 5, 0))
    other = StatePassingCallback(cfg)
    other.setup(trainer_stub(rank=1, world_size=2), module, "fit")
    with pytest.warns(UserWarning, match=r"holds the intervention state of rank\(s\) \[0\] only; rank 1 starts afresh"):
        other.load_state_dict(roundtrip(cb.state_dict()))  # saved by a single-process run
    init, _ = step(other, module, ids(2, 5, 1))
    assert init is None


def test_a_checkpoint_written_before_per_rank_states_still_resumes(module):
    """Older checkpoints hold one rank's state as {"rng", "rank", "prev"}: that rank continues from it."""
    cfg = InterventionConfig(name="state_passing", reset_prob=0.5, seed=1)
    cb = StatePassingCallback(cfg)
    step(cb, module, ids(4, 5, 0))
    # Written out as the old StatePassingCallback.state_dict did, not with today's rank_state_dict.
    rng = cb.rng_state_dict()  # None until the first draw
    old = roundtrip({"rng": rng and {**rng, "rank": 0}, "rank": 0, "prev": state_to_cpu(cb.prev)})
    restored = StatePassingCallback(cfg)
    restored.load_state_dict(old)
    a, _ = step(cb, module, ids(4, 5, 1))
    b, _ = step(restored, module, ids(4, 5, 1))
    assert all(torch.equal(a[i]["ssm"], b[i]["ssm"]) for i in MAMBA)


# ---- noise ---------------------------------------------------------------------------------------------------
def test_random_noise_shapes_and_std(module):
    cb = RandomNoiseCallback(InterventionConfig(name="random_noise", sigma=0.7, include_conv=True))
    init, _ = step(cb, module, ids(64, 4, 0))
    assert init[ATTN] is None
    for i in MAMBA:
        assert init[i]["ssm"].shape == (64, 4, 8, 4) and init[i]["ssm"].dtype == torch.float32
        assert init[i]["conv"].shape == (64, 3, 40)
        for k in ("ssm", "conv"):
            x = init[i][k]
            assert abs(x.std().item() - 0.7) < 0.03 and abs(x.mean().item()) < 0.03
    init2, _ = step(cb, module, ids(64, 4, 0))
    assert not torch.equal(init[0]["ssm"], init2[0]["ssm"])  # fresh noise every batch
    zero = RandomNoiseCallback(InterventionConfig(name="random_noise", sigma=0.0))
    init, _ = step(zero, module, ids(2, 4, 0))
    assert set(init[0]) == {"ssm"} and torch.count_nonzero(init[0]["ssm"]) == 0


def test_random_noise_state_dict_roundtrip(module):
    cfg = InterventionConfig(name="random_noise", sigma=1.0, seed=4)
    cb = RandomNoiseCallback(cfg)
    step(cb, module, ids(2, 4, 0))
    restored = RandomNoiseCallback(cfg)
    restored.load_state_dict(roundtrip(cb.state_dict()))
    a, _ = step(cb, module, ids(2, 4, 1))
    b, _ = step(restored, module, ids(2, 4, 1))
    assert torch.equal(a[0]["ssm"], b[0]["ssm"]) and torch.equal(a[2]["ssm"], b[2]["ssm"])


def fake_final_states(module, sizes, seed):
    """Final states with per-head / per-channel means and scales far from 0 / 1, one per batch size."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in sizes:
        st = [None] * 3
        for i in MAMBA:
            head_shift = torch.arange(4.0).view(1, 4, 1, 1) * (i + 1)
            chan_scale = torch.linspace(0.5, 3.0, 40).view(1, 1, 40)
            st[i] = {"ssm": 100.0 + head_shift + 2.0 * torch.randn(b, 4, 8, 4, generator=g),
                     "conv": -3.0 + chan_scale * torch.randn(b, 3, 40, generator=g)}
        out.append(st)
    return out


def test_fitted_noise_statistics_equal_closed_form(module):
    cb = FittedNoiseCallback(InterventionConfig(name="fitted_noise", include_conv=True))
    init, model_final = step(cb, module, ids(3, 4, 0))  # before any statistics: zeros
    assert all(torch.count_nonzero(init[i][k]) == 0 for i in MAMBA for k in ("ssm", "conv"))
    finals = fake_final_states(module, [3, 1, 5, 2], seed=0)
    batch = {"input_ids": ids(1, 1, 0)}
    for t, f in enumerate(finals):
        cb.on_train_batch_end(None, module, {"final_state": f}, batch, t)
    finals = [model_final] + finals  # everything the callback has seen
    for i in MAMBA:
        ssm = torch.cat([f[i]["ssm"] for f in finals]).double()  # (14, 4, 8, 4)
        pooled = ssm.transpose(0, 1).reshape(4, -1)  # per head over batch, headdim, d_state
        mean, std = cb.moments(f"{i}.ssm", 4, "cpu")
        torch.testing.assert_close(mean, pooled.mean(1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(std, pooled.std(1), rtol=1e-10, atol=1e-12)
        conv = torch.cat([f[i]["conv"] for f in finals]).double()  # (14, 3, 40)
        pooled = conv.permute(2, 0, 1).reshape(40, -1)  # per channel over batch and positions
        mean, std = cb.moments(f"{i}.conv", 40, "cpu")
        torch.testing.assert_close(mean, pooled.mean(1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(std, pooled.std(1), rtol=1e-10, atol=1e-12)

    # samples: iid N(mean[l, h], std[l, h]^2)
    cb.on_train_batch_start(None, module, {"input_ids": ids(400, 1, 0)}, 9)
    init = module.initial_state
    for i in MAMBA:
        mean, std = cb.moments(f"{i}.ssm", 4, "cpu")
        x = init[i]["ssm"].double().transpose(0, 1).reshape(4, -1)  # 12800 samples per head
        assert ((x.mean(1) - mean).abs() < 4 * std / math.sqrt(12800)).all()  # 4 standard errors
        torch.testing.assert_close(x.std(1), std, rtol=0.03, atol=0)


def test_fitted_noise_state_dict_and_export(module, tmp_path):
    cfg = InterventionConfig(name="fitted_noise", seed=2)
    cb = FittedNoiseCallback(cfg)
    for t in range(3):
        step(cb, module, ids(4, 6, t))
    restored = FittedNoiseCallback(cfg)
    restored.load_state_dict(roundtrip(cb.state_dict()))
    for i in MAMBA:
        for a, b in zip(cb.moments(f"{i}.ssm", 4, "cpu"), restored.moments(f"{i}.ssm", 4, "cpu")):
            assert torch.equal(a, b)
    a, _ = step(cb, module, ids(4, 6, 9))
    b, _ = step(restored, module, ids(4, 6, 9))
    assert torch.equal(a[0]["ssm"], b[0]["ssm"]) and torch.equal(a[2]["ssm"], b[2]["ssm"])

    pt, js = cb.export(tmp_path / "s.pt"), cb.export(tmp_path / "s.json")
    loaded_pt = torch.load(pt, weights_only=False)["stats"]
    loaded_js = json.loads(js.read_text())["stats"]
    for i in MAMBA:
        mean, std = cb.moments(f"{i}.ssm", 4, "cpu")
        assert torch.equal(loaded_pt[f"{i}.ssm"]["mean"], mean)
        assert torch.equal(loaded_pt[f"{i}.ssm"]["std"], std)
        assert loaded_js[f"{i}.ssm"]["mean"] == mean.tolist()
        assert loaded_js[f"{i}.ssm"]["count"] == 4 * 4 * 8 * 4  # 4 batches x (batch 4, headdim 8, d_state 4)


def test_fitted_noise_exports_at_train_end(module, tmp_path):
    cb = FittedNoiseCallback(InterventionConfig(name="fitted_noise", export_path="out/stats.json"))
    step(cb, module, ids(2, 4, 0))
    cb.on_train_end(trainer_stub(tmp_path=tmp_path), module)
    assert set(json.loads((tmp_path / "out" / "stats.json").read_text())["stats"]) == {"0.ssm", "2.ssm"}


def test_noise_follows_module_dtype(module):
    module.model.double()
    cb = RandomNoiseCallback(InterventionConfig(name="random_noise", include_conv=True))
    init, _ = step(cb, module, ids(2, 4, 0))
    assert init[0]["ssm"].dtype == torch.float64 and init[0]["conv"].dtype == torch.float64
    sp = StatePassingCallback(InterventionConfig(name="state_passing"))
    step(sp, module, ids(2, 4, 0))
    sd = sp.state_dict()["ranks"][0]
    assert map_state(sd["prev"], lambda t: t.device.type)[0]["ssm"] == "cpu"  # checkpoints hold CPU tensors


def test_top_level_config_checks_tbtt_stream_mode():
    from hybridlm.config import Config

    with pytest.raises(ValueError, match=r"^data\.stream_mode: intervention=tbtt needs"):
        Config(intervention=InterventionConfig(name="tbtt")).validate()
    Config(intervention=InterventionConfig(name="tbtt"), data=DataConfig(stream_mode="contiguous")).validate()
