"""The package as people install tools: `python -m build` makes a wheel and an sdist carrying the C
kernel sources, the page's static files and the remote modeling file; the wheel, installed into a
fresh venv (no system site-packages) and run from a folder with no repository around, prepares data,
trains, generates (the C kernels compiled from the wheel's sources; with no C compiler, torch's ops)
and serves one request.

The fresh venv gets gpt-small from the wheel only. Its dependencies are the locked ones already
installed in the environment running this test, reached through one .pth line, so nothing is
downloaded or unpacked again (tests/test_lock.py installs the lock itself into a fresh venv);
`pip check` then holds the wheel's declared requirements against those locked versions.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import time
import urllib.error
import urllib.request
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CARRIED = ["gpt_small/ops/csrc/decode.c", "gpt_small/ops/csrc/gelu.c", "gpt_small/serve/static/index.html",
           "gpt_small/interop/remote/modeling_gpt_small.py"]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(wheel, sdist): the sdist from the tree, the wheel from the sdist (build's default, so the wheel
    proves the sdist complete); nothing downloaded (--no-isolation: the locked setuptools)."""
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
         env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    (wheel,), (sdist,) = out.glob("*.whl"), out.glob("*.tar.gz")
    return wheel, sdist


@pytest.mark.slow
def test_the_wheel_and_the_sdist_carry_kernels_static_files_and_the_remote_modeling_file(built):
    wheel, sdist = built
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in CARRIED:
        assert path in names, path
    assert any(n.endswith("entry_points.txt") for n in names)
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    with tarfile.open(sdist) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    for path in [*CARRIED, "pyproject.toml", "README.md"]:
        assert path in members, path
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Requires-Python: >=3.11" in metadata


@pytest.fixture(scope="module")
def installed(built, tmp_path_factory) -> Path:
    """A fresh venv's bin folder, gpt-small installed into it from the wheel."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.create(env_dir, system_site_packages=False, with_pip=False)
    py = env_dir / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "locked_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(py)]
    _run([*pip, "install", "-q", "--no-deps", "--no-index", str(built[0])])
    check = subprocess.run([*pip, "check"], capture_output=True, text=True, timeout=300)
    # the wheel's requirements are met by the locked versions (the data-only packages are installed
    # without their stale requirements on purpose: requirements-data.in)
    assert not [line for line in check.stdout.splitlines() if line.startswith("gpt-small ")], check.stdout
    assert "gpt-small" in _run([*pip, "list"]).stdout
    return env_dir / "bin"


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "CC")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "GPT_SMALL_CACHE": str(tmp / "cache"), **extra}


@pytest.mark.slow
def test_the_installed_wheel_prepares_trains_generates_and_serves_with_no_repository_around(installed, tmp_path,
                                                                                              verse):
    work = tmp_path / "work"
    work.mkdir()
    (work / "poems.txt").write_text(verse(400))
    cli = str(installed / "gpt-small")
    env = _env(tmp_path)
    where = _run([str(installed / "python"), "-c", "import gpt_small; print(gpt_small.__file__)"], cwd=work, env=env)
    assert where.stdout.startswith(str(installed.parent)) and str(ROOT) not in where.stdout  # the wheel's copy

    verse_check = "from gpt_small.verse import in_dictionary, syllables; print(in_dictionary('willow'), syllables('willow'))"
    assert _run([str(installed / "python"), "-c", verse_check], cwd=work, env=env).stdout.split() == ["True", "2"]

    _run([cli, "prepare", "--text", "poems.txt", "--out", "data"], cwd=work, env=env)
    _run([cli, "train", "--data", "data", "--out", "run", "--preset", "tiny", "--max-steps", "3", "--eval-interval",
          "3", "--eval-batches", "1", "--batch-size", "2", "--threads", "1", "--no-progress"], cwd=work, env=env)
    assert (work / "run" / "last" / "model.safetensors").exists()

    gen = [cli, "generate", "--checkpoint", "run", "--max-new-tokens", "20", "--seed", "1", "--prompt", "The"]
    with_cc = _run(gen, cwd=work, env=env)
    ops = "from gpt_small import ops; print(ops.describe('cpu'))"
    if shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"):
        assert list((tmp_path / "cache" / "kernels").glob("cpu-*.so"))  # compiled from the wheel's csrc/
        assert "decoding kernels: on" in _run([str(installed / "python"), "-c", ops], cwd=work, env=env).stdout

    bare = _env(tmp_path / "nocc", CC=str(tmp_path / "no-such-cc"), PATH=str(installed))  # no compiler to be found
    assert "no-such-cc" in _run([str(installed / "python"), "-c", ops], cwd=work, env=bare).stdout
    without_cc = _run(gen, cwd=work, env=bare)
    assert not (tmp_path / "nocc" / "cache" / "kernels").exists() or \
        not list((tmp_path / "nocc" / "cache" / "kernels").glob("*.so"))
    # the same seed, the same text either way (the two differ by rounding only)
    assert without_cc.stdout == with_cc.stdout and len(with_cc.stdout.strip()) > len("The")

    proc = subprocess.Popen([cli, "serve", "--checkpoint", "run", "--port", "0", "--threads", "1"], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        m = re.search(r"on (http://\S+?)/ ", first)
        assert m, (first, proc.stderr.read() if proc.poll() is not None else "")
        deadline = time.monotonic() + 60  # the banner is printed once the port is bound, before uvicorn listens
        while True:
            try:
                with urllib.request.urlopen(m.group(1) + "/healthz", timeout=10) as health:
                    model = json.loads(health.read())["model"]
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline and proc.poll() is None, "the server never answered"
                time.sleep(0.2)
        body = json.dumps({"model": model, "prompt": "The ", "max_tokens": 5, "temperature": 0}).encode()
        req = urllib.request.Request(m.group(1) + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.loads(resp.read())
        assert resp.status == 200 and answer["choices"][0]["text"]
        with urllib.request.urlopen(m.group(1) + "/", timeout=60) as page:  # the static page from the wheel
            assert b"<html" in page.read().lower()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
