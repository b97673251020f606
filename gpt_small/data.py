"""Prepared data: text -> `train.bin`, `val.bin`, `tokenizer.json`, `meta.json`; and batches from them.

`prepare` writes a folder that training reads without the text, the corpus package or pandas:
  train.bin, val.bin  token ids, native little-endian uint16 (uint32 when an id can exceed 65535)
  tokenizer.json      see tokenizer.py
  meta.json           source (name, sha256, bytes, chars, lines), split, token and character counts,
                      chars per token, dtype, tokenizer, unknown characters in validation
The split is by lines and deterministic: the last `val_fraction` of the lines (rounded, at least
one) is validation; the char vocabulary and the BPE merges come from the training lines only.
Text is streamed in chunks of whole lines, so memory stays bounded by the chunk size, not the text.
Nothing is half-written: every file is first written to a temporary name inside `out`; only when
all are whole is the old meta.json removed, the files renamed into place and meta.json written
last, so a folder with a meta.json is always complete. `prepare` touches only the four files it
writes (a user's notes beside them survive `--force`), creates folders and files with the
umask's permissions, holds `out/.lock` while it works (a second prepare into the same folder
stops at once, naming the first one's pid), and turns a write failure into one line naming the
path and the reason, with its temporary files removed and any previous data left whole.

`PreparedData` opens such a folder (memmaps); `BatchSampler` draws random windows from a split,
rank-aware and resumable through `state_dict`; `eval_windows` is the fixed set used for
interval evaluations. torch is imported only where tensors are made.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
import weakref
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__
from .corpus import CHUNK_BYTES, CORPORA, corpus_path, iter_text_bytes, scan_text, source_files
from .errors import GPTSmallError
from .fileio import (LOCK_NAME, FolderLock, atomic_write, fsync_dir, read_lock, remove_quietly, write_error,
                     write_temp)
from .tokenizer import KINDS, Tokenizer, load_tokenizer, make_tokenizer

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# prepare cannot know the block_size training will use; it only refuses texts too small for any
# model: 2 windows of 8+1 tokens to train on and one to validate on. Training checks its own
# block_size against the split sizes (BatchSampler).
MIN_WINDOW = 8
MIN_TRAIN_TOKENS = 2 * (MIN_WINDOW + 1)
MIN_VAL_TOKENS = MIN_WINDOW + 1
PREPARED_FILES = ("train.bin", "val.bin", "tokenizer.json", "meta.json")  # all that prepare writes
SPLIT_RULE = "by lines: the last val_fraction of the lines (rounded, at least one) is validation"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id (0..vocab_size-1) fits in it, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def prepare(*, out: str | Path, corpus: str | None = None, text: str | Path | None = None,
            tokenizer: str = "char", vocab_size: int | None = None, val_fraction: float = 0.1,
            force: bool = False) -> dict[str, Any]:
    """Tokenize a built-in corpus or the user's text into `out`; return the meta dict."""
    t0 = time.perf_counter()
    if (corpus is None) == (text is None):
        raise GPTSmallError("give exactly one text source: --corpus NAME or --text PATH")
    if tokenizer not in KINDS:
        raise GPTSmallError(f"unknown tokenizer {tokenizer!r}; choose one of {', '.join(KINDS)}")
    if not 0.0 < val_fraction < 1.0:
        raise GPTSmallError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if vocab_size is not None:  # before the text is scanned
        from . import limits

        if tokenizer == "char":
            raise GPTSmallError("--vocab-size is for the bpe tokenizer; char takes its vocabulary from the text")
        if tokenizer == "gpt2" and vocab_size != limits.GPT2_VOCAB:
            raise GPTSmallError(f"the gpt2 tokenizer has {limits.GPT2_VOCAB} tokens; --vocab-size {vocab_size} "
                                "does not apply")
        limits.check_int(vocab_size, "--vocab-size", minimum=256, maximum=limits.MAX_VOCAB_SIZE)
    out = Path(out)
    _check_out(out, force)  # before the work, not after minutes of it
    if corpus is not None and corpus not in CORPORA:
        raise GPTSmallError(f"unknown corpus {corpus!r}; built-in corpora: {', '.join(CORPORA)}")
    created = not out.exists()
    lock = FolderLock(out, "--out").acquire()
    temps: list[Path] = []
    try:
        _check_out(out, force)  # again under the lock: another prepare may have finished meanwhile
        for stale in out.glob(".*.tmp-*"):  # left by a prepare killed mid-write
            remove_quietly(stale)
        meta = _prepare_into(out, temps, corpus=corpus, text=text, tokenizer=tokenizer, vocab_size=vocab_size,
                             val_fraction=val_fraction, t0=t0)
    except BaseException:
        for tmp in temps:
            remove_quietly(tmp)
        if created and all(p.name == LOCK_NAME for p in out.iterdir()):
            remove_quietly(out / LOCK_NAME)  # leave no empty folder behind a failed first prepare
            try:
                out.rmdir()
            except OSError:
                pass
        raise
    finally:
        lock.release()
    return meta


