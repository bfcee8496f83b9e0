"""Exact resume after a crash: a real `python -m hybridlm.train` killed with SIGKILL after a checkpoint and
restarted with resume=auto logs the same per-step losses, bit for bit, as a run never interrupted, and ends
with the same weights and optimizer state. Plus the pieces that make it so: global RNG states in the
checkpoint, checkpoints on validation steps, resume=auto finding the run's own checkpoint, and a CSV log that
continues across the resume (the W&B run id: test_wandb.py)."""
import contextlib
import csv
import json
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_RUN, csv_rows, per_step, popen_cli, train_in_process
from lightning.pytorch.callbacks import Callback

from hybridlm.checkpointing.callbacks import collect_rng_states, restore_rng_states
from hybridlm.checkpointing.io import load_checkpoint_file
from hybridlm.checkpointing.resume import run_identity
from hybridlm.loggers import ResumableCSVLogger, truncate_csv_log

STEPS = 24
RUN = [*TINY_RUN, "logger=csv", "trainer.enable_progress_bar=false", "experiment_name=exp",
       f"trainer.max_steps={STEPS}", "checkpoint.every_n_steps=4", "trainer.val_check_interval=5"]
INTERVENTIONS = {
    "none": ["intervention=none"],
    "state_passing": ["intervention=state_passing", "intervention.reset_prob=0.25"],  # also uses its own RNG
    "tbtt": ["intervention=tbtt", "data.stream_mode=contiguous"],
}
# Each case runs three 24-step processes (~1.5 min on a loaded 2-core machine). state_passing exercises everything
# `none` does (model, optimizer, schedule, data position, global RNGs) plus callback state with its own RNG: the
# default suite runs it; `none` and tbtt (contiguous rows) are slow.
SIGKILL_CASES = [pytest.param("none", marks=pytest.mark.slow), pytest.param("state_passing"),
                 pytest.param("tbtt", marks=pytest.mark.slow)]


# ------------------------------------------------------------------------------------------------ helpers

def logged_steps(run_dir):
    path = Path(run_dir) / "csv" / "metrics.csv"
    if not path.is_file():
        return set()
    return {int(r["step"]) for r in csv.DictReader(open(path, newline="")) if r.get("train/loss")}


def kill_after_checkpoint(args, run_dir, cwd, step, timeout=120, group=False):
    """Start a run, wait until the checkpoint at `step` exists and a later step was logged (so the resume must
    drop rows and redo work), then SIGKILL it; group=True kills its whole process group at once (every DDP rank,
    as a node preemption does: killing rank 0 alone would leave rank 1 waiting in a collective)."""
    out_path = cwd / f"{Path(run_dir).name}.out"
    with open(out_path, "w") as out:
        proc = popen_cli("hybridlm.train", [*args, f"hydra.run.dir={run_dir}"], cwd, out, new_session=group)
        ckpt = Path(run_dir) / "checkpoints" / f"step{step:06d}.ckpt"
        deadline = time.time() + timeout
        try:
            while not (ckpt.is_file() and max(logged_steps(run_dir), default=-1) > step) and proc.poll() is None:
                assert time.time() < deadline, ("the run did not reach its checkpoint in time:\n"
                                                 + out_path.read_text(errors="replace")[-3000:])
                time.sleep(0.005)
        finally:
            with contextlib.suppress(ProcessLookupError):  # the whole group may have exited already
                if group:
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, (
        f"the run ended on its own (exit {proc.returncode}) before it could be killed:\n"
        + out_path.read_text(errors="replace")[-3000:])


def model_and_optimizer(ckpt_path):
    ckpt = load_checkpoint_file(ckpt_path)
    opt = ckpt["optimizer_states"][0]["state"]
    return ckpt["global_step"], ckpt["state_dict"], opt


def assert_same_final_state(ref_dir, run_dir, steps):
    """Both runs' last.ckpt hold `steps` steps and the same weights and optimizer state, bit for bit."""
    step_a, weights_a, opt_a = model_and_optimizer(Path(ref_dir) / "checkpoints" / "last.ckpt")
    step_b, weights_b, opt_b = model_and_optimizer(Path(run_dir) / "checkpoints" / "last.ckpt")
    assert step_a == step_b == steps
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert all(torch.equal(opt_a[i][s], opt_b[i][s]) for i in opt_a for s in opt_a[i])


