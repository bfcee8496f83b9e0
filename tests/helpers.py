"""What many tests share: a tiny model, the overrides that make a training run tiny, Hydra composition of conf/,
training in this process and reading its CSV log, and the entry points (`python -m hybridlm.<module>`) in a
subprocess. tests/conftest.py offers them as fixtures; helper modules and module-level lists import them from here.

tests/conftest.py imports this module before any test module: hybridlm, hydra and lightning are imported inside
the functions, so that conftest does not import triton before tests/kernels/conftest.py can set TRITON_INTERPRET.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from hybridlm.models import AttentionConfig, HybridLM, ModelConfig

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# ------------------------------------------------------------------------------------------- tiny models

def tiny_model_config(pattern: str = "MAM", *, attn: AttentionConfig | None = None, **fields) -> ModelConfig:
    """A ModelConfig small enough for a CPU test. `fields`: any ModelConfig field (d_model 32 and vocab_size 50
    unless given) or SSMConfig field (d_state 8, headdim 8 and chunk_size 8 unless given); full attention with 4
    heads unless `attn` is given."""
    from hybridlm.models import AttentionConfig, ModelConfig, SSMConfig

    ssm_names = {f.name for f in dataclasses.fields(SSMConfig)}
    ssm = {"d_state": 8, "headdim": 8, "chunk_size": 8, **{k: v for k, v in fields.items() if k in ssm_names}}
    model = {"d_model": 32, "vocab_size": 50, **{k: v for k, v in fields.items() if k not in ssm_names}}
    attn = attn or AttentionConfig(kind="full", num_heads=4)
    return ModelConfig(layer_pattern=pattern, ssm=SSMConfig(**ssm), attn=attn, **model)


def tiny_model(pattern: str = "MAM", *, seed: int = 0, dtype: torch.dtype = torch.float32, perturb: float = 0.1,
               **cfg) -> HybridLM:
    """HybridLM(tiny_model_config(pattern, **cfg)) from torch seed `seed`, in `dtype`, with `perturb` * N(0, 1)
    added to every 1-D parameter (dt_bias, A_log, D and the norms start constant: perturbed, the state matters).
    perturb=0: the model as initialised, and no further draws from the global generator."""
    from hybridlm.models import HybridLM

    torch.manual_seed(seed)
    model = HybridLM(tiny_model_config(pattern, **cfg)).to(dtype)
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 1:
                    p.add_(perturb * torch.randn_like(p))
    return model



def randomize_ssm_params_(model: torch.nn.Module, seed: int, others: float | None = None) -> None:
    """Non-trivial dt_bias / A_log / D / norm weights (their inits are constants or near-constants), drawn from
    `seed`; `others`: every other parameter becomes others * N(0, 1) too (None: left as initialised)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("dt_bias"):
                p.copy_(0.5 * r - 1.0)  # softplus: dt in about [0.05, 0.7]
            elif name.endswith("A_log"):
                p.copy_(torch.rand(p.shape, generator=g) * 2.0 - 0.5)
            elif name.endswith(".D"):
                p.copy_(r)
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * r)
            elif others is not None:
                p.copy_(others * r)


def assert_close_with_grads(out: torch.Tensor, ref: torch.Tensor, inputs, rtol: float, atol: float) -> None:
    """out == ref, and so are their gradients w.r.t. inputs (named q, k, v in messages) for one random cotangent."""
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    go = torch.randn_like(out)
    grads = torch.autograd.grad((out * go).sum(), inputs)
    grads_ref = torch.autograd.grad((ref * go).sum(), inputs)
    for name, a, r in zip("qkv", grads, grads_ref):
        torch.testing.assert_close(a, r, rtol=rtol, atol=atol, msg=lambda m, name=name: f"grad {name}: {m}")

# ------------------------------------------------------------------------------------- tiny training runs

# The model shrunk to a few thousand parameters per layer (the conf's layer pattern and attention kind stay).
TINY_MODEL = ["model.d_model=32", "model.ssm.d_state=16", "model.ssm.headdim=16"]
# A short run: a tiny model (attention window 16), rows of 32 tokens, two validation batches, warmup of 2 steps.
# Add trainer.max_steps / trainer.val_check_interval / logger as the test needs.
TINY_RUN = [*TINY_MODEL, "model.attn.window=16", "data.seq_len=32", "data.batch_size=2",
            "trainer.limit_val_batches=2", "optim.warmup_steps=2", "trainer.log_every_n_steps=1",
            "data.val_batches=2"]
# Two training steps, then one validation batch.
TWO_STEPS = ["data.batch_size=2", "data.val_batches=1", "trainer.limit_val_batches=1", "trainer.max_steps=2",
             "trainer.val_check_interval=2"]


def compose_config(config_name: str, overrides=(), *, hydra_config: bool = False):
    """conf/<config_name>.yaml composed with `overrides`, as `python -m hybridlm.<config_name>` would (the entry
    point's schema must be registered: train and evaluate by register_configs, generate on import of its module)."""
    from hydra import compose, initialize_config_dir

    from hybridlm.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name, overrides=list(overrides), return_hydra_config=hydra_config)


def train_in_process(run_dir, overrides, monkeypatch=None, extra_callbacks=()):
    """runner.train as `python -m hybridlm.train` calls it, on TINY_RUN with a CSV log and `overrides`, optionally
    with test callbacks appended (through monkeypatch)."""
    from hybridlm import runner

    if extra_callbacks:
        build = runner.build_callbacks
        monkeypatch.setattr(runner, "build_callbacks", lambda cfg, d: build(cfg, d) + list(extra_callbacks))
    cfg = compose_config("train", [*TINY_RUN, "logger=csv", "trainer.enable_progress_bar=false", *overrides])
    return runner.train(cfg, Path(run_dir))


def csv_rows(run_dir):
    with open(Path(run_dir) / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def per_step(rows, key):
    """{step: value string} for the rows that logged `key`; each step must appear once."""
    out = {}
    for r in rows:
        if r.get(key):
            assert int(r["step"]) not in out, f"step {r['step']} logged twice for {key}"
            out[int(r["step"])] = r[key]
    return out


# ------------------------------------------------------------------------------------------ entry points

def cli_env() -> dict[str, str]:
    """The environment of an entry point under test: W&B offline and quiet, no API key, one thread, and Hydra's
    short error messages whatever the caller's shell sets."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_API_KEY", None)
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def run_cli(module: str, args, cwd, *, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` in `cwd`; returns the finished process (returncode, stdout, stderr as text).
    check=True: a non-zero exit fails the test with the ends of both streams."""
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=cli_env(), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}")
    return proc


def popen_cli(module: str, args, cwd, out, *, new_session: bool = False) -> subprocess.Popen:
    """`python -m <module> <args>` started in the background, stdout and stderr to the file `out`; new_session:
    in a session of its own, so os.killpg(proc.pid) reaches every process it starts (DDP ranks)."""
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=cli_env(), stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=new_session)
