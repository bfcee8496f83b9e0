"""What a short `python -m hybridlm.train` prints: the backend table once, a progress bar counted in steps, and
none of the library messages that hybridlm fixes at their cause or filters (hybridlm/console.py)."""
import os
import re
import subprocess
import sys

TINY = ["model.d_model=32", "model.ssm.d_state=16", "model.ssm.headdim=16", "model.attn.window=16",
        "data.seq_len=32", "data.batch_size=2", "data.val_batches=2", "trainer.limit_val_batches=2"]

# Text each message would print, as Lightning 2.6 / torch 2.13 word it.
NOISE = {
    "torch's LeafSpec deprecation, raised by Lightning's pytree helper": "LeafSpec",
    "Lightning's caution about an IterableDataset with __len__": "has `__len__` defined",
    "Lightning's batch-size inference": "infer the `batch_size`",
    "Lightning's epoch title with max_epochs=-1": "Epoch 0/",
    "Lightning's advert on every fit": "litlogger",
    "Lightning's model summary (its FLOPs read 0)": "FLOPs",
}


def test_short_run_prints_table_once_steps_and_no_library_noise(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "hybridlm.train", *TINY, "trainer.max_steps=3",
                           "trainer.val_check_interval=2", "logger.wandb=false", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "val/loss" in out  # validation ran, where the batch-size inference warned
    assert out.count("op backends:") == 1, out
    assert {name for name, text in NOISE.items() if text in out} == set(), out
    assert re.search(r"step: 100%\|[^|]*\| 3/3 ", out), out  # steps over trainer.max_steps
    assert re.search(r"model: [\d,]+ parameters \([\d,]+ non-embedding\), [\d,]+ trainable", out), out