# -------------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("name", SIGKILL_CASES)
def test_sigkill_and_resume_auto_is_bitwise_identical(tmp_path, run_cli, name):
    args = [*RUN, *INTERVENTIONS[name]]
    ref_dir = tmp_path / "ref" / "exp" / "run"
    run_cli("hybridlm.train", [*args, f"hydra.run.dir={ref_dir}"])

    crashed = tmp_path / "out" / "exp" / "run1"
    kill_after_checkpoint(args, crashed, tmp_path, step=8)
    killed_at = max(logged_steps(crashed))
    resumed_from, _, _ = model_and_optimizer(crashed / "checkpoints" / "last.ckpt")
    assert 8 <= resumed_from < STEPS and killed_at >= resumed_from

    proc = run_cli("hybridlm.train", [*args, "resume=auto", f"hydra.run.dir={tmp_path / 'out' / 'exp' / 'run2'}"])
    assert f"continuing from {crashed / 'checkpoints'}" in (tmp_path / "out" / "exp" / "run2" / "train.log").read_text()
    assert str(crashed) in proc.stdout.strip().splitlines()[-1]  # the run went on in its own directory

    ref, got = csv_rows(ref_dir), csv_rows(crashed)
    for key in ("train/loss", "train/lr", "val/loss"):
        assert per_step(got, key) == per_step(ref, key), key  # the CSV strings are the exact float32 values
    assert sorted(per_step(got, "train/loss")) == list(range(STEPS))

    assert_same_final_state(ref_dir, crashed, STEPS)
    print(f"{name}: killed after step {killed_at}, resumed from step {resumed_from}; "
          f"{STEPS} train losses bitwise equal")


@pytest.mark.slow
def test_resume_auto_in_a_multirun_continues_each_jobs_own_run(tmp_path, run_cli):
    """A killed sweep relaunched with resume=auto (and more steps): every job continues the earlier job with its
    own overrides, in that job's directory, and the new sweep's summary still lists every job."""
    root = tmp_path / "multirun" / "exp"
    sweep = ["-m", *TINY_RUN, "logger=csv", "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=2",
             "trainer.val_check_interval=2", "intervention=none,state_passing"]
    run_cli("hybridlm.train", [*sweep, "trainer.max_steps=2", f"hydra.sweep.dir={root / 's1'}"])
    run_cli("hybridlm.train", [*sweep, "trainer.max_steps=4", "resume=auto", f"hydra.sweep.dir={root / 's2'}"])
    for job, intervention in enumerate(["none", "state_passing"]):
        ckpt = load_checkpoint_file(root / "s1" / str(job) / "checkpoints" / "last.ckpt")
        assert ckpt["global_step"] == 4
        assert ckpt["hyper_parameters"]["cfg"]["intervention"]["name"] == intervention
        assert not (root / "s2" / str(job) / "checkpoints").exists()
    summary = json.loads((root / "s2" / "summary.json").read_text())
    assert [r["status"] for r in summary] == ["ok", "ok"]
    results = [json.loads((root / "s2" / job / "result.json").read_text()) for job in ("0", "1")]
    assert [r["out_dir"] for r in results] == [str(root / "s1" / "0"), str(root / "s1" / "1")]


def test_run_identity_ignores_what_a_resume_may_change():
    launch = ["+experiment=lengthgen/tbtt", "optim.lr=1e-3", "hydra.run.dir=out/a", "trainer.max_steps=10"]
    resumed = ["optim.lr=1e-3", "+experiment=lengthgen/tbtt", "resume=auto", "trainer.max_steps=20",
               "hydra.run.dir=out/b", "hydra/launcher=joblib", "trainer.enable_progress_bar=false"]
    assert run_identity(launch) == run_identity(resumed) == ["+experiment=lengthgen/tbtt", "optim.lr=1e-3"]
    assert run_identity([*launch, "optim.lr=2e-3"]) != run_identity(launch)


