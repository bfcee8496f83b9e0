"""W&B never kills a run, and a resumed run continues the same W&B run. Each scenario runs in its own
subprocess: W&B keeps per-process global state (settings, service, a joined asyncio manager after teardown),
so in-process scenarios would leak into each other. All slow (each process starts W&B's service, 25-50 s on a loaded
2-core machine): the default suite logs to W&B offline in tests/test_cli.py."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TINY_RUN, cli_env

from hybridlm.checkpointing.callbacks import RunStateCallback
from hybridlm.checkpointing.io import load_checkpoint_file
from hybridlm.runner import CONF_DIR

pytestmark = pytest.mark.slow

DRIVER = """
import json, sys
from pathlib import Path
from hydra import compose, initialize_config_dir
from hybridlm.config import register_configs
from hybridlm.runner import train
{patch}
register_configs()
for out, overrides in {runs!r}:
    with initialize_config_dir(config_dir={conf!r}, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    result = train(cfg, Path(out), set())
    print("RESULT " + json.dumps({{"wandb": result["wandb"], "out_dir": result["out_dir"]}}), flush=True)
{tail}
"""
RUN = [*TINY_RUN, "logger=default", "trainer.enable_progress_bar=false", "trainer.max_steps=3",
       "trainer.val_check_interval=3"]


def run_driver(out, overrides, env_extra=None, patch="", more_runs=(), tail=""):
    """Train in a fresh process (then, in the same process, each of `more_runs`: (out, overrides)); returns the
    first run's result (a list of all results when more_runs is given) and the process's stderr."""
    env = {**cli_env(), **(env_extra or {})}
    runs = [(str(o), [*RUN, *ovs]) for o, ovs in [(out, overrides), *more_runs]]
    code = DRIVER.format(patch=patch, conf=str(CONF_DIR), runs=runs, tail=tail)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env,
                          cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(chunk.splitlines()[0]) for chunk in proc.stdout.split("RESULT ")[1:]]
    assert len(results) == len(runs), proc.stdout[-2000:] + proc.stderr[-3000:]
    return (results if more_runs else results[0]), proc.stderr


def assert_trained_with_csv_only(out, stderr, result):
    warnings = [line for line in stderr.splitlines() if "W&B could not start" in line]
    assert len(warnings) == 1, warnings
    assert stderr.count("continuing with the CSV log only") == 1  # the cause may span lines before it
    assert result["wandb"] is None
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert "train/loss" in (out / "csv" / "metrics.csv").read_text().splitlines()[0]
    return warnings[0]


def test_wandb_that_raises_on_init_leaves_training_running(tmp_path):
    patch = ("import wandb\n"
             "def _broken(*a, **k): raise wandb.errors.CommError('service unavailable (503)')\n"
             "wandb.init = _broken")
    result, stderr = run_driver(tmp_path / "run", [], patch=patch)
    assert "service unavailable (503)" in assert_trained_with_csv_only(tmp_path / "run", stderr, result)


def test_wandb_with_unreachable_server_leaves_training_running(tmp_path):
    start = time.time()
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "0123456789" * 4,  # well-formed, fake
           "WANDB_BASE_URL": "http://127.0.0.1:9"}  # the discard port: connection refused
    result, stderr = run_driver(tmp_path / "run", ["logger.wandb_init_timeout=3"], env_extra=env)
    assert_trained_with_csv_only(tmp_path / "run", stderr, result)
    assert time.time() - start < 90


def test_wandb_run_id_is_checkpointed_and_resumed(tmp_path):
    root = tmp_path / "exp"
    root.mkdir()
    # A loaded machine can take long to start W&B's service; the other tests check what happens when it can't.
    common = ["checkpoint.every_n_steps=2", "trainer.val_check_interval=2", "logger.wandb_init_timeout=300"]
    first, stderr = run_driver(root / "run1", [*common, "trainer.max_steps=2"])
    assert first["wandb"], stderr[-3000:]
    ckpt = load_checkpoint_file(root / "run1" / "checkpoints" / "last.ckpt")
    run_id = ckpt["callbacks"][RunStateCallback.__qualname__]["wandb_run_id"]
    assert run_id and first["wandb"].endswith(run_id)
    second, stderr = run_driver(root / "run2", [*common, "trainer.max_steps=4", "resume=auto"])
    assert second["out_dir"] == str(root / "run1")
    # Without run_id, W&B would have drawn a new random id.
    assert second["wandb"] and run_id in Path(second["wandb"]).name, stderr[-3000:]
    ckpt = load_checkpoint_file(root / "run1" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4
    assert ckpt["callbacks"][RunStateCallback.__qualname__]["wandb_run_id"] == run_id
    assert len(list((root / "run1" / "wandb").glob(f"offline-run-*-{run_id}*"))) == 2
    assert not Path(root / "run2" / "checkpoints").exists()


@pytest.fixture
def shared_wandb_service(tmp_path):
    """A detached W&B service as `wandb beta core start` makes it for many worker processes: every process
    started with its WANDB_SERVICE token logs through it."""
    env = {**os.environ, "WANDB_SILENT": "true"}
    env.pop("WANDB_SERVICE", None)
    wandb_cli = shutil.which("wandb", path=str(Path(sys.executable).parent))
    start = subprocess.run([wandb_cli, "beta", "core", "start", "--idle-timeout", "5m"], capture_output=True,
                           text=True, timeout=300, env=env, cwd=tmp_path)
    assert start.returncode == 0, start.stderr
    token = start.stdout.split()[0]
    yield token
    subprocess.run([wandb_cli, "beta", "core", "stop"], capture_output=True, timeout=120,
                   env={**env, "WANDB_SERVICE": token}, cwd=tmp_path)


def test_resume_after_a_kill_reuses_the_run_id_held_open_by_a_shared_wandb_service(tmp_path, shared_wandb_service):
    """The killed run never closed its W&B run, so the shared service still holds the id and refuses to open it
    again ("run ID ... is in use"); the resumed run must still log to that id, not fall back to CSV only."""
    root = tmp_path / "exp"
    root.mkdir()
    env = {"WANDB_SERVICE": shared_wandb_service}
    common = ["checkpoint.every_n_steps=2", "trainer.val_check_interval=2", "logger.wandb_init_timeout=300"]
    # Like a SIGKILL after the last checkpoint: the process ends without closing its W&B run or running atexit.
    killed = "import hybridlm.loggers\nhybridlm.loggers.finish_wandb = lambda loggers, failed: None"
    first, stderr = run_driver(root / "run1", [*common, "trainer.max_steps=2"], env_extra=env, patch=killed,
                               tail="import os; os._exit(0)")
    assert first["wandb"], stderr[-3000:]
    run_id = load_checkpoint_file(root / "run1" / "checkpoints" / "last.ckpt")["callbacks"][
        RunStateCallback.__qualname__]["wandb_run_id"]
    second, stderr = run_driver(root / "run2", [*common, "trainer.max_steps=4", "resume=auto"], env_extra=env)
    assert f"W&B run {run_id} is still open in the shared W&B service" in stderr
    assert "W&B could not start" not in stderr
    assert second["wandb"] and run_id in Path(second["wandb"]).name, stderr[-3000:]


def test_runs_in_one_process_log_to_separate_wandb_runs(tmp_path):
    """Hydra's basic launcher runs the jobs of a multirun one after another in one process: each job must get
    its own W&B run (Lightning's WandbLogger reuses any run still open in the process)."""
    (tmp_path / "exp").mkdir()
    results, stderr = run_driver(tmp_path / "exp" / "job0", [], more_runs=[(tmp_path / "exp" / "job1", [])])
    assert all(r["wandb"] for r in results), stderr[-3000:]
    dirs = [Path(r["wandb"]) for r in results]
    assert [d.parent for d in dirs] == [tmp_path / "exp" / job / "wandb" for job in ("job0", "job1")]
    assert dirs[0].name.split("-")[-1] != dirs[1].name.split("-")[-1]  # offline-run-<time>-<run id>
