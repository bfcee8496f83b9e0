"""Runs that survive: bounded checkpoints, corrupt checkpoints on resume, inputs that must not run code or
silently misload, and the numerical guard (a W&B that cannot start: test_wandb.py). Training runs go through
runner.train, what `python -m hybridlm.train` calls, in this process."""
import json
import logging
import os
import time
from pathlib import Path

import pytest
import torch
from helpers import csv_rows, per_step, train_in_process
from lightning.pytorch.callbacks import Callback

from hybridlm import runner
from hybridlm.checkpointing.io import CheckpointError, load_checkpoint_file
from hybridlm.checkpointing.resume import find_resume_checkpoint
from hybridlm.convert import load_pretrained
from hybridlm.guards import NonFiniteError


def ckpt_step(path):
    return load_checkpoint_file(path)["global_step"]


def ckpt_names(run_dir):
    return sorted(p.name for p in (Path(run_dir) / "checkpoints").glob("*.ckpt"))


def all_finite(ckpt_path):
    sd = load_checkpoint_file(ckpt_path)["state_dict"]
    return all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


# ------------------------------------------------------------------------------------- bounded checkpoints

def test_keeps_last_n_step_checkpoints_plus_best_and_last(tmp_path):
    run = tmp_path / "run"
    train_in_process(run, ["trainer.max_steps=8", "checkpoint.every_n_steps=2", "checkpoint.keep_last=2",
                           "trainer.val_check_interval=3"])
    assert ckpt_names(run) == ["best.ckpt", "last.ckpt", "step000006.ckpt", "step000008.ckpt"]
    assert ckpt_step(run / "checkpoints" / "last.ckpt") == 8
    val = per_step(csv_rows(run), "val/loss")  # validation after batches 2 and 5 (logged at steps 2, 5)
    assert sorted(val) == [2, 5]
    best_step = min(val, key=lambda s: float(val[s])) + 1  # the checkpoint is written after that batch's update
    assert ckpt_step(run / "checkpoints" / "best.ckpt") == best_step


def test_checkpoints_by_wall_time(tmp_path):
    run = tmp_path / "run"
    # 1e-6 minutes = 60 us: every step takes longer, so every step is due; keep_last still bounds the files.
    train_in_process(run, ["trainer.max_steps=5", "checkpoint.every_n_minutes=1e-6", "checkpoint.keep_last=2",
                           "checkpoint.save_best=false", "trainer.val_check_interval=100"])
    assert ckpt_names(run) == ["last.ckpt", "step000004.ckpt", "step000005.ckpt"]
    assert ckpt_step(run / "checkpoints" / "last.ckpt") == 5


def test_last_checkpoint_holds_the_final_step(tmp_path):
    run = tmp_path / "run"
    train_in_process(run, ["trainer.max_steps=5", "checkpoint.every_n_steps=2", "checkpoint.save_best=false",
                           "trainer.val_check_interval=100"])
    assert ckpt_names(run) == ["last.ckpt", "step000002.ckpt", "step000004.ckpt"]
    assert ckpt_step(run / "checkpoints" / "last.ckpt") == 5  # not 4, the last periodic one


@pytest.mark.parametrize("every_n_steps, every_n_minutes, steps", [(2, 5, [2, 4]), (100, 1e-6, [1, 2, 3, 4, 5])])
def test_step_and_time_triggers_together(tmp_path, every_n_steps, every_n_minutes, steps):
    """Every N steps and at least every T minutes: either trigger saves (5 minutes never elapse here; 60 us
    always do)."""
    run = tmp_path / "run"
    train_in_process(run, ["trainer.max_steps=5", f"checkpoint.every_n_steps={every_n_steps}",
                           f"checkpoint.every_n_minutes={every_n_minutes}", "checkpoint.keep_last=10",
                           "checkpoint.save_best=false", "trainer.val_check_interval=100"])
    assert ckpt_names(run) == ["last.ckpt", *(f"step{s:06d}.ckpt" for s in steps)]


def test_negative_checkpoint_interval_is_refused(tmp_path):
    with pytest.raises(runner.ConfigError, match="checkpoint.every_n_minutes: must be >= 0"):
        train_in_process(tmp_path / "run", ["checkpoint.every_n_minutes=-1"])
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------- corrupt checkpoints