@pytest.mark.parametrize("intervention", ["random_noise", "fitted_noise"])
def test_noise_interventions_resume_bitwise_in_process(tmp_path, intervention):
    """The noise callbacks draw from their own checkpointed generators, fitted_noise from checkpointed
    statistics: resuming from step 4 reproduces steps 4-7 exactly."""
    common = ["trainer.max_steps=8", "checkpoint.every_n_steps=4", "checkpoint.keep_last=2",
              "trainer.val_check_interval=3", f"intervention={intervention}"]
    train_in_process(tmp_path / "full", common)
    train_in_process(tmp_path / "resumed", [*common, f"resume={tmp_path / 'full/checkpoints/step000004.ckpt'}"])
    full, resumed = per_step(csv_rows(tmp_path / "full"), "train/loss"), per_step(csv_rows(tmp_path / "resumed"),
                                                                                "train/loss")
    assert sorted(resumed) == [4, 5, 6, 7]
    assert all(resumed[s] == full[s] for s in resumed)
    a = load_checkpoint_file(tmp_path / "full/checkpoints/last.ckpt")["state_dict"]
    b = load_checkpoint_file(tmp_path / "resumed/checkpoints/last.ckpt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


class DrawRandom(Callback):
    """Draws from every global RNG at each batch start, as dropout or a data augmentation would."""

    def __init__(self):
        self.draws = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.draws[trainer.global_step] = (torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random())


def test_global_rngs_draw_the_same_numbers_after_a_resume(tmp_path, monkeypatch):
    """Validation right after the step-4 checkpoint creates a DataLoader iterator (one torch draw) in the full
    run but not in the resumed one; per-batch seeding makes that irrelevant."""
    common = ["trainer.max_steps=8", "checkpoint.every_n_steps=4", "trainer.val_check_interval=4"]
    full = DrawRandom()
    train_in_process(tmp_path / "full", common, monkeypatch, [full])
    resumed = DrawRandom()
    monkeypatch.undo()
    # A new process would start from seed_everything(seed) again; so does this one (runner.train seeds it).
    train_in_process(tmp_path / "resumed", [*common, f"resume={tmp_path / 'full' / 'checkpoints' / 'step000004.ckpt'}"],
                     monkeypatch, [resumed])
    assert sorted(resumed.draws) == [4, 5, 6, 7]
    assert all(resumed.draws[s] == full.draws[s] for s in resumed.draws)
    assert full.draws[4] != full.draws[0]  # without the restore, the reseeded run would draw step 0's numbers


class CheckpointsSeenByValidation(Callback):
    """The step checkpoints on disk when each validation starts."""

    def __init__(self, ckpt_dir):
        self.ckpt_dir, self.seen = Path(ckpt_dir), {}

    def on_validation_start(self, trainer, pl_module):
        self.seen[trainer.global_step] = sorted(p.name for p in self.ckpt_dir.glob("step*.ckpt"))


@pytest.mark.parametrize("val_batches", [2, 0])
def test_a_checkpoint_due_on_a_validation_step_is_written_after_the_validation(tmp_path, monkeypatch, val_batches):
    """Written before it, the checkpoint of step 4 would let a run killed during that validation resume after
    it: the validation would never run. Without validation batches, checkpoints stay on their steps."""
    common = ["trainer.max_steps=8", "checkpoint.every_n_steps=2", "checkpoint.keep_last=8",
              "trainer.val_check_interval=4", f"data.val_batches={val_batches}"]
    seen = CheckpointsSeenByValidation(tmp_path / "full" / "checkpoints")
    train_in_process(tmp_path / "full", common, monkeypatch, [seen])
    steps = sorted(int(p.stem[4:]) for p in (tmp_path / "full" / "checkpoints").glob("step*.ckpt"))
    assert steps == [2, 4, 6, 8]
    if not val_batches:
        assert seen.seen == {} and not per_step(csv_rows(tmp_path / "full"), "val/loss")
        return
    assert seen.seen == {4: ["step000002.ckpt"], 8: ["step000002.ckpt", "step000004.ckpt", "step000006.ckpt"]}
    monkeypatch.undo()
    train_in_process(tmp_path / "resumed", [*common, f"resume={tmp_path / 'full/checkpoints/step000004.ckpt'}"])
    full, resumed = csv_rows(tmp_path / "full"), csv_rows(tmp_path / "resumed")
    # The validation after step 4 is logged at step 3 (the index of the batch it follows) by the original run.
    assert sorted(per_step(full, "val/loss")) == [3, 7] and sorted(per_step(resumed, "val/loss")) == [7]
    assert per_step(resumed, "val/loss")[7] == per_step(full, "val/loss")[7]
    assert per_step(resumed, "train/loss") == {s: v for s, v in per_step(full, "train/loss").items() if s >= 4}


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()  # numpy now holds a cached gaussian: part of its state
    states = collect_rng_states()
    expected = (torch.rand(4), np.random.randn(4), [random.random() for _ in range(4)])
    torch.save(states, tmp_path / "rng.pt")
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    restore_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(4), expected[0])
    assert np.array_equal(np.random.randn(4), expected[1])
    assert [random.random() for _ in range(4)] == expected[2]


