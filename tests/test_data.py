"""prepare writes exact, line-split token files atomically; batches are shaped, seeded and resumable."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt_small import corpus, data
from gpt_small.cli import main
from gpt_small.data import PREPARED_FILES, BatchSampler, PreparedData, eval_windows, prepare, to_device, token_dtype
from gpt_small.errors import GPTSmallError
from gpt_small.tokenizer import CharTokenizer


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    lines = text.splitlines(keepends=True)
    n_val = max(1, round(len(lines) * val_fraction))
    return "".join(lines[:-n_val]), "".join(lines[-n_val:])


# ---------------------------------------------------------------- prepare


def test_prepare_char_writes_exact_line_split(poem_file, tmp_path):
    out = tmp_path / "out"
    meta = prepare(out=out, text=poem_file)
    text = poem_file.read_text(encoding="utf-8")
    train_text, val_text = split_text(text)
    assert sorted(p.name for p in out.iterdir()) == [".lock", "meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert json.loads((out / "meta.json").read_text()) == meta

    d = PreparedData(out)
    tok = d.tokenizer
    assert tok.kind == "char" and tok.chars == sorted(set(train_text))  # vocabulary from train only
    assert d.train.dtype == np.uint16 and not d.train.flags.writeable
    assert d.train.tolist() == tok.encode(train_text) and d.val.tolist() == tok.encode(val_text)
    assert tok.decode(d.val) == val_text and train_text.endswith("\n")  # cut on a line boundary

    assert meta["source_sha256"] == hashlib.sha256(poem_file.read_bytes()).hexdigest()
    assert (meta["source_bytes"], meta["source_chars"], meta["source_lines"]) == (
        len(poem_file.read_bytes()), len(text), 200)
    assert (meta["train_lines"], meta["val_lines"], meta["val_fraction"]) == (180, 20, 0.1)
    assert meta["train_bytes"] + meta["val_bytes"] == meta["source_bytes"]
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(d.train), len(d.val))
    assert (meta["train_chars"], meta["val_chars"]) == (len(train_text), len(val_text))
    assert meta["val_chars_per_token"] == d.chars_per_token("val") == 1.0
    assert d.chars_per_token("train") == 1.0
    assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"]) == ("char", tok.vocab_size, "uint16")
    assert meta["format_version"] == 1 and meta["val_unknown_chars"] == 0


def test_prepare_is_deterministic(poem_file, tmp_path):
    prepare(out=tmp_path / "a", text=poem_file, tokenizer="bpe", vocab_size=300)
    prepare(out=tmp_path / "b", text=poem_file, tokenizer="bpe", vocab_size=300)
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_unknown_characters_in_val_are_counted(tmp_path, verse):
    path = tmp_path / "t.txt"
    path.write_text(verse(90) + "§ only here §\nand 😀\n", encoding="utf-8")
    meta = prepare(out=tmp_path / "out", text=path, val_fraction=0.05)
    d = PreparedData(tmp_path / "out")
    assert meta["val_unknown_chars"] == 3 and meta["val_unknown_top"] == {"§": 2, "😀": 1}
    assert int((d.val == d.tokenizer.unk_id).sum()) == 3 and meta["val_chars"] == meta["val_tokens"]


@pytest.mark.parametrize("kind, vocab_size", [("char", None), ("bpe", 300), ("gpt2", None)])
def test_streamed_token_files_equal_direct_encoding(kind, vocab_size, poem_file, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CHUNK_BYTES", 97)  # many chunks, cuts in the middle of lines
    meta = prepare(out=tmp_path / "out", text=poem_file, tokenizer=kind, vocab_size=vocab_size)
    d = PreparedData(tmp_path / "out")
    train_text, val_text = split_text(poem_file.read_text(encoding="utf-8"))
    assert d.train.tolist() == d.tokenizer.encode(train_text)
    assert d.val.tolist() == d.tokenizer.encode(val_text)
    assert d.tokenizer.decode(d.val) == val_text
    assert meta["val_chars_per_token"] == pytest.approx(len(val_text) / len(d.val))
    assert meta["train_chars_per_token"] == pytest.approx(len(train_text) / len(d.train))
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == kind
    if kind == "gpt2":
        assert meta["vocab_size"] == 50257


def test_token_dtype():
    assert token_dtype(118) == np.uint16 and token_dtype(50257) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535
    assert token_dtype(65537) == np.uint32 and token_dtype(100_000) == np.uint32


def test_uint32_files_read_back(poem_file, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "token_dtype", lambda vocab_size: np.dtype(np.uint32))
    meta = prepare(out=tmp_path / "out", text=poem_file)
    d = PreparedData(tmp_path / "out")
    assert meta["dtype"] == "uint32" and d.val.dtype == np.uint32
    assert d.val.tolist() == d.tokenizer.encode(split_text(poem_file.read_text(encoding="utf-8"))[1])


def test_folder_source(tmp_path, verse):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "b.txt").write_text(verse(40, seed=2), encoding="utf-8")
    (tmp_path / "src" / "a.txt").write_text(verse(40, seed=1), encoding="utf-8")
    meta = prepare(out=tmp_path / "out", text=tmp_path / "src")
    assert meta["source_files"] == 2 and meta["source_lines"] == 81  # joined with one "\n"


def test_force_replaces_and_nothing_is_left_behind(poem_file, tmp_path, verse):
    out = tmp_path / "out"
    prepare(out=out, text=poem_file)
    poem_file.write_text(verse(150, seed=5), encoding="utf-8")
    meta = prepare(out=out, text=poem_file, force=True)
    assert PreparedData(out).meta == meta and meta["source_lines"] == 150
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "poem.txt"]  # no .tmp- or .old- folders


def test_failed_prepare_leaves_no_output(poem_file, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "_write_tokens", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(out=tmp_path / "out", text=poem_file)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["poem.txt"]


def _killed_prepare(tmp_path: Path, poem_file: Path, hook: str, calls: int = 1) -> None:
    """Run prepare in a subprocess that kills itself with SIGKILL at its `calls`-th call of data.<hook>."""
    script = ("import os, signal, sys\nfrom gpt_small import data\n"
              f"real, n = data.{hook}, [0]\n"
              "def hook(*a, **k):\n"
              "    n[0] += 1\n"
              f"    if n[0] == {calls}: os.kill(os.getpid(), signal.SIGKILL)\n"
              "    return real(*a, **k)\n"
              f"data.{hook} = hook\n"
              "data.prepare(out=sys.argv[1], text=sys.argv[2], force=True)\n")
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out"), str(poem_file)], capture_output=True)
    assert r.returncode == -9, r.stderr.decode()


def test_killed_prepare_leaves_no_complete_looking_output(poem_file, tmp_path):
    # killed after the data files took their names, before meta.json: the folder reads as incomplete
    _killed_prepare(tmp_path, poem_file, "atomic_write")  # meta.json is prepare's only atomic_write
    out = tmp_path / "out"
    assert not (out / "meta.json").exists()
    with pytest.raises(GPTSmallError, match="holds no meta.json"):
        PreparedData(out)
    prepare(out=out, text=poem_file)  # its own leftovers do not block a new prepare, --force or not
    assert PreparedData(out).meta["train_tokens"] > 0


def test_killed_forced_prepare_keeps_the_old_data(poem_file, tmp_path, verse):
    # killed while writing the new files (before any rename): the old prepared data is untouched
    out = tmp_path / "out"
    old = prepare(out=out, text=poem_file)
    (tmp_path / "other.txt").write_text(verse(300, seed=5))
    script_text = tmp_path / "other.txt"
    _killed_prepare(tmp_path, script_text, "write_temp", calls=3)  # train.bin and val.bin written
    assert PreparedData(out).meta["source_sha256"] == old["source_sha256"]
    assert sorted(p.name for p in out.iterdir() if ".tmp-" in p.name)  # swept by the next prepare
    prepare(out=out, text=script_text, force=True)
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_force_replaces_only_what_prepare_writes_and_respects_the_umask(poem_file, tmp_path):
    out = tmp_path / "out"
    old_umask = os.umask(0o027)
    try:
        prepare(out=out, text=poem_file)
        (out / "notes.txt").write_text("my notes")
        prepare(out=out, text=poem_file, force=True)
    finally:
        os.umask(old_umask)
    assert (out / "notes.txt").read_text() == "my notes"
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert {stat.S_IMODE((out / n).stat().st_mode) for n in PREPARED_FILES} == {0o640}


# ---------------------------------------------------------------- bad input: API and CLI


def _bad_cases(tmp: Path, poem_file: Path, monkeypatch, bad_text_sources) -> list[tuple[dict, str]]:
    out = tmp / "out"
    cases = [(dict(text=path, out=out), message) for path, message in bad_text_sources]
    (tmp / "tiny.txt").write_text("a\nb\n")
    (tmp / "one-line.txt").write_text("one long line without a newline at all")
    prepare(out=tmp / "done", text=poem_file)
    (tmp / "busy").mkdir()
    (tmp / "busy" / "notes.txt").write_text("mine")
    monkeypatch.setenv("GPT_SMALL_CACHE", str(tmp / "empty-cache"))
    monkeypatch.setattr(corpus, "PICKLE_SHA256", "0" * 64)
    return cases + [
        (dict(text=tmp / "tiny.txt", out=out), "text too small: the training split has 2 tokens, fewer than 18"),
        (dict(text=tmp / "one-line.txt", out=out), "has 1 line; the split needs at least 2"),
        (dict(corpus="shakespeare", out=out), "unknown corpus 'shakespeare'; built-in corpora: gutenberg-poetry, eng-poem"),
        (dict(text=poem_file, tokenizer="word", out=out), "unknown tokenizer 'word'"),
        (dict(corpus="eng-poem", out=out), "refusing to unpickle"),  # corpus hash mismatch
        (dict(text=poem_file, out=tmp / "done"), "already holds prepared data; use --force"),
        (dict(text=poem_file, out=tmp / "busy", force=True), "is not empty and holds no prepared data"),
        (dict(text=poem_file, corpus="eng-poem", out=out), "exactly one text source"),
        (dict(out=out), "exactly one text source"),
        (dict(text=poem_file, val_fraction=1.5, out=out), "val_fraction must be between 0 and 1"),
        (dict(text=poem_file, vocab_size=100, out=out), "--vocab-size is for the bpe tokenizer"),
    ]


_FLAGS = {"out": "--out", "corpus": "--corpus", "text": "--text", "tokenizer": "--tokenizer",
          "vocab_size": "--vocab-size", "val_fraction": "--val-fraction"}


def test_bad_input_gives_one_line_errors(poem_file, tmp_path, monkeypatch, capsys, bad_text_sources):
    for kwargs, message in _bad_cases(tmp_path, poem_file, monkeypatch, bad_text_sources):
        with pytest.raises(GPTSmallError, match=message) as e:
            prepare(**kwargs)
        assert "\n" not in str(e.value)
        argv = ["prepare"] + [a for k, v in kwargs.items() if k != "force" for a in (_FLAGS[k], str(v))]
        capsys.readouterr()
        assert main(argv + (["--force"] if kwargs.get("force") else [])) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("gpt-small prepare: error: ") and message.split("(")[0].split("\\")[0] in err[-1]
        assert sum("error" in line for line in err) == 1
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*.tmp-*"))


def test_cli_prepare_prints_summary(poem_file, tmp_path, capsys):
    assert main(["prepare", "--text", str(poem_file), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "tokens    train" in printed and "chars/token val 1.000" in printed
    assert PreparedData(tmp_path / "out").meta["source_lines"] == 200


# ---------------------------------------------------------------- reading


def test_prepared_data_errors(poem_file, tmp_path):
    with pytest.raises(GPTSmallError, match="does not exist"):
        PreparedData(tmp_path / "nope")
    with pytest.raises(GPTSmallError, match="holds no meta.json"):
        PreparedData(tmp_path)
    out = tmp_path / "out"
    prepare(out=out, text=poem_file)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(GPTSmallError, match="format_version 99"):
        PreparedData(out)
    (out / "meta.json").write_text(json.dumps(meta))
    (out / "val.bin").write_bytes((out / "val.bin").read_bytes()[:-2])
    with pytest.raises(GPTSmallError, match="val.bin is missing or does not hold"):
        PreparedData(out)


# ---------------------------------------------------------------- batches


@pytest.fixture
def tokens() -> np.ndarray:
    return np.arange(1000, dtype=np.uint16)  # token i == position i: windows are easy to check


def test_batches_are_shifted_windows(tokens):
    s = BatchSampler(tokens, batch_size=4, block_size=16, seed=0)
    x, y = s.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # y is x shifted by one token
    assert torch.equal(x - x[:, :1], torch.arange(16).expand(4, 16))  # contiguous windows
    assert int(y.max()) <= 999
    x2, _ = to_device(x, y, "cpu")
    assert torch.equal(x, x2)


def test_sampler_resumes_exactly_from_json_or_torch(tokens):
    a = BatchSampler(tokens, batch_size=3, block_size=8, seed=7)
    for _ in range(5):
        a.next_batch()
    state = a.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    for restored in (json.loads(json.dumps(state)), torch.load(buf, weights_only=True)):
        b = BatchSampler(tokens, batch_size=3, block_size=8, seed=7)
        b.load_state_dict(restored)
        assert b.batches == 5
        c = BatchSampler(tokens, batch_size=3, block_size=8, seed=7)
        c.load_state_dict(state)
        for _ in range(3):
            assert torch.equal(b.next_batch()[0], c.next_batch()[0])
    expected = [a.next_batch()[0] for _ in range(3)]
    b = BatchSampler(tokens, batch_size=3, block_size=8, seed=7)
    b.load_state_dict(state)
    assert all(torch.equal(b.next_batch()[0], e) for e in expected)


def test_ranks_draw_different_windows_of_one_global_batch(tokens):
    def sampler(rank: int, world_size: int = 2, batch_size: int = 8, seed: int = 1) -> BatchSampler:
        return BatchSampler(tokens, batch_size=batch_size, block_size=4, seed=seed, rank=rank, world_size=world_size)

    r0, r1, single = sampler(0), sampler(1), sampler(0, world_size=1, batch_size=16)
    for _ in range(3):
        x0, x1, x = r0.next_batch()[0], r1.next_batch()[0], single.next_batch()[0]
        assert not torch.equal(x0, x1) and torch.equal(torch.cat([x0, x1]), x)  # 2 x B == 1 x 2B
    assert torch.equal(sampler(0).next_batch()[0], sampler(0).next_batch()[0])
    assert not torch.equal(sampler(0).next_batch()[0], sampler(0, seed=2).next_batch()[0])
    with pytest.raises(GPTSmallError, match="rank 2 is outside world_size 2"):
        sampler(2)


def test_split_smaller_than_a_window_is_refused():
    with pytest.raises(GPTSmallError, match=r"validation split has 10 tokens, fewer than one window of "
                                            r"block_size\+1 = 17; use a smaller --block-size or more text"):
        BatchSampler(np.arange(10, dtype=np.uint16), batch_size=2, block_size=16, seed=0, name="validation")
    with pytest.raises(GPTSmallError, match="validation split has 10 tokens"):
        eval_windows(np.arange(10, dtype=np.uint16), block_size=16, n_batches=1, batch_size=1)


def test_eval_windows_are_fixed_and_spread(tokens):
    a = eval_windows(tokens, block_size=10, n_batches=3, batch_size=4)
    b = eval_windows(tokens, block_size=10, n_batches=3, batch_size=4)
    assert len(a) == 3 and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    starts = torch.cat([x[:, 0] for x, _ in a])
    assert starts[0] == 0 and a[-1][1][-1, -1] == 999  # from the first token to the last
    assert torch.all(starts.diff() > 0) and torch.equal(a[0][1], a[0][0] + 1)
    assert all(torch.equal(x, a[i][0]) for i, (x, _) in enumerate(a))  # iterate again: same windows


@pytest.mark.slow
def test_prepare_eng_poem_char(builtin_corpora, tmp_path):
    meta = prepare(out=tmp_path / "out", corpus="eng-poem")
    assert (meta["source_bytes"], meta["source_chars"], meta["source_lines"]) == (19_999_998, 19_999_672, 499_344)
    assert (meta["train_lines"], meta["val_lines"]) == (449_410, 49_934)
    assert meta["train_tokens"] + meta["val_tokens"] == 19_999_672
    assert meta["vocab_size"] == 115 and meta["val_unknown_chars"] == 12  # 114 training chars + unk


def test_batches_from_prepared_data(poem_file, tmp_path):
    prepare(out=tmp_path / "out", text=poem_file)
    d = PreparedData(tmp_path / "out")
    x, y = BatchSampler(d.train, batch_size=2, block_size=32, seed=0).next_batch()
    assert x.shape == (2, 32) and int(x.max()) < d.vocab_size
    assert isinstance(d.tokenizer, CharTokenizer) and "PreparedData(" in repr(d)
