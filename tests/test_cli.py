"""The command line end to end, through real subprocesses: `python -m hybridlm.train ...`.

Each process pays the imports (torch, Lightning, Hydra) and a run, 10-40 s on 2 cores: the default suite keeps one
end-to-end run per kind (training, a multirun, DDP, evaluation, a bad config); the others are marked slow
(`make test-all`)."""
import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY_MODEL, TWO_STEPS, popen_cli


def test_train_end_to_end_writes_checkpoint_csv_and_offline_wandb(tmp_path, run_cli, tiny_overrides):
    run_dir = tmp_path / "run"
    proc = run_cli("hybridlm.train", [*tiny_overrides, "trainer.max_steps=6", "trainer.val_check_interval=3",
                                      f"hydra.run.dir={run_dir}"])
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("hybridlm: done") and str(run_dir) in last, last
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    assert any(r.get("val/loss") for r in rows) and any(r.get("train/loss") for r in rows)
    offline = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert offline, list(run_dir.rglob("*"))[:50]
    assert "wandb sync" in last
    assert json.loads((run_dir / "result.json").read_text())["status"] == "ok"


@pytest.mark.parametrize("override,expected", [
    pytest.param("model.d_model=-4", "model.d_model", marks=pytest.mark.slow),
    pytest.param("model.layer_pattern=MXA", "model.layer_pattern", marks=pytest.mark.slow),
    ("model.d_modle=64", "d_modle"),  # a typo, the commonest mistake: Hydra's schema error through the CLI
    pytest.param("model.attn.window=0", "model.attn.window", marks=pytest.mark.slow),
    pytest.param("trainer.max_steps=banana", "trainer.max_steps", marks=pytest.mark.slow),
])
def test_bad_config_fails_before_training_naming_the_key(tmp_path, run_cli, override, expected):
    proc = run_cli("hybridlm.train", [override, f"hydra.run.dir={tmp_path / 'run'}"], check=False, timeout=120)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert expected in out, out[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_multirun_failing_job_does_not_stop_the_sweep(tmp_path, run_cli, tiny_overrides):
    sweep = tmp_path / "sweep"
    proc = run_cli("hybridlm.train", ["-m", *tiny_overrides, "trainer.max_steps=2", "trainer.val_check_interval=2",
                                      "logger=csv", "optim.lr=0.001,-1.0,0.002", f"hydra.sweep.dir={sweep}"])
    summary = json.loads((sweep / "summary.json").read_text())
    assert [r["status"] for r in summary] == ["ok", "failed", "ok"]
    assert "optim.lr" in summary[1]["error"]
    assert "FAILED" in proc.stdout
    for job in ("0", "2"):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_lengthgen_sweep_over_interventions(tmp_path, run_cli):
    """The sweep as researchers type it: `-m +experiment=lengthgen/sweep intervention=...` (shrunk); the list on
    the command line replaces the file's, and tbtt's job trains on contiguous rows."""
    sweep = tmp_path / "sweep"
    small = [*TINY_MODEL, "data.seq_len=32", *TWO_STEPS, "data.synthetic.num_streams=4",
             "data.synthetic.val_streams=2", "data.synthetic.stream_len=4096", "eval.at_fit_end=false"]
    run_cli("hybridlm.train", ["-m", "+experiment=lengthgen/sweep", "intervention=none,tbtt", *small, "logger=csv",
                               f"hydra.sweep.dir={sweep}"])
    summary = json.loads((sweep / "summary.json").read_text())
    assert [(r["status"], r["overrides"].split()[0]) for r in summary] == [("ok", "intervention=none"),
                                                                             ("ok", "intervention=tbtt")]
    from hybridlm.checkpointing.io import load_checkpoint_file

    modes = [load_checkpoint_file(sweep / job / "checkpoints" / "last.ckpt")["hyper_parameters"]["cfg"]["data"]
             ["stream_mode"] for job in ("0", "1")]
    assert modes == ["random", "contiguous"]


def test_ddp_two_cpu_processes(tmp_path, run_cli, tiny_overrides):
    run_dir = tmp_path / "ddp"
    run_cli("hybridlm.train", [*tiny_overrides, "trainer=ddp_cpu", "trainer.max_steps=3",
                               "trainer.val_check_interval=3", "logger=csv", f"hydra.run.dir={run_dir}"])
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    assert any(r.get("val/loss") for r in rows)


def child_pids(pid):
    """Live (not zombie) processes whose parent is `pid`, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="rank 1 ends with its parent through Linux prctl")
def test_ddp_rank_one_ends_when_rank_zero_is_killed(tmp_path, tiny_overrides):
    """`kill -9` of a DDP run's main process (rank 0) must not leave rank 1 behind. With gloo, rank 1 also sees
    the closed connection; with NCCL it would wait out the collective's timeout: the test below covers that."""
    run_dir = tmp_path / "ddp"
    with open(tmp_path / "out.log", "w") as out:
        proc = popen_cli("hybridlm.train", [*tiny_overrides, "trainer=ddp_cpu", "logger=csv",
                                            "trainer.max_steps=100000", "trainer.val_check_interval=100000",
                                            "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"],
                         tmp_path, out, new_session=True)
    try:
        deadline = time.time() + 300
        while not ((run_dir / "csv" / "metrics.csv").is_file() and child_pids(proc.pid)):  # both ranks training
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "out.log").read_text()[-3000:]
            time.sleep(0.1)
        rank_one = child_pids(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 30
        while any(alive(p) for p in rank_one) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in rank_one), "rank 1 outlived rank 0"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="rank 1 ends with its parent through Linux prctl")
