"""The Hydra configs ship in the wheel as the package hybridlm.conf, and the runner reads a chosen option from
wherever Hydra found it (the package, or a folder added with hydra.searchpath)."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from hybridlm.config import register_configs
from hybridlm.runner import CONF_DIR, ConfigError, explicit_model_keys

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the tracked config files")
def test_wheel_holds_every_config_file(tmp_path):
    """Build the wheel as `pip wheel .` does, without build isolation (no network): with this environment's
    setuptools, which must then meet pyproject.toml's build-system requirement (torch 2.13 requires it too)."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} here; the build needs setuptools>=77")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "warning" not in proc.stderr.lower(), proc.stderr  # e.g. config folders taken for missing packages
    (wheel,) = tmp_path.glob("hybridlm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = subprocess.run(["git", "ls-files", "conf"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    yaml_files = [f for f in tracked if f.endswith(".yaml")]
    assert len(yaml_files) > 40
    assert {"hybridlm/" + f for f in yaml_files} <= names
    assert not [n for n in names if n.startswith(("conf/", "kernels/"))]


def test_runner_reads_the_packaged_configs():
    import hybridlm.conf

    assert CONF_DIR == Path(hybridlm.conf.__file__).parent
    assert (CONF_DIR / "train.yaml").is_file() and (CONF_DIR / "model" / "attention" / "swa.yaml").is_file()


def test_model_option_from_hydra_searchpath(tmp_path):
    """A model file of the user's own config folder: before, the runner looked for it in the package only and
    failed with FileNotFoundError after Hydra had composed it."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text("defaults:\n  - hybrid_tiny\nd_model: 64\nssm:\n  d_state: 32\n")
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra.searchpath=[file://{tmp_path}]", "model=mine"],
                      return_hydra_config=True)
    assert cfg.model.d_model == 64
    hydra_config = HydraConfig.instance()
    try:
        hydra_config.set_config(cfg)
        # the user's file, and the package's swa.yaml (window and kind: conf/model/attention/swa.yaml)
        assert explicit_model_keys(["model=mine", "model/attention=swa"]) == {
            "d_model", "ssm.d_state", "attn.kind", "attn.window"}
        with pytest.raises(ConfigError, match="model/missing.yaml"):
            explicit_model_keys(["model=missing"])
    finally:
        hydra_config.cfg = None  # other tests run outside a Hydra job
    assert explicit_model_keys(["model=hybrid_tiny"], [CONF_DIR]) >= {"d_model", "layer_pattern", "ssm.d_state"}


def test_slurm_launcher_example_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")  # the [sweep] extra
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 1, 1)