def test_csv_log_continues_across_a_resume(tmp_path, monkeypatch):
    """In process: a finished 4-step run is extended to 8 steps with resume=auto; the CSV keeps steps 0-3 and
    holds 4-7 once, where Lightning's own CSVLogger would have deleted the file."""
    root = tmp_path / "exp"
    common = ["checkpoint.every_n_steps=2", "trainer.val_check_interval=2"]
    train_in_process(root / "run1", [*common, "trainer.max_steps=4"])
    before = per_step(csv_rows(root / "run1"), "train/loss")
    train_in_process(root / "run2", [*common, "trainer.max_steps=8", "resume=auto"])
    after = per_step(csv_rows(root / "run1"), "train/loss")
    assert sorted(after) == list(range(8))
    assert {s: after[s] for s in before} == before
    assert not (root / "run2" / "csv").exists()


def test_csv_logger_appends_to_an_existing_log_and_widens_its_header(tmp_path):
    path = tmp_path / "csv" / "metrics.csv"
    path.parent.mkdir()
    path.write_text("epoch,step,train/loss\n0,0,5.5\n0,1,5.4\n")
    logger = ResumableCSVLogger(str(tmp_path), name="csv", version="")
    logger.log_metrics({"train/loss": 5.25, "epoch": 0}, step=2)  # written at once, not after 100 steps
    assert [r["train/loss"] for r in csv.DictReader(open(path, newline=""))] == ["5.5", "5.4", "5.25"]
    logger.log_metrics({"val/loss": 5.0, "epoch": 0}, step=2)  # a new column: the file is rewritten
    rows = list(csv.DictReader(open(path, newline="")))
    assert [(r["step"], r["train/loss"], r["val/loss"]) for r in rows] == [
        ("0", "5.5", ""), ("1", "5.4", ""), ("2", "5.25", ""), ("2", "", "5.0")]
    assert not [p.name for p in path.parent.iterdir() if p.suffix == ".tmp"]  # no temporary file left


def test_truncate_csv_log_drops_later_and_cut_rows(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train/loss,val/loss\n0,0,5.5,\n0,1,5.4,\n0,1,,5.3\n0,2,5.2,\n0,3,5.1,\n0,4,5.")
    assert truncate_csv_log(path, from_step=3) == 4
    rows = list(csv.DictReader(open(path, newline="")))
    assert [(r["step"], r["train/loss"], r["val/loss"]) for r in rows] == [
        ("0", "5.5", ""), ("1", "5.4", ""), ("1", "", "5.3"), ("2", "5.2", "")]
    assert truncate_csv_log(path, from_step=10) == 4  # nothing past the resume point: unchanged
    path.write_text(path.read_text() + "0,3,5.")  # a kill in the middle of a row
    assert truncate_csv_log(path, from_step=10) == 4
