import os

import helpers
import pytest
import torch

# Tests are small: one thread each avoids oversubscribing the 2-core CI machine.
torch.set_num_threads(int(os.environ.get("HYBRIDLM_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU; none is present")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


# Shared helpers as fixtures (tests/helpers.py holds them, for helper modules and module-level lists too).

@pytest.fixture
def tiny_model():
    """helpers.tiny_model: `tiny_model(pattern, seed=, dtype=, perturb=, **ModelConfig/SSMConfig fields)`."""
    return helpers.tiny_model


@pytest.fixture
def tiny_overrides():
    """A fresh copy of helpers.TINY_RUN, the overrides of a tiny training run, for the test to extend."""
    return list(helpers.TINY_RUN)


@pytest.fixture
def compose_config():
    """helpers.compose_config: `compose_config(config_name, overrides, hydra_config=False)` composes conf/."""
    return helpers.compose_config


@pytest.fixture
def run_cli(tmp_path):
    """helpers.run_cli in the test's tmp_path: `run_cli(module, args, check=True, timeout=600)` runs
    `python -m <module> <args>` and returns the finished process (returncode, stdout, stderr)."""
    def run(module, args, *, check=True, timeout=600, cwd=None):
        return helpers.run_cli(module, args, tmp_path if cwd is None else cwd, check=check, timeout=timeout)
    return run