def _prepare_into(out: Path, temps: list[Path], *, corpus: str | None, text: str | Path | None, tokenizer: str,
                  vocab_size: int | None, val_fraction: float, t0: float) -> dict[str, Any]:
    """The work of `prepare`, holding the lock; the temporary files it writes are listed in `temps`."""
    if corpus is not None:
        path = corpus_path(corpus)
        files, source, source_path = [path], corpus, str(path)
    else:
        files, source, source_path = source_files(text), str(text), str(Path(text).resolve())
    stats = scan_text(files)
    if stats.lines < 2:
        raise GPTSmallError(f"{source} has 1 line; the split needs at least 2 (training lines, then validation lines)")
    val_lines = min(stats.lines - 1, max(1, round(stats.lines * val_fraction)))
    train_lines = stats.lines - val_lines
    split = _line_offset(files, train_lines)

    log.info("%s: %d lines, %.1f MB; making the %s tokenizer", source, stats.lines, stats.bytes / 1e6, tokenizer)
    tok = make_tokenizer(tokenizer, _iter_lines(files, 0, split), vocab_size)
    dtype = token_dtype(tok.vocab_size)
    n_train, train_chars, _ = _write_tokens(tok, _iter_lines(files, 0, split), out / "train.bin", dtype, temps)
    n_val, val_chars, unknown = _write_tokens(tok, _iter_lines(files, split, stats.bytes), out / "val.bin",
                                              dtype, temps, count_unknown=True)
    if n_train < MIN_TRAIN_TOKENS:
        raise GPTSmallError(f"text too small: the training split has {n_train} tokens, fewer than "
                            f"{MIN_TRAIN_TOKENS} (two windows of {MIN_WINDOW}+1); give more text")
    if n_val < MIN_VAL_TOKENS:
        raise GPTSmallError(f"text too small: the validation split ({val_lines} lines) has {n_val} tokens, fewer "
                            f"than one window of {MIN_WINDOW}+1 = {MIN_VAL_TOKENS}; give more text or a "
                            "larger --val-fraction")
    tmp_tok, _ = write_temp(out / "tokenizer.json", json.dumps(tok.to_json(), ensure_ascii=False))
    temps.append(tmp_tok)
    meta = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "source_kind": "corpus" if corpus is not None else "text",
        "source_path": source_path,
        "source_files": len(files),
        "source_sha256": stats.sha256,
        "source_bytes": stats.bytes,
        "source_chars": stats.chars,
        "source_lines": stats.lines,
        "split": SPLIT_RULE,
        "val_fraction": val_fraction,
        "train_lines": train_lines,
        "val_lines": val_lines,
        "train_bytes": split,
        "val_bytes": stats.bytes - split,
        "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "train_tokens": n_train,
        "val_tokens": n_val,
        "train_chars": train_chars,
        "val_chars": val_chars,
        "train_chars_per_token": train_chars / n_train,
        "val_chars_per_token": val_chars / n_val,
        "val_unknown_chars": sum(unknown.values()),
        "val_unknown_top": dict(unknown.most_common(20)),
        "created_by": f"gpt-small {__version__}",
        "seconds": round(time.perf_counter() - t0, 2),
    }
    # Every new file is whole: the old meta.json goes first (the folder now reads as incomplete),
    # the data files take their names, and the new meta.json marks the folder whole again.
    try:
        (out / "meta.json").unlink(missing_ok=True)
        fsync_dir(out)
        for tmp in temps:
            os.replace(tmp, out / tmp.name[1:].split(".tmp-")[0])
    except OSError as e:
        raise write_error(out, e) from None
    atomic_write(out / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False))
    return meta


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise GPTSmallError(f"--out {out} exists and is not a folder")
    if not out.is_dir():
        return
    ours = [p for p in out.iterdir() if p.name in PREPARED_FILES or p.name == LOCK_NAME
            or (p.name.startswith(".") and ".tmp-" in p.name)]
    others = sorted(p.name for p in out.iterdir() if p not in ours)
    if (out / "meta.json").is_file():
        if not force:
            raise GPTSmallError(f"--out {out} already holds prepared data; use --force to replace it")
        return  # --force replaces prepare's four files only; others (a user's notes) stay
    if others:
        raise GPTSmallError(f"--out {out} is not empty and holds no prepared data ({', '.join(others[:5])}); "
                            "refusing to write into it; choose another --out")


