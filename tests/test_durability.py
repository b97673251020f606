"""Durability order, read from a real system-call trace (strace) of real commands.

fileio.py promises that a file replaced by `atomic_write` (or by `write_temp` + rename) is whole
after a crash: its bytes reach the disk before its new name does, and the new name itself is made
durable. In system calls, for every rename into a folder that gpt-small writes:
1. a file renamed into place was fsync'd after its last write (no write may follow the fsync:
   Python's buffered files write at close unless flushed first, which would leave the fsync'd
   file empty);
2. after the rename, the destination's folder is opened and fsync'd.
The rule is checked on every rename the traced code makes under its output folder, so a new
writer is covered without being listed here. The library's writers are traced inside this test
process (strace attached to it for the block), the CLI's in a child process.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("strace") is None or sys.platform != "linux",
                                reason="needs strace (Debian: apt-get install strace)")

SYSCALLS = "openat,write,pwrite64,writev,fsync,fdatasync,rename,renameat,renameat2,close"


@dataclass
class Call:
    name: str
    args: str
    ret: str

    def fd_path(self) -> str | None:
        """The path of the call's first argument when it is a file descriptor (strace -y)."""
        m = re.match(r"\d+<(.*?)>", self.args)
        return m.group(1) if m else None

    def rename_paths(self) -> tuple[str, str]:
        """(source, destination) of rename/renameat/renameat2, relative names joined to their dirfd."""
        if self.name == "rename":
            src, dst = re.findall(r'"((?:[^"\\]|\\.)*)"', self.args)[:2]
            return src, dst
        parts = re.findall(r'(?:AT_FDCWD|\d+)<([^>]*)>, "((?:[^"\\]|\\.)*)"', self.args)
        return tuple(os.path.join(d, f) for d, f in parts[:2])  # type: ignore[return-value]


_LINE = re.compile(r"^(?:\[pid\s+\d+\]\s+|\d+\s+)?(\w+)\((.*)\)\s+=\s+(.*)$")


def trace(tmp_path: Path, argv: list[str], env: dict | None = None) -> list[Call]:
    log = tmp_path / "strace.log"
    proc = subprocess.run(["strace", "-f", "-qq", "-y", "-s", "0", "-e", f"trace={SYSCALLS}", "-o", str(log), *argv],
                          capture_output=True, text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1",
                                                               **(env or {})}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return parse(log)


@contextmanager
def traced_here(tmp_path: Path):
    """strace attached to this process for the block; yields the list the calls are put in."""
    log, marker = tmp_path / "strace-here.log", tmp_path / "strace-marker"
    calls: list[Call] = []
    proc = subprocess.Popen(["strace", "-f", "-qq", "-y", "-s", "0", "-e", f"trace={SYSCALLS}", "-o", str(log),
                             "-p", str(os.getpid())], stderr=subprocess.PIPE, text=True)
    fd = os.open(marker, os.O_WRONLY | os.O_CREAT)
    try:
        deadline = time.monotonic() + 30
        while not (log.is_file() and str(marker) in log.read_text()):  # attached once it sees our write
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"strace cannot attach to this process: {proc.stderr.read() if proc.poll() is not None else 'timeout'}")
            os.write(fd, b"x")
            time.sleep(0.02)
        yield calls
    finally:
        os.close(fd)
        proc.terminate()
        proc.wait(timeout=30)
    calls.extend(parse(log))


def parse(log: Path) -> list[Call]:
    calls, pending = [], {}
    for raw in log.read_text().splitlines():
        pid = raw.split(None, 1)[0]
        if raw.endswith("<unfinished ...>"):
            pending[pid] = raw[: -len("<unfinished ...>")].rstrip()
            continue
        m = re.match(r"^(\d+)\s+<\.\.\. \w+ resumed>(.*)$", raw)
        if m and m.group(1) in pending:
            raw = pending.pop(m.group(1)) + m.group(2)
        m = _LINE.match(raw)
        if m:
            calls.append(Call(*m.groups()))
    return calls


def check_durability(calls: list[Call], under: Path) -> list[tuple[str, str]]:
    """Every rename whose destination lies under `under`, after checking rules 1 and 2 on it."""
    under_s = str(under.resolve())
    checked = []
    for i, c in enumerate(calls):
        if c.name not in ("rename", "renameat", "renameat2") or not c.ret.startswith("0"):
            continue
        src, dst = c.rename_paths()
        if not dst.startswith(under_s):
            continue
        writes = [j for j, w in enumerate(calls[:i]) if w.name in ("write", "pwrite64", "writev")
                  and w.fd_path() == src]
        if writes:  # a file written in this trace (a folder or a link is renamed without writes)
            syncs = [j for j, s in enumerate(calls[:i]) if s.name in ("fsync", "fdatasync") and s.fd_path() == src]
            assert syncs and syncs[-1] > writes[-1], (
                f"{dst}: renamed into place without an fsync after its last write "
                f"(writes at {writes}, fsyncs at {syncs})")
        parent = os.path.dirname(dst)
        assert any(s.name == "fsync" and s.fd_path() == parent for s in calls[i + 1:]), (
            f"{dst}: its folder {parent} is not fsync'd after the rename")
        checked.append((src, dst))
    return checked


