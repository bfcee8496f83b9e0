"""Packaging: kernels/ installs as hybridlm.kernels, never as a top-level `kernels` (the name of Hugging Face's
kernel hub on PyPI, which transformers probes for), conf/ as hybridlm.conf, and the explicit package list in
pyproject.toml names every package folder, so a new one cannot silently go missing from the wheel."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_under_the_hybridlm_namespace():
    setuptools_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools_cfg["package-dir"] == {"hybridlm.kernels": "kernels", "hybridlm.conf": "conf"}
    on_disk = set()
    for top, name in (("hybridlm", "hybridlm"), ("kernels", "hybridlm.kernels"), ("conf", "hybridlm.conf")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            on_disk.add(".".join((name, *rel)))
    assert set(setuptools_cfg["packages"]) == on_disk


def test_installed_package_has_no_top_level_kernels(tmp_path):
    """Run outside the repository (which would put its own kernels/ on sys.path) with the installed package."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import importlib.util as u; "  # find_spec imports only the parent package, hybridlm (no torch)
            "assert u.find_spec('hybridlm.kernels') is not None; "
            "assert u.find_spec('kernels') is None, u.find_spec('kernels')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
