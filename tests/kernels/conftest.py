"""These tests run the Triton kernels on CPU tensors under Triton's interpreter (on a GPU machine too, so results do
not depend on the hardware). The interpreter must be on (TRITON_INTERPRET=1) before triton is first imported.
Run alone on a CPU-only machine (`pytest tests/kernels`), this conftest switches it on in time. Otherwise (some
module collected earlier, e.g. lightning, peft or torch._dynamo, imported triton already; or a GPU is present,
where other tests need the real compiler) the kernel tests selected in this session run once, together, in a
fresh subprocess with the interpreter on, and each test reports the outcome it had there (failures show the
subprocess's output). Other tests are unaffected either way.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

HERE = Path(__file__).parent


def _in_process() -> bool:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    lang = sys.modules.get("triton.language")
    return lang is None or type(lang.zeros).__name__ == "InterpretedFunction"


_SELECTED: list[str] = []
_OUTCOMES: dict[str, tuple[str, str]] = {}  # nodeid -> (passed | failed | skipped, message)


@pytest.hookimpl(trylast=True)  # after -m / -k deselection
def pytest_collection_modifyitems(config, items):
    _SELECTED[:] = [it.nodeid for it in items if Path(str(it.fspath)).parent == HERE]


def _junit_key(nodeid: str) -> tuple[str, str]:
    path, name = nodeid.split("::", 1)
    return path[:-3].replace("/", "."), name


def _run_subprocess(rootdir: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "", "-p", "no:cacheprovider", f"--junitxml={report}",
               *_SELECTED]
        proc = subprocess.run(cmd, cwd=rootdir, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True,
                              text=True)
        by_key = {}
        if report.exists():
            for case in ET.parse(report).getroot().iter("testcase"):
                kind, msg = "passed", ""
                for child in case:
                    if child.tag in ("failure", "error"):
                        kind, msg = "failed", (child.get("message") or "") + "\n" + (child.text or "")
                    elif child.tag == "skipped":
                        kind, msg = "skipped", child.get("message") or ""
                by_key[(case.get("classname"), case.get("name"))] = (kind, msg)
    for nodeid in _SELECTED:
        _OUTCOMES[nodeid] = by_key.get(_junit_key(nodeid), (
            "failed", f"no result in the subprocess run (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n"
                      f"{proc.stderr[-4000:]}"))


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if _in_process():
        return None  # run normally
    if not _OUTCOMES:
        _run_subprocess(Path(str(pyfuncitem.config.rootpath)))
    kind, msg = _OUTCOMES[pyfuncitem.nodeid]
    if kind == "failed":
        pytest.fail(f"(in a TRITON_INTERPRET=1 subprocess) {msg}", pytrace=False)
    if kind == "skipped":
        pytest.skip(msg)
    return True