def test_a_rank_above_zero_ends_with_the_process_that_launched_it(tmp_path):
    """A rank that is not in a collective (as an NCCL rank waiting out its timeout is not woken) dies with its
    launcher: a stand-in rank 1 sleeps after runner.end_with_launcher(), its launcher is killed."""
    rank = "from hybridlm.runner import end_with_launcher; end_with_launcher(); print(flush=True); time.sleep(300)"
    launcher = ("import os, subprocess, sys, time\n"
                f"child = subprocess.Popen([sys.executable, '-c', 'import time; {rank}'],\n"
                "                         env={**os.environ, 'LOCAL_RANK': '1'}, stdout=subprocess.PIPE)\n"
                "child.stdout.readline()\n"
                "print(child.pid, flush=True)\n"
                "time.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True, cwd=tmp_path,
                            start_new_session=True)
    try:
        rank_one = int(proc.stdout.readline())
        assert alive(rank_one)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 20
        while alive(rank_one) and time.time() < deadline:
            time.sleep(0.05)
        assert not alive(rank_one), "the rank outlived its launcher"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_evaluate_length_report_on_a_trained_checkpoint(tmp_path, run_cli, tiny_overrides):
    run_dir = tmp_path / "run"
    run_cli("hybridlm.train", [*tiny_overrides, "trainer.max_steps=2", "trainer.val_check_interval=2", "logger=csv",
                               f"hydra.run.dir={run_dir}"])
    eval_dir = tmp_path / "eval"
    proc = run_cli("hybridlm.evaluate", [
        f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "eval=length_report", "eval.max_len=128",
        "eval.n_sequences=2", "eval.passkey_lengths=[96]", "eval.passkey_depths=[0.5]", "eval.passkey_samples=1",
        "eval.copy_lengths=[8]", "eval.copy_samples=2", "eval.effrem_points=3", "logger=csv",
        f"hydra.run.dir={eval_dir}"])
    assert "length report" in proc.stdout.strip().splitlines()[-1]
    for name in ("loss_by_position", "effrem", "state_norms", "passkey", "copy"):
        for ext in ("csv", "json", "png"):
            assert (eval_dir / "length_eval" / f"{name}.{ext}").is_file(), (name, ext)
    metrics = json.loads((eval_dir / "result.json").read_text())["metrics"]
    assert "val/loss" in metrics
    assert metrics["length_eval/loss_by_position/last_bucket_over_train_half"] > 0
    assert 0 <= metrics["length_eval/passkey/mean_accuracy"] <= 1


def save_tiny_hf_mamba2(path):
    from transformers import Mamba2Config, Mamba2ForCausalLM
    cfg = Mamba2Config(vocab_size=260, hidden_size=32, num_hidden_layers=2, state_size=16, expand=2, head_dim=16,
                       num_heads=4, n_groups=1, conv_kernel=4, chunk_size=16, tie_word_embeddings=True)
    Mamba2ForCausalLM(cfg).save_pretrained(path)


@pytest.mark.slow
def test_post_train_an_hf_mamba2_checkpoint_with_state_passing(tmp_path, run_cli):
    hf_dir = tmp_path / "hf"
    save_tiny_hf_mamba2(hf_dir)
    run_dir = tmp_path / "run"
    run_cli("hybridlm.train", [f"init_from={hf_dir}", "intervention=state_passing", "data.seq_len=32",
                               "data.batch_size=2", "data.val_batches=2", "trainer.max_steps=2",
                               "trainer.val_check_interval=2", "logger=csv", f"hydra.run.dir={run_dir}"])
    from hybridlm.convert import load_pretrained
    cfg, _ = load_pretrained(run_dir / "checkpoints" / "last.ckpt")
    assert cfg.layer_pattern == "MM" and cfg.d_model == 32 and cfg.ssm.d_state == 16


@pytest.mark.slow
def test_init_from_refuses_a_conflicting_architecture_override(tmp_path, run_cli):
    hf_dir = tmp_path / "hf"
    save_tiny_hf_mamba2(hf_dir)
    proc = run_cli("hybridlm.train", [f"init_from={hf_dir}", "model.ssm.d_state=64", "data.seq_len=32",
                                      "trainer.max_steps=2", "logger=csv", f"hydra.run.dir={tmp_path / 'run'}"],
                   check=False)
    assert proc.returncode != 0
    assert "ssm.d_state" in proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, backend=triton can run here")
def test_backend_that_cannot_run_here_fails_with_the_reason(tmp_path, monkeypatch, run_cli):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    proc = run_cli("hybridlm.train", ["backend=triton", f"hydra.run.dir={tmp_path / 'run'}"], check=False,
                   timeout=120)
    assert proc.returncode != 0
    assert "backend 'triton'" in proc.stderr and "TRITON_INTERPRET" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_optuna_search_with_the_joblib_launcher(tmp_path, run_cli, tiny_overrides):
    sweep = tmp_path / "sweep"
    proc = run_cli("hybridlm.train", ["-m", "+hparams_search=optuna_lr", "hydra.sweeper.n_trials=2",
                                      "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *tiny_overrides,
                                      "trainer.max_steps=2", "trainer.val_check_interval=2", "logger=csv",
                                      f"hydra.sweep.dir={sweep}"])
    summary = json.loads((sweep / "summary.json").read_text())
    assert [r["status"] for r in summary] == ["ok", "ok"]
    assert all(any(o.startswith("optim.lr=") for o in r["overrides"].split()) for r in summary)
    assert (sweep / "optimization_results.yaml").is_file(), proc.stdout[-2000:]