def _line_offset(files: list[Path], n_lines: int) -> int:
    """Byte offset just after the n-th newline of the joined text."""
    pos, remaining = 0, n_lines
    for block in iter_text_bytes(files, CHUNK_BYTES):
        count = block.count(b"\n")
        if count >= remaining:
            newlines = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == ord("\n"))
            return pos + int(newlines[remaining - 1]) + 1
        remaining -= count
        pos += len(block)
    raise AssertionError("fewer lines than counted")


def _iter_lines(files: list[Path], start: int, end: int) -> Iterator[str]:
    """Text of bytes [start, end) of the joined source, in chunks ending at newlines.

    Cutting after b"\\n" never splits a UTF-8 character (0x0A occurs only as itself)."""
    pos, buf = 0, b""
    for block in iter_text_bytes(files, CHUNK_BYTES):
        lo, pos = pos, pos + len(block)
        if pos <= start:
            continue
        if lo >= end:
            break
        buf += block[max(0, start - lo) : end - lo]
        if (cut := buf.rfind(b"\n") + 1) > 0:
            yield buf[:cut].decode("utf-8")
            buf = buf[cut:]
    if buf:
        yield buf.decode("utf-8")


def _write_tokens(tok: Tokenizer, chunks: Iterable[str], path: Path, dtype: np.dtype, temps: list[Path],
                  count_unknown: bool = False) -> tuple[int, int, collections.Counter[str]]:
    """Encode the chunks into a temporary file for `path` (appended to `temps`); return (tokens,
    characters, unknown characters)."""
    n_tokens, n_chars, unknown = 0, 0, collections.Counter()

    def counted(chunks: Iterable[str]) -> Iterator[str]:
        nonlocal n_chars
        for chunk in chunks:
            n_chars += len(chunk)
            if count_unknown:
                unknown.update(tok.count_unknown(chunk))
            yield chunk

    def write(f) -> int:
        n = 0
        for ids in tok.encode_stream(counted(chunks)):
            f.write(ids.astype(dtype.newbyteorder("<")).tobytes())  # tofile() reports a full disk as "unexpected pos"
            n += len(ids)
        return n

    tmp, n_tokens = write_temp(path, write)
    temps.append(tmp)
    return n_tokens, n_chars, unknown


# ---------------------------------------------------------------- reading


class PreparedData:
    """A folder written by `prepare`: `.meta`, `.tokenizer`, and `.train` / `.val` as read-only memmaps."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise GPTSmallError(f"prepared data folder {self.directory} does not exist; make it with `gpt-small prepare`")
        meta_path = self.directory / "meta.json"
        if not meta_path.is_file():
            raise GPTSmallError(f"{self.directory} holds no meta.json; it is not a folder made by `gpt-small prepare`")
        from .schemas import DataMeta, read_json, validate

        # held while this object lives (a training run: its whole length), so `prepare --force`
        # in another process refuses to rewrite the files under it
        weakref.finalize(self, read_lock(self.directory, "data folder"))
        self.meta: dict[str, Any] = read_json(meta_path)
        if not isinstance(self.meta, dict):
            validate(self.meta, DataMeta, meta_path)  # "expected a JSON object"
        version = self.meta.get("format_version")
        if version != FORMAT_VERSION:
            raise GPTSmallError(f"{self.directory} has data format_version {version}; this gpt-small reads "
                                f"{FORMAT_VERSION}; run `gpt-small prepare` again")
        validate(self.meta, DataMeta, meta_path)
        self.train = self._open("train")
        self.val = self._open("val")

    def _open(self, split: str) -> np.memmap:
        path = self.directory / f"{split}.bin"
        dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        expected = self.meta[f"{split}_tokens"]
        if not path.is_file() or path.stat().st_size != expected * dtype.itemsize:
            raise GPTSmallError(f"{path} is missing or does not hold the {expected} tokens meta.json records; "
                                "run `gpt-small prepare --force` again")
        if expected == 0:
            raise GPTSmallError(f"{path} holds no tokens; run `gpt-small prepare --force` again")
        tokens = np.memmap(path, dtype=dtype, mode="r")
        # ids beyond the vocabulary would index past the embedding table (an IndexError mid-run);
        # one pass of max() over the file costs milliseconds next to a training run
        top = int(tokens.max())
        if top >= self.vocab_size:
            raise GPTSmallError(f"{path} holds token id {top}, beyond the vocabulary of {self.vocab_size} that "
                                "meta.json records; run `gpt-small prepare --force` again")
        return tokens

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.directory)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def chars_per_token(self, split: str = "val") -> float:
        if split not in ("train", "val"):
            raise GPTSmallError(f"split must be 'train' or 'val', got {split!r}")
        return float(self.meta[f"{split}_chars_per_token"])

    def __repr__(self) -> str:
        return (f"PreparedData({str(self.directory)!r}, {self.meta['tokenizer']} vocab {self.vocab_size}, "
                f"train {len(self.train):,} / val {len(self.val):,} tokens)")


def _check_windows(data: np.ndarray, block_size: int, name: str) -> None:
    if block_size < 1:
        raise GPTSmallError(f"block_size must be at least 1, got {block_size}")
    if len(data) < block_size + 1:
        raise GPTSmallError(f"{name} split has {len(data)} tokens, fewer than one window of block_size+1 = "
                            f"{block_size + 1}; use a smaller --block-size or more text")


def _windows(data: np.ndarray, starts: np.ndarray, block_size: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    import torch

    w = torch.from_numpy(np.asarray(data[starts[:, None] + np.arange(block_size + 1)], dtype=np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()  # x, y: (B, T), y is x shifted by one


def to_device(x: "torch.Tensor", y: "torch.Tensor", device: "str | torch.device") -> tuple["torch.Tensor", "torch.Tensor"]:
    """Move a batch; on CUDA through pinned memory so the copy overlaps the previous step."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