def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_resume_auto_skips_corrupt_checkpoints_with_a_warning(tmp_path, caplog):
    root = tmp_path / "exp"
    common = ["trainer.max_steps=8", "checkpoint.every_n_steps=2", "checkpoint.keep_last=2",
              "checkpoint.save_best=false", "trainer.val_check_interval=100"]
    train_in_process(root / "run1", common)
    reference = load_checkpoint_file(root / "run1" / "checkpoints" / "last.ckpt")["state_dict"]
    losses = per_step(csv_rows(root / "run1"), "train/loss")
    truncate(root / "run1" / "checkpoints" / "last.ckpt")
    (root / "run1" / "checkpoints" / "step000008.ckpt").write_bytes(b"\x00garbage" * 100)

    with caplog.at_level(logging.WARNING, logger="hybridlm"):
        result = train_in_process(root / "run2", [*common, "resume=auto"])
    skipped = [r.getMessage() for r in caplog.records if "resume=auto: skipping" in r.getMessage()]
    assert len(skipped) == 2
    assert any("last.ckpt is truncated or corrupt" in m for m in skipped)
    assert any("step000008.ckpt is truncated or corrupt" in m for m in skipped)
    assert result["out_dir"] == str(root / "run1")
    # Resumed from step 6: steps 6 and 7 are trained again and give the same losses and final weights.
    assert per_step(csv_rows(root / "run1"), "train/loss") == losses
    final = load_checkpoint_file(root / "run1" / "checkpoints" / "last.ckpt")
    assert final["global_step"] == 8
    assert all(torch.equal(final["state_dict"][k], v) for k, v in reference.items())


def fake_checkpoint(path, step, mtime):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "global_step": step}, path)
    os.utime(path, (mtime, mtime))


def test_resume_auto_falls_back_to_an_older_run(tmp_path, caplog):
    now = time.time()
    fake_checkpoint(tmp_path / "old" / "checkpoints" / "last.ckpt", 4, now - 100)
    fake_checkpoint(tmp_path / "new" / "checkpoints" / "step000002.ckpt", 2, now - 20)
    fake_checkpoint(tmp_path / "new" / "checkpoints" / "last.ckpt", 6, now - 10)
    truncate(tmp_path / "new" / "checkpoints" / "last.ckpt")
    assert find_resume_checkpoint(tmp_path.iterdir()) == tmp_path / "new" / "checkpoints" / "step000002.ckpt"
    (tmp_path / "new" / "checkpoints" / "step000002.ckpt").write_bytes(b"")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert find_resume_checkpoint(tmp_path.iterdir()) == tmp_path / "old" / "checkpoints" / "last.ckpt"
    assert sum("skipping" in r.getMessage() for r in caplog.records) == 2


def test_resume_of_a_corrupt_checkpoint_names_it_and_the_previous_one(tmp_path):
    run = tmp_path / "exp" / "run1"
    train_in_process(run, ["trainer.max_steps=4", "checkpoint.every_n_steps=2", "checkpoint.save_best=false",
                           "trainer.val_check_interval=100"])
    last = run / "checkpoints" / "last.ckpt"
    truncate(last)
    with pytest.raises(runner.ConfigError) as e:
        train_in_process(tmp_path / "exp" / "run2", ["trainer.max_steps=6", f"resume={last}"])
    msg = str(e.value)
    assert f"checkpoint {last} is truncated or corrupt" in msg
    assert f"the previous checkpoint is {run / 'checkpoints' / 'step000004.ckpt'}" in msg
    with pytest.raises(CheckpointError, match="step000004.ckpt"):  # what Lightning's own load would raise
        load_checkpoint_file(last)
    with pytest.raises(CheckpointError, match=f"checkpoint {run / 'nope.ckpt'} does not exist"):
        load_checkpoint_file(run / "nope.ckpt")


# -------------------------------------------------------------------------------------------- guarded inputs

