"""The intervention callbacks inside a real Lightning fit of HybridLMModule (CPU, tiny model, a few steps):
gradient accumulation passes state micro-batch to micro-batch, and checkpoint/resume continues exactly."""
import pytest
import torch
from intervention_helpers import VOCAB, tiny_model_cfg
from lightning import Trainer
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from hybridlm.config import Config, OptimConfig, TrainerConfig
from hybridlm.data.config import DataConfig
from hybridlm.interventions import InterventionConfig, build_intervention
from hybridlm.lit import HybridLMModule

MAMBA = [0, 2]


class Recorder(Callback):
    """Placed after the intervention: sees the initial state it set and the final state of each micro-batch."""

    def __init__(self):
        self.initial, self.final = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        s = pl_module.initial_state
        self.initial.append(None if s is None else [None if d is None else dict(d) for d in s])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.final.append(outputs["final_state"])


def make_cfg(intervention: InterventionConfig, stream_mode="random", max_steps=3) -> Config:
    return Config(model=tiny_model_cfg(), data=DataConfig(seq_len=8, batch_size=4, stream_mode=stream_mode),
                  intervention=intervention, trainer=TrainerConfig(max_steps=max_steps),
                  optim=OptimConfig(warmup_steps=0))


def loader(n_rows=10, batch_size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, VOCAB, (n_rows, 9), generator=g)
    data = [{"input_ids": r[:-1], "labels": r[1:]} for r in rows]
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def fit(cfg, callbacks, max_steps, accumulate=1, ckpt_path=None, n_rows=10, seed=0):
    torch.manual_seed(seed)
    module = HybridLMModule(cfg)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=max_steps, accumulate_grad_batches=accumulate,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks)
    trainer.fit(module, train_dataloaders=loader(n_rows), ckpt_path=ckpt_path)
    return trainer, module


def test_state_passing_under_gradient_accumulation():
    icfg = InterventionConfig(name="state_passing", include_conv=True)
    rec = Recorder()
    fit(make_cfg(icfg, max_steps=3), [build_intervention(icfg), rec], max_steps=3, accumulate=2)
    # 10 rows, batch 4: micro-batches of 4, 4, 2 rows per epoch; 3 optimizer steps of 2 micro-batches each
    assert len(rec.initial) >= 5
    assert [f[0]["ssm"].shape[0] for f in rec.final][:4] == [4, 4, 2, 4]  # the batch shrinks, then grows
    assert rec.initial[0] is None
    for k in range(1, len(rec.initial)):
        init, prev = rec.initial[k], rec.final[k - 1]
        b = init[0]["ssm"].shape[0]
        for i in MAMBA:
            for key in ("ssm", "conv"):
                n = min(b, prev[i][key].shape[0])
                assert torch.equal(init[i][key][:n], prev[i][key][:n])  # every micro-batch passes to the next
                assert torch.count_nonzero(init[i][key][n:]) == 0  # rows the previous batch did not have
        assert init[1] is None  # attention window not passed without include_attention


@pytest.mark.parametrize("name", ["state_passing", "fitted_noise"])
def test_resume_continues_with_the_same_state(tmp_path, name):
    icfg = InterventionConfig(name=name, reset_prob=0.5 if name == "state_passing" else 0.0, seed=5)
    rec1 = Recorder()
    cb1 = build_intervention(icfg)
    trainer, _ = fit(make_cfg(icfg, max_steps=4), [cb1, rec1], max_steps=2, n_rows=8)
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    rec2, cb2 = Recorder(), build_intervention(icfg)
    fit(make_cfg(icfg, max_steps=4), [cb2, rec2], max_steps=4, ckpt_path=str(ckpt), n_rows=8)
    # what the uninterrupted callback would have produced next, from the same checkpointed state
    if name == "state_passing":
        assert rec2.initial[0] is not None
        for i in MAMBA:
            prev = rec1.final[-1][i]["ssm"]
            for row in range(4):  # each row: the saved run's last final state, or reset to zeros
                x = rec2.initial[0][i]["ssm"][row]
                assert torch.equal(x, prev[row]) or torch.count_nonzero(x) == 0
    else:
        for i in MAMBA:
            seen = torch.cat([f[i]["ssm"] for f in rec1.final]).double().transpose(0, 1).reshape(4, -1)
            mean, std = cb2.moments(f"{i}.ssm", 4, "cpu")
            # after resume and 2 more steps the statistics also hold the new final states
            seen = torch.cat([seen, torch.cat([f[i]["ssm"] for f in rec2.final]).double().transpose(0, 1)
                              .reshape(4, -1)], 1)
            torch.testing.assert_close(mean, seen.mean(1), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(std, seen.std(1), rtol=1e-10, atol=1e-12)
    # the continued run's first initial state equals the one the saved callback produces from its state_dict
    twin = build_intervention(icfg)
    twin.load_state_dict(torch.load(ckpt, weights_only=False)["callbacks"][type(cb1).__name__])
    module = HybridLMModule(make_cfg(icfg))
    twin.on_train_batch_start(None, module, {"input_ids": torch.zeros(4, 8, dtype=torch.long)}, 0)
    for i in MAMBA:
        assert torch.equal(module.initial_state[i]["ssm"], rec2.initial[0][i]["ssm"])


def test_tbtt_refuses_random_stream_mode_in_trainer():
    icfg = InterventionConfig(name="tbtt")
    with pytest.raises(ValueError, match=r"^data\.stream_mode: intervention=tbtt needs"):
        fit(make_cfg(icfg, stream_mode="random"), [build_intervention(icfg)], max_steps=1)
