"""Writing files safely: one atomic-write helper, one folder lock, one way to report an OS error.

Every write path of gpt-small (prepared data, checkpoints, metrics, summaries, plots, study
results, the corpus cache) goes through this module, so that each keeps the same promises:

- `atomic_write(path, data)` writes a temporary file beside `path` (created with mode 0666 minus
  the umask, as a plain `open` would), fsyncs it and renames it over `path`: a reader sees the old
  file or the new one, never half of one. On any error the temporary file is removed and the error
  becomes a one-line `GPTSmallError` naming the path and the reason ("no space left on device").
  `write_temp` is its first half, for a writer that renames several files together (prepare).
- `write_error(path, e)` is that conversion, for writers that manage their own temporary files
  (checkpoint folders, token files).
- `FolderLock(folder)` holds `folder/.lock` with `fcntl.flock` for as long as a process works in
  the folder. The kernel releases it on any exit, kill -9 included, so a stale lock cannot exist;
  the holder writes its pid into the file so that a second process can name it. Re-entrant within
  one process (a trainer resumed in the same interpreter shares its caller's lock): it guards
  against two processes, not against two objects.
- `read_lock(folder)` is the readers' side of that lock: a shared flock that any number of
  readers hold at once (a training run on its data folder) and that a FolderLock writer (`prepare
  --force`) respects.
- `strict_json(obj)` is JSON with non-finite floats written as null (`json.dumps` would write
  `NaN` / `Infinity`, which strict parsers refuse).
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .errors import GPTSmallError

LOCK_NAME = ".lock"


def reason(e: OSError) -> str:
    """'no space left on device', 'read-only file system', ... (the C library's words, lower case)."""
    if e.errno is not None:
        return os.strerror(e.errno).lower()
    return str(e) or type(e).__name__


def write_error(path: str | Path, e: OSError) -> GPTSmallError:
    return GPTSmallError(f"cannot write {path}: {reason(e)}")


def fsync_dir(path: str | Path) -> None:
    """Make renames inside `path` durable (skipped where a folder cannot be opened for it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """A hidden temporary name beside `path`: `.NAME.tmp-PID-RANDOM` (swept by name on the next run)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def write_temp(path: str | Path, data: str | bytes | Callable[[IO[bytes]], Any], *,
               mode: int = 0o666) -> tuple[Path, Any]:
    """Write `data` (text as UTF-8, bytes, or a function that writes to a binary file) to a fsync'd
    temporary file beside `path`; return (temporary path, what the function returned). The caller
    renames it into place (`os.replace`) or removes it. Errors: one line naming `path`; nothing left."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)  # the umask applies, as for open()
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                result = data(f)
            else:
                result = None
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        remove_quietly(tmp)
        raise write_error(path, e) from None
    except BaseException:
        remove_quietly(tmp)
        raise
    return tmp, result


def atomic_write(path: str | Path, data: str | bytes | Callable[[IO[bytes]], Any], *, mode: int = 0o666) -> Any:
    """Replace `path` with `data` atomically (see write_temp); returns what a writer function returned."""
    path = Path(path)
    tmp, result = write_temp(path, data, mode=mode)
    try:
        os.replace(tmp, path)
    except OSError as e:
        remove_quietly(tmp)
        raise write_error(path, e) from None
    fsync_dir(path.parent)
    return result


def check_writable(path: str | Path, what: str) -> None:
    """Before any work: `path`'s folder exists and takes files, and `path` is not a folder. The
    write itself still goes through atomic_write; this only moves the likely failures to the start."""
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise GPTSmallError(f"{what} {path} is a folder; give a file name")
    if not folder.is_dir():
        raise GPTSmallError(f"{what} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise GPTSmallError(f"{what} {path}: the folder {folder} is not writable")


def append_line(path: str | Path, line: str) -> None:
    """Append one line (metrics.jsonl): appends are whole lines or nothing a reader can parse past."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as e:
        raise write_error(path, e) from None


def remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def strict_json(obj: Any, **kwargs: Any) -> str:
    """json.dumps with NaN and +-Infinity written as null, so every reader can parse the file."""
    return json.dumps(_finite(obj), allow_nan=False, **kwargs)


# ---------------------------------------------------------------- the folder lock

_held: dict[Path, list] = {}  # resolved folder -> [file object, holders in this process]


class FolderLock:
    """An exclusive lock on `folder` for this process: `with FolderLock(d): ...` or acquire()/release().

    A second process fails at once (no waiting: a training run holds its folder for hours) with a
    GPTSmallError naming the folder and the holder's pid."""

    def __init__(self, folder: str | Path, what: str = "folder"):
        self.folder = Path(folder)
        self.what = what
        self._held = False

    def acquire(self) -> "FolderLock":
        if self._held:
            return self
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise GPTSmallError(f"cannot use {self.folder} as a {self.what}: it exists and is not a folder") from None
        except OSError as e:
            raise GPTSmallError(f"cannot create {self.folder}: {reason(e)}") from None
        key = self.folder.resolve()
        if key in _held:
            _held[key][1] += 1
            self._held = True
            return self
        path = self.folder / LOCK_NAME
        reading = _shared.get(key)
        try:  # this process reading the folder too: its one open file is converted (flock is per file)
            f = reading[0] if reading else open(path, "a+", encoding="utf-8")
        except OSError as e:
            raise GPTSmallError(f"cannot lock {self.folder}: {path}: {reason(e)}") from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.seek(0)
            pid = f.read().strip() or "unknown"
            if not reading:
                f.close()
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                if _only_readers(path):
                    raise GPTSmallError(f"{self.folder} is in use by another gpt-small process reading it (a "
                                        f"training run); wait for it to finish or choose another {self.what}") from None
                raise GPTSmallError(f"{self.folder} is in use by another gpt-small process (pid {pid}); wait for it "
                                    f"to finish or choose another {self.what}") from None
            raise GPTSmallError(f"cannot lock {self.folder}: {reason(e)}") from None
        try:  # the pid is a message for the next process, not the lock itself: a failure here is harmless
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
        except OSError:
            pass
        _held[key] = [f, 1]
        self._held = True
        return self

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        key = self.folder.resolve()
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _held[key]
            if key in _shared:  # back to the readers' shared lock
                fcntl.flock(entry[0].fileno(), fcntl.LOCK_SH)
            else:
                entry[0].close()  # closing the file releases the flock

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ---------------------------------------------------------------- readers' shared lock

def _only_readers(path: Path) -> bool:
    """Whether the lock that just refused a writer is held by readers alone (a shared lock is
    still free), whose pids the file does not record, rather than by a writer."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            return True
    except OSError:
        return False

_shared: dict[Path, list] = {}  # resolved folder -> [file object, readers in this process]


def read_lock(folder: str | Path, what: str = "folder") -> Callable[[], None]:
    """A shared lock on `folder/.lock` for a reader (a training run reading its data folder): any
    number of readers at once, but no FolderLock writer (`prepare --force`) while one holds it, and
    no reader while a writer works. Returns the function that releases it. A folder whose lock
    file cannot be opened (read-only, made by an older version) is read unlocked: no prepare can
    write there either."""
    folder = Path(folder)
    key = folder.resolve()
    if key in _shared:
        _shared[key][1] += 1
    elif key in _held:  # this process writes it (prepare checking its own output)
        _shared[key] = [_held[key][0], 1]
    else:
        try:
            f = open(folder / LOCK_NAME, "r", encoding="utf-8")  # flock needs no write access
        except OSError:
            return lambda: None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            pid = f.read().strip() or "unknown"
            f.close()
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise GPTSmallError(f"{folder} is being written by another gpt-small process (pid {pid}); wait "
                                    f"for it to finish before reading this {what}") from None
            return lambda: None
        _shared[key] = [f, 1]
    released = False

    def release() -> None:
        nonlocal released
        entry = _shared.get(key)
        if released or entry is None:
            return
        released = True
        entry[1] -= 1
        if entry[1] == 0:
            del _shared[key]
            if key not in _held:
                entry[0].close()

    return release
