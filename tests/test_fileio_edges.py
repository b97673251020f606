"""fileio.py's contract at its edges (the syscall order is in test_durability.py): modes, the one-line
errors and what is left behind on failure, temporary names, strict JSON, the folder lock across
processes and within one."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import subprocess
import sys

import pytest

from gpt_small import fileio
from gpt_small.errors import GPTSmallError
from gpt_small.fileio import FolderLock, append_line, atomic_write, reason, strict_json, temp_name, write_temp


def _left(folder):
    return sorted(p.name for p in folder.iterdir())


def test_mode_is_0666_less_the_umask_or_as_given(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "a", "x")
        atomic_write(tmp_path / "b", "x", mode=0o600)
        tmp, _ = write_temp(tmp_path / "c", b"x", mode=0o640)
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o600
    assert tmp.stat().st_mode & 0o777 == 0o640 and tmp.read_bytes() == b"x"


def test_default_mode_with_no_umask_is_0666_and_folders_are_made_with_their_parents(tmp_path):
    old = os.umask(0)
    try:
        atomic_write(tmp_path / "a" / "b" / "c.txt", "x")
        tmp, _ = write_temp(tmp_path / "d" / "e" / "f.bin", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a" / "b" / "c.txt").stat().st_mode & 0o777 == 0o666
    assert tmp.stat().st_mode & 0o777 == 0o666 and tmp.parent == tmp_path / "d" / "e"


def test_text_is_utf8_and_the_writers_result_is_returned(tmp_path):
    assert atomic_write(tmp_path / "t", "é\n") is None
    assert (tmp_path / "t").read_bytes() == "é\n".encode("utf-8")
    assert atomic_write(tmp_path / "w", lambda f: f.write(b"abc") and "done") == "done"
    tmp, result = write_temp(tmp_path / "w2", lambda f: 42)
    assert result == 42 and tmp.parent == tmp_path and tmp.name.startswith(".w2.tmp-")
    assert not (tmp_path / "w2").exists()  # the caller renames it


def test_temp_names_are_hidden_beside_the_path(tmp_path):
    name = temp_name(tmp_path / "meta.json")
    assert name.parent == tmp_path
    assert re.fullmatch(rf"\.meta\.json\.tmp-{os.getpid()}-[0-9a-f]{{8}}", name.name)
    assert temp_name(tmp_path / "meta.json") != name


def test_errors_are_one_line_naming_the_path_and_leave_nothing(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(GPTSmallError) as e:
        atomic_write(tmp_path / "file" / "x.json", "{}")
    assert str(e.value) == f"cannot write {tmp_path / 'file' / 'x.json'}: file exists"  # its folder cannot be made
    # the rename fails (a non-empty folder is in the way): the temporary file is removed
    (tmp_path / "d" / "inner").mkdir(parents=True)
    with pytest.raises(GPTSmallError) as e:
        atomic_write(tmp_path / "d", "x")
    assert str(e.value).startswith(f"cannot write {tmp_path / 'd'}: ") and "\n" not in str(e.value)
    assert _left(tmp_path) == ["d", "file"]

    def failing(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(GPTSmallError, match=r"cannot write .*out\.bin: no space left on device$"):
        atomic_write(tmp_path / "out.bin", failing)

    def interrupted(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "out.bin", interrupted)
    assert _left(tmp_path) == ["d", "file"]


def test_reason_words():
    assert reason(OSError(errno.ENOSPC, "x")) == "no space left on device"
    assert reason(OSError(errno.EROFS, "x")) == "read-only file system"
    assert reason(OSError("plain message")) == "plain message"
    assert reason(OSError()) == "OSError"
    assert reason(PermissionError()) == "PermissionError"


def test_append_line(tmp_path):
    append_line(tmp_path / "m.jsonl", '{"a": 1}')
    append_line(tmp_path / "m.jsonl", '{"a": 2}')
    assert (tmp_path / "m.jsonl").read_text() == '{"a": 1}\n{"a": 2}\n'
    with pytest.raises(GPTSmallError, match=r"^cannot write .*m\.jsonl: no such file or directory$"):
        append_line(tmp_path / "gone" / "m.jsonl", "x")
    # UTF-8 whatever the locale: here a process whose locale encoding is ASCII (LC_ALL=C, no UTF-8 mode)
    append_line(tmp_path / "u.jsonl", "\u00e9 \u266a")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0"}
    code = "import sys\nfrom gpt_small.fileio import append_line\nappend_line(sys.argv[1], '\\u00e9 \\u266a')"
    subprocess.run([sys.executable, "-X", "utf8=0", "-c", code, str(tmp_path / "u.jsonl")], env=env, check=True)
    assert (tmp_path / "u.jsonl").read_bytes() == ("\u00e9 \u266a\n" * 2).encode("utf-8")


def test_strict_json():
    obj = {"a": math.nan, "b": [math.inf, -math.inf, 1.5], "c": ({"d": math.nan}, 2), "e": "NaN"}
    text = strict_json(obj)
    assert json.loads(text) == {"a": None, "b": [None, None, 1.5], "c": [{"d": None}, 2], "e": "NaN"}
    assert "NaN" not in text.replace('"NaN"', "") and "Infinity" not in text
    assert strict_json({"x": 1}, indent=2) == '{\n  "x": 1\n}'
    assert strict_json(math.nan) == "null" and strict_json(0.1) == "0.1"


def test_fsync_dir_of_a_missing_folder_is_quiet(tmp_path):
    fileio.fsync_dir(tmp_path / "missing")
    fileio.fsync_dir(tmp_path)


_HOLD = """
import sys, time
from gpt_small.fileio import FolderLock
FolderLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_folder_lock_across_processes_and_within_one(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(GPTSmallError) as e:
            FolderLock(folder, "run folder").acquire()
        assert str(e.value) == (f"{folder} is in use by another gpt-small process (pid {holder.pid}); wait for it "
                                "to finish or choose another run folder")
        assert (folder / ".lock").read_text() == f"{holder.pid}\n"
    finally:
        holder.kill()
        holder.wait()
    # the kernel released it with the process: no stale lock
    a, b = FolderLock(folder), FolderLock(folder)
    with a:
        assert (folder / ".lock").read_text() == f"{os.getpid()}\n"
        with b:  # re-entrant within one process
            pass
        assert a._held and folder.resolve() in fileio._held  # b's release leaves a's hold
        probe = subprocess.run([sys.executable, "-c", "import sys\nfrom gpt_small.fileio import FolderLock\n"
                                "try:\n    FolderLock(sys.argv[1]).acquire()\nexcept Exception as e:\n    print(e)\n",
                                str(folder)], capture_output=True, text=True)
        assert "is in use by another gpt-small process" in probe.stdout
    assert not a._held and folder.resolve() not in fileio._held
    probe = subprocess.run([sys.executable, "-c", "import sys\nfrom gpt_small.fileio import FolderLock\n"
                            "FolderLock(sys.argv[1]).acquire(); print('ok')", str(folder)],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "ok"
    a.release()  # a second release is harmless
    assert a.acquire() is a and a.acquire() is a
    assert list(fileio._held) == [folder.resolve()]  # released, then really taken again
    a.release()
    assert not fileio._held


def test_folder_lock_on_a_file_or_an_impossible_folder(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(GPTSmallError) as e:
        FolderLock(tmp_path / "f", "data folder").acquire()
    assert str(e.value) == f"cannot use {tmp_path / 'f'} as a data folder: it exists and is not a folder"
    with pytest.raises(GPTSmallError, match=r"^cannot create .*: not a directory$"):
        FolderLock(tmp_path / "f" / "sub").acquire()
    assert FolderLock(tmp_path / "new" / "deeper").acquire()._held  # made with its parents
