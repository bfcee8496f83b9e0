"""W&B never kills a run, and a resumed run continues the same W&B run. Each scenario runs in its own
subprocess: W&B keeps per-process global state (settings, service, a joined asyncio manager after teardown),
so in-process scenarios would leak into each other."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import TINY

from hybridlm.checkpointing import RunStateCallback, load_checkpoint_file
from hybridlm.runner import CONF_DIR

DRIVER = """
import json, sys
from pathlib import Path
from hydra import compose, initialize_config_dir
from hybridlm.config import register_configs
from hybridlm.runner import train
{patch}
register_configs()
with initialize_config_dir(config_dir={conf!r}, version_base="1.3"):
    cfg = compose("train", overrides={overrides!r})
result = train(cfg, Path({out!r}), set())
print("RESULT " + json.dumps({{"wandb": result["wandb"], "out_dir": result["out_dir"]}}))
"""
RUN = [*TINY, "logger=default", "trainer.enable_progress_bar=false", "trainer.max_steps=3",
       "trainer.val_check_interval=3"]


def run_driver(out, overrides, env_extra=None, patch=""):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
           **(env_extra or {})}
    if "WANDB_API_KEY" not in (env_extra or {}):
        env.pop("WANDB_API_KEY", None)
    code = DRIVER.format(patch=patch, conf=str(CONF_DIR), overrides=[*RUN, *overrides], out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env,
                          cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    return result, proc.stderr


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


@pytest.mark.slow  # known gap: in a fresh clone W&B answers "run ID ... is in use" when the resumed process
# starts right after the first one (its service still holds the id); passes on a machine where it has run before
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
    assert second["wandb"] and second["wandb"].endswith(run_id), stderr[-3000:]
    ckpt = load_checkpoint_file(root / "run1" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4
    assert ckpt["callbacks"][RunStateCallback.__qualname__]["wandb_run_id"] == run_id
    assert len(list((root / "run1" / "wandb").glob(f"offline-run-*-{run_id}"))) >= 1
    assert not Path(root / "run2" / "checkpoints").exists()