class Payload:
    """Unpickling this runs os.mkdir(marker): what a malicious checkpoint would do with a worse command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_checkpoints_that_would_run_code_are_refused(tmp_path):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.w": torch.zeros(2)}, "global_step": 1, "x": Payload(marker)}, evil)
    ms_dir = tmp_path / "ms"  # a mamba_ssm-style directory whose weights file carries the payload
    ms_dir.mkdir()
    (ms_dir / "config.json").write_text(json.dumps({"d_model": 32, "n_layer": 1, "vocab_size": 257,
                                                    "ssm_cfg": {"layer": "Mamba2"}}))
    torch.save({"backbone.embedding.weight": torch.zeros(2), "x": Payload(marker)}, ms_dir / "pytorch_model.bin")

    with pytest.raises(CheckpointError, match="refuses to unpickle"):
        load_pretrained(evil)  # init_from=<.ckpt> and evaluation read weights through this
    with pytest.raises(CheckpointError, match="refuses to unpickle"):
        load_pretrained(ms_dir)
    with pytest.raises(CheckpointError, match="refuses to unpickle"):
        train_in_process(tmp_path / "run", [f"init_from={evil}"])
    with pytest.raises(runner.ConfigError, match="refuses to unpickle"):
        train_in_process(tmp_path / "run", [f"resume={evil}"])
    with pytest.raises(CheckpointError, match=f"{evil} holds Python objects"):
        load_checkpoint_file(evil)  # what Lightning's restore calls (AtomicCheckpointIO.load_checkpoint)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is real: an unrestricted load runs it
    assert marker.is_dir()


def test_init_from_a_checkpoint_whose_shapes_do_not_match_its_config_lists_the_keys(tmp_path):
    train_in_process(tmp_path / "src", ["trainer.max_steps=1", "checkpoint.save_best=false",
                                        "trainer.val_check_interval=100"])
    ckpt = torch.load(tmp_path / "src" / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["cfg"]["model"]["ssm"]["d_state"] = 8  # the weights were trained with 16
    bad = tmp_path / "bad.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError) as e:
        train_in_process(tmp_path / "ft", [f"init_from={bad}", "trainer.max_steps=1"])
    msg = str(e.value)
    assert f"{bad} does not fit the model" in msg
    for layer in (0, 1, 3):  # the Mamba-2 layers of MMAM; B and C in in_proj and conv1d have d_state channels
        assert f"shape mismatch: backbone.layers.{layer}.mixer.in_proj.weight" in msg
        assert f"shape mismatch: backbone.layers.{layer}.mixer.conv1d.weight" in msg
    assert "backbone.layers.2" not in msg  # the attention layer fits
    assert not (tmp_path / "ft" / "checkpoints").exists()


def test_unreadable_or_foreign_adapter_files_name_the_file(tmp_path):
    from safetensors.torch import save_file

    from hybridlm.adapters import AdapterConfig, apply_adapter, load_adapter, read_adapter_config, save_adapter
    from hybridlm.models import HybridLM, ModelConfig, SSMConfig

    def base():
        return HybridLM(ModelConfig(d_model=16, layer_pattern="MA", vocab_size=40,  # hylora's LoRA needs attention
                                    ssm=SSMConfig(d_state=8, headdim=8, chunk_size=8)))

    path = save_adapter(apply_adapter(base(), AdapterConfig(name="hylora", r=2)), tmp_path / "adapter.safetensors")
    truncate(path)
    with pytest.raises(CheckpointError, match=f"{path}: cannot read safetensors"):
        load_adapter(base(), path)
    plain = tmp_path / "plain.safetensors"  # weights, but no adapter recipe in the metadata
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match=f"{plain}: not a hybridlm adapter file"):
        read_adapter_config(plain)


# ----------------------------------------------------------------------------------------- numerical guard

class PoisonLogits(Callback):
    """Multiplies the logits by NaN at the given global steps (NaN loss, NaN gradients)."""

    def __init__(self, steps):
        self.steps, self.active = set(steps), False

    def setup(self, trainer, pl_module, stage):
        pl_module.model.lm_head.register_forward_hook(lambda m, i, out: out * float("nan") if self.active else out)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.active = trainer.global_step in self.steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.active = False


class PoisonGradient(Callback):
    """An infinite gradient in one weight at the given global steps; the loss stays finite."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step in self.steps:
            pl_module.model.backbone.embedding.weight.grad[0, 0] = float("inf")


class WatchSteps(Callback):
    """Records, per global step, whether the weights and the optimizer's step counts changed, and the loss."""

    def __init__(self):
        self.weights_changed, self.optimizer_changed, self.loss, self.weights_before = {}, {}, {}, {}

    @staticmethod
    def _opt_steps(trainer):
        return [float(s["step"]) for s in trainer.optimizers[0].state.values()]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step = trainer.global_step
        self.weights_before[self._step] = {k: v.clone() for k, v in pl_module.model.state_dict().items()}
        self._opt = self._opt_steps(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        before = self.weights_before[self._step]
        now = pl_module.model.state_dict()
        self.weights_changed[self._step] = any(not torch.equal(before[k], now[k]) for k in before)
        self.optimizer_changed[self._step] = self._opt_steps(trainer) != self._opt
        self.loss[self._step] = float(outputs["loss"])


GUARD_RUN = ["checkpoint.every_n_steps=2", "checkpoint.keep_last=5", "checkpoint.save_best=false",
             "trainer.val_check_interval=100"]


def guard_messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "hybridlm.guards"]