class BatchSampler:
    """Random windows of block_size+1 tokens; each rank its own windows; resumable exactly.

    Every rank runs the same PCG64 stream (seeded by `seed`) and draws the starts of the whole
    global batch, world_size * batch_size windows, then keeps its own slice. So the ranks never
    share a window, rank 0's state (the one a checkpoint holds) is every rank's state, and
    N processes of batch B see exactly the windows of one process of batch N*B (the DDP test
    relies on it). `state_dict` holds only plain ints, strings and dicts (JSON, or a
    torch.load(weights_only=True) checkpoint)."""

    def __init__(self, data: np.ndarray, *, batch_size: int, block_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, name: str = "training"):
        _check_windows(data, block_size, name)
        if batch_size < 1:
            raise GPTSmallError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise GPTSmallError(f"rank {rank} is outside world_size {world_size}")
        self.data, self.batch_size, self.block_size = data, batch_size, block_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed)))
        self.batches = 0  # drawn so far: a readable position for logs and checks

    def next_batch(self, device: "str | torch.device | None" = None) -> tuple["torch.Tensor", "torch.Tensor"]:
        B = self.batch_size
        starts = self.rng.integers(0, len(self.data) - self.block_size, size=B * self.world_size)
        starts = starts[self.rank * B:(self.rank + 1) * B]
        self.batches += 1
        x, y = _windows(self.data, starts, self.block_size)
        return (x, y) if device is None else to_device(x, y, device)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "batch_size": self.batch_size, "block_size": self.block_size, "batches": self.batches,
                "bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Another seed is a different run. The rank may differ (all ranks share the stream), and so
        # may batch and block size (the stream stays valid, just not equal).
        for key in ("seed",):
            if state[key] != getattr(self, key):
                raise GPTSmallError(f"sampler state is for {key} {state[key]}, this sampler has {key} {getattr(self, key)}")
        self.rng.bit_generator.state = state["bit_generator"]
        self.batches = int(state["batches"])


class EvalWindows:
    """A fixed list of (x, y) batches, made on access: 200 batches of 64 x 1024 tokens would hold
    200 MB of int64 if built up front. Indexing and iterating give the same windows every time."""

    def __init__(self, data: np.ndarray, starts: np.ndarray, block_size: int):
        self.data, self.starts, self.block_size = data, starts, block_size  # starts: (n_batches, B)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple["torch.Tensor", "torch.Tensor"]:
        return _windows(self.data, self.starts[i], self.block_size)

    def __iter__(self) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
        return (self[i] for i in range(len(self)))


def eval_windows(data: np.ndarray, *, block_size: int, n_batches: int, batch_size: int,
                 name: str = "validation") -> EvalWindows:
    """The same n_batches x batch_size windows every call, spread evenly from start to end of `data`."""
    _check_windows(data, block_size, name)
    if n_batches < 1 or batch_size < 1:
        raise GPTSmallError(f"eval needs at least one batch of one window, got {n_batches} x {batch_size}")
    starts = np.linspace(0, len(data) - block_size - 1, num=n_batches * batch_size).round().astype(np.int64)
    return EvalWindows(data, starts.reshape(n_batches, batch_size), block_size)
