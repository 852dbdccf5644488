"""Import names that are ours alone: no clash with PyPI's ``preprocess``, a user's
``preprocess.py`` or the standard library, and import errors that name their cause."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CACHE, ROOT

BIN = Path(sys.executable).parent


def _run(cmd: list[str], cwd: Path, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_folder_name_preprocess_is_not_an_import_name(tmp_path):
    proc = _run([sys.executable, "-c", "import preprocess"], cwd=tmp_path)
    assert proc.returncode != 0 and "No module named 'preprocess'" in proc.stderr
    proc = _run(
        [sys.executable, "-c", "import fgit_preprocess.cli, axolotl_fgit.contract"], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr


def test_cli_works_beside_pypi_preprocess_and_a_users_preprocess_py(tmp_path):
    pypi = CACHE / "pypi-preprocess"
    assert (pypi / "preprocess.py").exists(), (
        "run scripts/setup.sh (installs PyPI's preprocess here)"
    )
    (tmp_path / "preprocess.py").write_text("raise RuntimeError('the user module was imported')\n")
    probe = _run([sys.executable, "-c", "import preprocess"], cwd=tmp_path, pythonpath=str(pypi))
    assert "the user module was imported" in probe.stderr  # the name is taken, twice over
    for cmd in (
        [str(BIN / "fgit-preprocess"), "--help"],
        [sys.executable, "-m", "fgit_preprocess", "masks", "--help"],
    ):
        proc = _run(cmd, cwd=tmp_path, pythonpath=f"{tmp_path}{os.pathsep}{pypi}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "--input" in proc.stdout or "masks" in proc.stdout


def test_no_module_shadows_the_standard_library():
    ours = [
        p.stem
        for folder in ("axolotl_fgit", "preprocess", "bench")
        for p in (ROOT / folder).glob("*.py")
    ]
    clashes = sorted(set(ours) & set(sys.stdlib_module_names))
    assert not clashes, f"modules named like stdlib modules: {clashes}"


def test_strategy_import_failure_names_the_real_error(monkeypatch):
    """Axolotl's loader hides a ModuleNotFoundError as 'unhandled prompt tokenization
    strategy'; ours surfaces as an ImportError that names the missing module."""
    from axolotl.prompt_strategies import load

    monkeypatch.delitem(sys.modules, "axolotl_fgit.strategy", raising=False)
    monkeypatch.setitem(sys.modules, "axolotl_fgit.contract", None)  # as if it were missing
    with pytest.raises(ImportError, match="axolotl_fgit.contract") as err:
        load("axolotl_fgit.strategy", None, {}, {})
    assert not isinstance(err.value, ModuleNotFoundError)