def _python(tmp_path: Path, code: str) -> list[Call]:
    return trace(tmp_path, [sys.executable, "-c", textwrap.dedent(code)])


def test_atomic_write_of_each_kind_of_data(tmp_path):
    from gpt_small.fileio import atomic_write, strict_json

    out = tmp_path / "out"

    def writer(f):
        for k in range(100):
            f.write(b"chunk %d\n" % k)
        return 7

    with traced_here(tmp_path) as calls:
        atomic_write(out / "text.txt", "hello\n")
        atomic_write(out / "bytes.bin", b"\x00" * 10)
        atomic_write(out / "big.bin", b"x" * (3 << 20))  # past any buffer
        assert atomic_write(out / "writer.txt", writer) == 7
        atomic_write(out / "text.txt", strict_json({"a": float("nan")}))  # replaces an existing file
        atomic_write(out / "deeper" / "new.txt", "made with its folder")
    dsts = [Path(d).name for _, d in check_durability(calls, out)]
    assert sorted(dsts) == ["big.bin", "bytes.bin", "new.txt", "text.txt", "text.txt", "writer.txt"]
    assert (out / "text.txt").read_text() == '{"a": null}' and (out / "writer.txt").read_text().count("\n") == 100
    assert len((out / "big.bin").read_bytes()) == 3 << 20
    assert sorted(p.name for p in out.iterdir()) == ["big.bin", "bytes.bin", "deeper", "text.txt", "writer.txt"]


def test_prepare_in_process(tmp_path, verse):
    from gpt_small.data import prepare

    text = tmp_path / "poems.txt"
    text.write_text(verse(300))
    with traced_here(tmp_path) as calls:
        prepare(out=tmp_path / "data", text=text, tokenizer="char")
    names = {Path(d).name for _, d in check_durability(calls, tmp_path / "data")}
    assert {"tokenizer.json", "meta.json"} <= names and any(n.endswith(".bin") for n in names), names


def test_a_writer_that_forgets_nothing_but_writes_after_its_fsync_is_caught(tmp_path):
    """The checker itself: a file written after its fsync (flush dropped), and a rename with no
    folder fsync, each fail it; so the tests above cannot pass by checking nothing."""
    out = tmp_path / "out"
    calls = _python(tmp_path, f"""
        import os
        out = {str(out)!r}
        os.makedirs(out)
        f = open(os.path.join(out, ".a.tmp"), "wb")
        f.write(b"data")
        os.fsync(f.fileno())  # no flush: the bytes are still in Python's buffer
        f.close()
        os.replace(os.path.join(out, ".a.tmp"), os.path.join(out, "a"))
        fd = os.open(out, os.O_RDONLY); os.fsync(fd); os.close(fd)
    """)
    with pytest.raises(AssertionError, match="without an fsync after its last write"):
        check_durability(calls, out)
    calls = _python(tmp_path, f"""
        import os
        out = {str(out)!r}
        with open(os.path.join(out, ".b.tmp"), "wb") as f:
            f.write(b"data"); f.flush(); os.fsync(f.fileno())
        os.replace(os.path.join(out, ".b.tmp"), os.path.join(out, "b"))
    """)
    with pytest.raises(AssertionError, match="is not fsync'd after the rename"):
        check_durability(calls, out)


def test_every_file_of_the_cli_prepare_and_a_short_training_run(tmp_path, verse):
    """`gpt-small prepare` (tokenizer, token files, meta.json) and `train` (checkpoints, their
    links, run_config.json, summary.json, the plot): every rename into their folders keeps the order."""
    text = tmp_path / "poems.txt"
    text.write_text(verse(400))
    data, run = tmp_path / "data", tmp_path / "run"
    calls = trace(tmp_path, [sys.executable, "-m", "gpt_small", "prepare", "--text", str(text), "--out", str(data)])
    names = {Path(d).name for _, d in check_durability(calls, data)}
    assert {"tokenizer.json", "meta.json"} <= names and any(n.endswith(".bin") for n in names), names
    calls = trace(tmp_path, [sys.executable, "-m", "gpt_small", "train", "--data", str(data), "--out", str(run),
                             "--preset", "tiny", "--max-steps", "2", "--set", "batch_size=2", "--eval-interval", "1",
                             "--eval-batches", "1", "--threads", "1"], env={"OMP_NUM_THREADS": "1"})
    names = {Path(d).name for _, d in check_durability(calls, run)}
    assert {"last", "run_config.json", "summary.json"} <= names, names