def test_nonfinite_steps_are_skipped_and_logged(tmp_path, monkeypatch, caplog):
    watch = WatchSteps()
    with caplog.at_level(logging.WARNING, logger="hybridlm.guards"):
        train_in_process(tmp_path / "run", [*GUARD_RUN, "trainer.max_steps=8", "guard.max_consecutive=2"],
                         monkeypatch, [PoisonLogits({2}), PoisonGradient({5}), watch])
    assert watch.loss[2] != watch.loss[2] and all(watch.loss[s] == watch.loss[s] for s in watch.loss if s != 2)
    assert {s for s, c in watch.weights_changed.items() if not c} == {2, 5}  # every other step did update
    assert {s for s, c in watch.optimizer_changed.items() if not c} == {2, 5}  # Adam's moments and counts too
    msgs = guard_messages(caplog)
    assert len(msgs) == 2
    assert "non-finite loss and gradient norm at step 2, batch_idx 2 (data batch 2)" in msgs[0]
    assert "non-finite gradient norm at step 5, batch_idx 5 (data batch 5)" in msgs[1]
    assert "(1 in a row, 2 in the run)" in msgs[1]  # the good steps in between reset the count
    assert ckpt_step(tmp_path / "run" / "checkpoints" / "last.ckpt") == 8
    assert all_finite(tmp_path / "run" / "checkpoints" / "last.ckpt")


def test_consecutive_nonfinite_steps_stop_the_run_with_the_last_good_checkpoint(tmp_path, monkeypatch, caplog):
    watch = WatchSteps()
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="hybridlm.guards"), pytest.raises(NonFiniteError) as e:
        train_in_process(run, [*GUARD_RUN, "trainer.max_steps=12", "guard.max_consecutive=3"],
                         monkeypatch, [PoisonLogits({4, 5, 6, 7}), watch])
    last = run / "checkpoints" / "last.ckpt"
    assert "stopping at step 6 after 3 non-finite steps in a row" in str(e.value)
    assert f"the last good checkpoint is {last}" in str(e.value)
    assert [m.split(",")[0] for m in guard_messages(caplog)] == [
        f"numerical guard: non-finite loss and gradient norm at step {s}" for s in (4, 5, 6)]
    assert ckpt_names(run) == ["last.ckpt", "step000002.ckpt", "step000004.ckpt", "step000006.ckpt"]
    saved = load_checkpoint_file(last)
    assert saved["global_step"] == 6 and all_finite(last)
    # Steps 4 and 5 were skipped, so the checkpoint after them holds the weights step 4 started from.
    good = watch.weights_before[4]
    assert all(torch.equal(saved["state_dict"][f"model.{k}"], v) for k, v in good.items())
    assert 7 not in watch.loss  # the run did not go on


def test_on_nonfinite_stop_ends_the_run_at_the_first_event(tmp_path, monkeypatch):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="stopping at step 3 after guard.on_nonfinite=stop"):
        train_in_process(run, [*GUARD_RUN, "trainer.max_steps=8", "guard.on_nonfinite=stop"],
                         monkeypatch, [PoisonGradient({3})])
    assert ckpt_step(run / "checkpoints" / "last.ckpt") == 2 and all_finite(run / "checkpoints" / "last.ckpt")


class CorruptWeights(Callback):
    """Writes a NaN into a weight after the update of the given global step, before its checkpoint is saved."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.backbone.norm_f.weight[0] = float("nan")


def test_no_checkpoint_is_written_with_nonfinite_weights(tmp_path, monkeypatch):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="refusing to write a checkpoint at step 4: non-finite weights in "
                                             r"\['model.backbone.norm_f.weight'\]"):
        train_in_process(run, [*GUARD_RUN, "trainer.max_steps=8"], monkeypatch, [CorruptWeights(4)])
    assert ckpt_names(run) == ["last.ckpt", "step000002.ckpt"]
    assert ckpt_step(run / "checkpoints" / "last.ckpt") == 2 and all_finite(run / "checkpoints" / "last.ckpt")
