"""Exact resume under DDP (trainer=ddp_cpu: two CPU processes, gloo): a real `python -m hybridlm.train` whose
whole process group is SIGKILLed after a checkpoint (as a node preemption does; killing rank 0 alone would
leave rank 1 hung in a collective) and restarted with resume=auto logs the same per-step losses, bit for bit,
as a run never interrupted, and ends with the same weights and optimizer state. state_passing is the hard
case: each rank passes its own states and draws its own resets, so each rank's buffers must come back."""
import subprocess
from pathlib import Path

import pytest
from helpers import TINY_RUN, csv_rows, per_step, run_cli
from test_resume import assert_same_final_state, kill_after_checkpoint, logged_steps, model_and_optimizer

STEPS = 12
CKPT_STEP = 4
RUN = [*TINY_RUN, "trainer=ddp_cpu", "logger=csv", "trainer.enable_progress_bar=false", "experiment_name=exp",
       f"trainer.max_steps={STEPS}", f"checkpoint.every_n_steps={CKPT_STEP}", "trainer.val_check_interval=5"]
INTERVENTIONS = {
    "state_passing": ["intervention=state_passing", "intervention.reset_prob=0.25"],  # per-rank states and RNG
    "none": ["intervention=none"],
}
# Each case starts three two-process runs (~1 min on 2 cores, ~2 on a loaded machine): both are slow. The default
# suite trains with DDP in tests/test_cli.py and resumes after a SIGKILL in tests/test_resume.py.
pytestmark = pytest.mark.slow


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else f"({path} was not written)"


def run_ddp(args, run_dir: Path, cwd: Path, timeout: float = 240):
    """hybridlm.train through run_cli, with a failure report that shows where a hung run stopped (a rank left waiting
    in a collective for a rank that did something else); ranks above 0 die with rank 0 when the timeout kills it."""
    try:
        return run_cli("hybridlm.train", [*args, f"hydra.run.dir={run_dir}"], cwd, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
        logs = "\n".join(f"--- {p.name}:\n{tail(p, 2000)}" for p in sorted(run_dir.glob("train*.log")))
        raise AssertionError(f"the run did not end in {timeout:.0f}s\n{out[-3000:]}\n{logs}") from None


@pytest.mark.parametrize("name", list(INTERVENTIONS))
def test_ddp_sigkill_and_resume_auto_is_bitwise_identical(tmp_path, name):
    args = [*RUN, *INTERVENTIONS[name]]
    ref_dir = tmp_path / "ref" / "exp" / "run"
    run_ddp(args, ref_dir, tmp_path)

    crashed = tmp_path / "out" / "exp" / "run1"
    kill_after_checkpoint(args, crashed, tmp_path, step=CKPT_STEP, timeout=300, group=True)
    killed_at = max(logged_steps(crashed))
    # resume=auto takes the newest checkpoint: a step checkpoint, last.ckpt, or best.ckpt written after validation
    resumed_from = max(model_and_optimizer(p)[0] for p in (crashed / "checkpoints").glob("*.ckpt"))
    assert CKPT_STEP <= resumed_from < STEPS and killed_at >= resumed_from

    resumed = tmp_path / "out" / "exp" / "run2"
    proc = run_ddp([*args, "resume=auto"], resumed, tmp_path)
    assert f"continuing from {crashed / 'checkpoints'}" in tail(resumed / "train.log", 10**6)
    assert str(crashed) in proc.stdout.strip().splitlines()[-1]  # the run went on in its own directory
    report = f"killed after step {killed_at}, resumed from step {resumed_from}\n{proc.stdout[-2000:]}"
    assert "starts afresh" not in proc.stdout + proc.stderr, report  # every rank found its own state

    ref, got = csv_rows(ref_dir), csv_rows(crashed)
    for key in ("train/loss", "train/lr", "val/loss"):
        assert per_step(got, key) == per_step(ref, key), f"{key}; {report}"  # CSV strings: exact float32 values
    assert sorted(per_step(got, "train/loss")) == list(range(STEPS))

    assert_same_final_state(ref_dir, crashed, STEPS)
    print(f"ddp {name}: {report.splitlines()[0]}; {STEPS} train losses bitwise equal")
