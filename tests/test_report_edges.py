"""The poem report's figures at their edges, on constructed texts whose answers are known.

report.py: memorisation counts word 8-grams of the poems found verbatim in the training text
(n-grams run across line ends within a poem) and the longest verbatim copy (at least 8 words to
count) with the training line it starts in; form and language figures per their definitions.
"""

from __future__ import annotations

import itertools
import string

import numpy as np
import pytest

from gpt_small import report
from gpt_small.errors import GPTSmallError
from gpt_small.report import N, NGramIndex, corpus_poems, form_stats, language_stats, memorisation
from gpt_small.verse import words as verse_words


def _words(n: int, start: int = 0) -> list[str]:
    """n distinct letter-only words ("baa", "bab", ...): verse.words keeps them whole."""
    letters = string.ascii_lowercase
    out = []
    for k in range(start, start + n):
        w = ""
        while True:
            w = letters[k % 26] + w
            k //= 26
            if not k:
                break
        out.append("q" + w)
    return out


def _text(words: list[str], per_line: int) -> tuple[str, list[str]]:
    lines = [" ".join(words[i:i + per_line]) for i in range(0, len(words), per_line)]
    return "\n".join(lines), lines


@pytest.fixture(scope="module")
def big():
    """A training text of 70,007 distinct words (past 65,535), 7 per line."""
    words = _words(70_007)
    text, lines = _text(words, 7)
    return words, lines, NGramIndex.build(text)


def test_the_longest_copy_counts_from_exactly_eight_words(big):
    words, lines, index = big
    assert N == 8
    other = _words(20, start=100_000)  # words the training text does not have
    for k in (7, 8, 9):
        poem = [" ".join(other[:5]), " ".join(words[14:14 + k]), " ".join(other[5:10])]
        mem = memorisation([poem], index, lines)
        n_words = 5 + k + 5
        assert mem["ngrams"] == n_words - N + 1
        if k < N:  # seven words in a row are no copy
            assert mem["ngrams_found"] == 0 and mem["longest_copy_words"] == 0 and "longest_copy" not in mem
            assert mem["share_found"] == 0.0
        else:
            assert mem["ngrams_found"] == k - N + 1
            assert mem["share_found"] == pytest.approx((k - N + 1) / (n_words - N + 1))
            assert mem["longest_copy_words"] == k and mem["longest_copy"] == " ".join(words[14:14 + k])
            assert mem["source_line_number"] == 3 and mem["source_line"] == lines[2]  # word 14 is on line 3


def test_copy_positions_past_65535_words_and_across_line_ends(big):
    words, lines, index = big
    start = 69_990  # on line 9,999 (1-based 10,000), 17 words before the end
    copy = words[start:start + 12]
    # the poem breaks its lines elsewhere than the training text: n-grams run across line ends
    poem = ["zz " + " ".join(copy[:3]), " ".join(copy[3:10]), " ".join(copy[10:]) + " qzzzz"]
    mem = memorisation([["not a copy at all here"], poem], index, lines)
    assert mem["longest_copy_words"] == 12 and mem["longest_copy"] == " ".join(copy)
    assert mem["longest_copy_poem"] == 2
    assert mem["source_line_number"] == start // 7 + 1 and mem["source_line"] == lines[start // 7]
    assert mem["ngrams_found"] == 12 - N + 1
    assert index.sorted_pos.max() == len(words) - N  # positions are not cut at 16 bits
    assert int(index.word_line[-1]) == len(lines) - 1


def test_a_copy_running_to_the_end_of_the_training_text(big):
    words, lines, index = big
    tail = words[-10:]
    mem = memorisation([[" ".join(tail + ["qzzzz", "qzzzy"])]], index, lines)
    assert mem["longest_copy_words"] == 10 and mem["source_line"] == lines[(len(words) - 10) // 7]


def test_the_longest_of_several_copies_wins_and_the_first_of_equals(big):
    words, lines, index = big
    a, b, c = words[100:109], words[50_000:50_011], words[60_000:60_011]  # 9, 11 and 11 words
    poems = [[" ".join(a)], [" ".join(b)], ["qzzzz " + " ".join(c)]]
    mem = memorisation(poems, index, lines)
    assert mem["longest_copy_words"] == 11 and mem["longest_copy_poem"] == 2
    assert mem["source_line_number"] == 50_000 // 7 + 1
    assert mem["ngrams_found"] == (9 - 7) + (11 - 7) + (11 - 7) and mem["ngrams"] == 2 + 4 + 5


def test_a_hash_hit_is_verified_word_by_word():
    """A hit of an n-gram's 64-bit hash is checked word by word, from its first word: an index
    whose hash matches but whose first word differs (a collision, planted) gives no copy."""
    words = _words(12)
    poem = ["qother " + " ".join(words[1:12])]  # the training text's words but the first
    text, lines = _text(words, 6)
    built = NGramIndex.build(text)
    planted_hash = report._ngram_hashes(report._word_hashes(verse_words(poem[0])))[:1]  # the poem's first 8-gram
    collided = NGramIndex(built.word_hash, built.word_line, planted_hash, np.zeros(1, dtype=np.uint32))
    mem = memorisation([poem], collided, lines)
    assert mem["ngrams_found"] == 1  # the hash is found...
    assert mem["longest_copy_words"] == 0 and "longest_copy" not in mem  # ...but word 0 differs: no copy
    assert memorisation([poem], built, lines)["longest_copy_words"] == 11  # the real copy: from word 1


def test_repeated_ngrams_and_empty_poems():
    text, lines = "one two three four five six seven eight\none two three four five six seven eight nine", None
    lines = text.split("\n")
    index = NGramIndex.build(text)
    mem = memorisation([["one two three four five six seven eight nine"], [], ["", "!!"]], index, lines)
    assert mem["ngrams"] == 2 and mem["ngrams_found"] == 2
    # the nine-word copy starts on line 2 (line 1's eight words run on into line 2's "one")
    assert mem["longest_copy_words"] == 9 and mem["source_line_number"] == 2
    empty = memorisation([[]], index, lines)
    assert empty == {"ngram": 8, "ngrams": 0, "ngrams_found": 0, "share_found": 0.0, "longest_copy_words": 0}


def test_ngram_hashes_are_the_polynomial_of_word_hashes():
    wh = np.arange(1, 11, dtype=np.uint64)
    h = report._ngram_hashes(wh, 3)
    p = int(report._P)
    assert len(h) == 8
    for i in range(8):
        assert int(h[i]) == ((wh[i].item() * p + wh[i + 1].item()) * p + wh[i + 2].item()) % 2**64
    assert len(report._ngram_hashes(wh[:2], 3)) == 0 and len(report._ngram_hashes(wh[:3], 3)) == 1
    # order matters: the same words in another order are another n-gram
    assert report._ngram_hashes(wh[::-1].copy(), 10)[0] != report._ngram_hashes(wh, 10)[0]


def test_word_hashes_are_blake2b_64_little_endian():
    """The index cached on disk is keyed by the training text only: its word hashes must stay the
    documented BLAKE2b hash (8 bytes, read little-endian) or an old cache would find nothing."""
    import hashlib

    ws = ["sea", "the", "sea", "qzz"]
    expected = [int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little") for w in ws]
    got = report._word_hashes(ws)
    assert got.dtype == np.uint64 and got.tolist() == expected
    assert report._word_hashes([]).dtype == np.uint64 and len(report._word_hashes([])) == 0


def test_positions_are_exactly_where_an_ngram_starts():
    words = _words(12)
    text = " ".join(words[:10] + words[:9] + words[2:12])  # words 0..7 at 0 and 10; words 2..9 at 2 and 19
    index = NGramIndex.build(text)
    h = lambda ws: int(report._ngram_hashes(report._word_hashes(ws))[0])  # noqa: E731
    assert index.positions(h(words[0:8])).tolist() == [0, 10]
    assert index.positions(h(words[2:10])).tolist() == [2, 19]
    assert index.positions(h(words[4:12])).tolist() == [21]
    assert index.positions(h(words[7::-1])).tolist() == []  # not in the text (its words backwards)
    assert index.positions(int(index.sorted_hash.max())).size >= 1 and index.positions(0).size == 0


def test_a_copy_found_at_several_places_names_the_first(tmp_path):
    """Positions come in text order (a stable sort of equal hashes), so a copy that the training
    text holds at several places is reported at its first, and the first 16 places are tried."""
    words = _words(30_000)
    phrase = _words(8, start=200_000)
    places = list(range(500, 30_000, 700))  # 43 places, far more than 16
    text_words = list(words)
    for p in reversed(places):
        text_words[p:p] = phrase
    starts = [p + 8 * k for k, p in enumerate(places)]  # where each inserted copy starts
    text, lines = _text(text_words, 10)
    index = NGramIndex.build(text)
    h = int(report._ngram_hashes(report._word_hashes(phrase))[0])
    assert index.positions(h).tolist() == starts
    mem = memorisation([[" ".join(phrase)]], index, lines)
    assert mem["longest_copy_words"] == 8 and mem["source_line_number"] == starts[0] // 10 + 1
    # a longer copy at the 17th place only is past the places tried: the 8 words are reported
    longer = phrase + [text_words[starts[16] + 8]]
    assert memorisation([[" ".join(longer)]], index, lines)["longest_copy_words"] == 8
    longer = phrase + [text_words[starts[15] + 8]]
    mem = memorisation([[" ".join(longer)]], index, lines)
    assert mem["longest_copy_words"] == 9 and mem["source_line_number"] == starts[15] // 10 + 1


def test_the_index_arrays_are_as_documented(tmp_path, big):
    """64-bit hashes, 32-bit word positions and line numbers (4 bytes a word), built or cached."""
    index = big[2]
    dtypes = lambda ix: [a.dtype for a in (ix.word_hash, ix.word_line, ix.sorted_hash, ix.sorted_pos)]  # noqa: E731
    assert dtypes(index) == [np.uint64, np.uint32, np.uint64, np.uint32]
    text = " ".join(_words(40))
    NGramIndex.cached(text, [tmp_path])
    assert dtypes(NGramIndex.cached(text, [tmp_path])) == [np.uint64, np.uint32, np.uint64, np.uint32]
    short = NGramIndex.build(" ".join(_words(N - 1)))  # fewer words than one n-gram: no n-gram
    assert dtypes(short) == [np.uint64, np.uint32, np.uint64, np.uint32] and len(short.sorted_hash) == 0


def test_the_index_cache(tmp_path):
    text = " ".join(_words(40))
    (tmp_path / "file").write_text("")
    ro, rw = tmp_path / "file" / "cache", tmp_path / "rw"  # a folder that cannot be made, then one that can
    index = NGramIndex.cached(text, [ro, rw])
    cached = list(rw.glob("ngrams8-*.npz"))
    assert len(cached) == 1 and cached[0].name == f"ngrams8-{__import__('hashlib').sha256(text.encode()).hexdigest()[:16]}.npz"
    assert not list(rw.glob(".*"))  # no temporary file left
    with np.load(cached[0]) as z:  # the four arrays, as built
        assert sorted(z.files) == ["sorted_hash", "sorted_pos", "word_hash", "word_line"]
        for name in z.files:
            assert np.array_equal(z[name], getattr(index, name)) and z[name].dtype == getattr(index, name).dtype
    mtime = cached[0].stat().st_mtime_ns
    again = NGramIndex.cached(text, [rw])
    assert cached[0].stat().st_mtime_ns == mtime  # read, not built and written again
    assert np.array_equal(again.sorted_hash, index.sorted_hash) and np.array_equal(again.sorted_pos, index.sorted_pos)
    # the file under the text's name is what is read: a planted index is taken as it is
    planted = NGramIndex.build(" ".join(_words(20, start=500)))
    np.savez(cached[0], word_hash=planted.word_hash, word_line=planted.word_line, sorted_hash=planted.sorted_hash,
             sorted_pos=planted.sorted_pos)
    read = NGramIndex.cached(text, [ro, rw])
    for name in ("word_hash", "word_line", "sorted_hash", "sorted_pos"):
        assert np.array_equal(getattr(read, name), getattr(planted, name))
    cached[0].write_bytes(b"damaged")
    rebuilt = NGramIndex.cached(text, [rw])
    assert np.array_equal(rebuilt.word_hash, index.word_hash)
    assert NGramIndex.cached(text + " qextra", [rw]).word_hash.shape == (41,)  # another text, another key
    assert len(list(rw.glob("ngrams8-*.npz"))) == 2


def test_form_figures_by_definition():
    poems = [["The night is long", "the day", "", "", "a stone", "I stay"], ["lone"], []]
    f = form_stats(poems)
    assert f["stanza_lines"] == [2, 2, 1]  # runs of non-blank lines; several blank lines are one break
    assert f["line_chars"] == [17, 7, 7, 6, 4]
    ends = ["long", "day", "stone", "stay"]  # distance 1: long/day no, day/stone no, stone/stay no
    assert f["rhyme_share_distance_1"] == 0.0
    assert f["rhyme_share_distance_2"] == pytest.approx(1 / 2)  # long/stone no, day/stay yes
    assert len(ends) == 4
    assert form_stats([]) == {"line_chars": [], "line_syllables": [], "stanza_lines": [],
                              "rhyme_share_distance_1": 0.0, "rhyme_share_distance_2": 0.0}


def test_rhyme_shares_count_each_pair_at_its_distance():
    """The share of line pairs at distance 1 and 2 whose end words rhyme, over every poem's pairs:
    day/May and stone/alone rhyme, the others not; a poem of two lines has a pair at distance 1 only."""
    f = form_stats([["the day", "in May", "a stone", "alone", "the sea"], ["the night", "so bright"]])
    assert f["rhyme_share_distance_1"] == pytest.approx(3 / 5)  # day/May, stone/alone, night/bright of 4 + 1
    assert f["rhyme_share_distance_2"] == 0.0  # of 3 + 0 pairs
    assert f["stanza_lines"] == [5, 2]
    two = form_stats([["the night", "so bright"]])
    assert (two["rhyme_share_distance_1"], two["rhyme_share_distance_2"]) == (1.0, 0.0)
    apart = form_stats([["the day", "a stone", "in May", "alone", "the sea"]])
    assert apart["rhyme_share_distance_1"] == 0.0
    assert apart["rhyme_share_distance_2"] == pytest.approx(2 / 3)  # day/May, stone/alone of 3


def test_language_figures_by_definition():
    poems = [["the sea the sea", "The Sea the sea ", "blorp"], ["a b"]]
    lang = language_stats(poems)
    assert lang["words"] == 11
    assert lang["oov_share"] == pytest.approx(1 / 11)  # blorp; "b" is in the dictionary
    # poem 1: 2 distinct words of 9 (the, sea, blorp: 3/9); poem 2: 2/2
    assert lang["distinct_1"] == pytest.approx((3 / 9 + 2 / 2) / 2)
    # bigrams of poem 1: the-sea, sea-the, ..., sea-blorp: 8, distinct 3; poem 2: 1 of 1
    assert lang["distinct_2"] == pytest.approx((3 / 8 + 1) / 2)
    assert lang["repeated_line_share"] == pytest.approx(1 / 4)  # line 2 repeats line 1 (case, spaces)
    # distinct bigrams are pairs of neighbours: "a a b b" has three, all distinct, of two words
    assert (language_stats([["a a b b"]])["distinct_1"], language_stats([["a a b b"]])["distinct_2"]) == (0.5, 1.0)
    # a repeat whatever the case, as Unicode compares without case: ß is SS, final sigma is sigma
    caseless = language_stats([["Straße", "STRASSE", "ΣΟΦΟΣ", "σοφος", "Strasse!"]])
    assert caseless["repeated_line_share"] == pytest.approx(2 / 5)
    assert language_stats([]) == {"words": 0, "oov_share": 0.0, "distinct_1": 0.0, "distinct_2": 0.0,
                                  "repeated_line_share": 0.0}


def test_a_corpus_folder_is_split_from_its_source_file_while_the_file_is_unchanged(tmp_path):
    """A built-in corpus's folder records its source file; the texts are that file cut at the
    recorded split (characters the tokenizer does not know kept), else the token files decoded.
    The built-in corpus is 20 MB: a small text prepared the same way stands in for it, its
    meta.json saying `corpus` as a built-in corpus's does."""
    from gpt_small.data import PreparedData, prepare

    src = tmp_path / "corpus.txt"
    src.write_text("".join(f"line {w} of the training text\n" for w in _words(60)) + "the validation has ж\n"
                   + "".join(f"and {w} more\n" for w in _words(3)), encoding="utf-8")
    prepare(out=tmp_path / "data", text=src, tokenizer="char", val_fraction=0.06)
    meta_path = tmp_path / "data" / "meta.json"
    meta = __import__("json").loads(meta_path.read_text())
    raw = src.read_text(encoding="utf-8")
    assert meta["source_kind"] == "text" and meta["source_path"] == str(src.resolve())
    text_split = report.split_texts(PreparedData(tmp_path / "data"))  # a text folder: its token files
    assert "ж" not in text_split[1] and "\ufffd" in text_split[1]
    meta["source_kind"] = "corpus"
    meta_path.write_text(__import__("json").dumps(meta))
    raw = src.read_text(encoding="utf-8")
    cut = len(raw.encode()[:meta["train_bytes"]].decode())
    assert report.split_texts(PreparedData(tmp_path / "data")) == (raw[:cut], raw[cut:])
    assert "ж" in raw[cut:]
    src.write_text(raw + "one more line\n", encoding="utf-8")  # changed since: the token files are the split
    train, val = report.split_texts(PreparedData(tmp_path / "data"))
    assert train == raw[:cut] and "ж" not in val and val.replace("\ufffd", "ж") == raw[cut:]
    src.unlink()
    assert report.split_texts(PreparedData(tmp_path / "data")) == (train, val)
    del meta["source_path"]  # a folder that does not record its source: the token files
    meta_path.write_text(__import__("json").dumps(meta))
    assert report.split_texts(PreparedData(tmp_path / "data")) == (train, val)


def test_corpus_stretches_are_evenly_spaced_and_refused_when_too_few():
    text = "\n".join(f"line {w}" for w in _words(30)) + "\n\n"
    rows = [r for r in text.split("\n") if r.strip()]
    poems = corpus_poems(text, 3, 4)
    assert poems == [rows[0:4], rows[13:17], rows[26:30]]  # the first, the middle, the last stretch
    assert corpus_poems(text, 1, 30) == [rows]
    with pytest.raises(GPTSmallError, match="has 30 non-blank lines, fewer than --lines 31"):
        corpus_poems(text, 1, 31)


def test_summary_of_nothing_and_of_figures():
    assert report._summary([]) == {"mean": 0.0, "sd": 0.0, "median": 0.0}
    assert report._summary([1, 2, 6]) == {"mean": 3.0, "sd": pytest.approx((14 / 3) ** 0.5), "median": 2.0}


def test_words_helper_is_distinct():
    ws = _words(30_000)
    assert len(set(ws)) == len(ws) and all(w.isalpha() for w in itertools.islice(ws, 100))


@pytest.mark.parametrize("samples, ok", [(1_024, True), (1_025, False)])
def test_report_samples_limit_is_the_one_generate_takes(tmp_path, capsys, samples, ok):
    # the limit once said 100,000 while generate refused more than 1,024 ("num_samples"), after the
    # checkpoint and both splits were read; now the flag's own check holds the real limit, before any work
    from gpt_small.cli import main

    assert main(["report", "--checkpoint", str(tmp_path / "none"), "--samples", str(samples)]) == 2
    err = capsys.readouterr().err.strip()
    assert ("samples must be" in err and "<= 1,024" in err) != ok, err


# ---------------------------------------------------------------- what the report writes, from a known result

def _side(share, longest, chars, syl, d1, d2, stanza, oov, dist1, dist2, rep, *, copy=None):
    mem = {"ngram": 8, "ngrams": 100, "ngrams_found": round(share * 100), "share_found": share,
           "longest_copy_words": longest}
    if copy:
        mem.update(longest_copy=copy, longest_copy_poem=2, source_line_number=12_345, source_line="the source line")
    form = {"line_chars": [30, 50], "line_syllables": [8, 12], "stanza_lines": [3, 11],
            "rhyme_share_distance_1": d1, "rhyme_share_distance_2": d2}
    return {"memorisation": mem, "form": form,
            "language": {"words": 90, "oov_share": oov, "distinct_1": dist1, "distinct_2": dist2,
                         "repeated_line_share": rep},
            "line_chars": {"mean": chars, "sd": 1.0, "median": chars},
            "line_syllables": {"mean": syl[0], "sd": syl[1], "median": 10.0},
            "stanza_lines": {"mean": stanza, "sd": 0.0, "median": stanza}}


def _result(*, whole=True, copy=None):
    """A report's result with a different value in every cell, each rounded the way its row says."""
    return {"checkpoint": "runs/x/checkpoints/step-000300", "step": 300, "data": "data/poems", "samples": 3,
            "lines": 2, "seed": 7, "temperature": 0.9, "window_keep": 32,
            "model_eval": {"loss": 1.23456, "bits_per_char": 2.34567, "tokens": 12_345, "whole_split": whole},
            "model": _side(0.12345, 9, 41.26, (10.04, 2.06), 0.0049, 0.5, 14.04, 0.0204, 0.72449, 0.98551, 0.0251,
                           copy=copy),
            "corpus": _side(0.0, 0, 33.96, (8.24, 2.46), 0.169, 0.175, 13.96, 0.085, 0.7515, 0.951, 0.0),
            "poems": {"model": [["first line", "second line"], ["other"]], "corpus": [["a", "b"]]}}


def test_the_report_line_names_the_headline_figures():
    assert report.report_line(_result()) == (
        "loss 1.2346 (2.346 bits/char), 8-grams copied 12.3% (corpus 0.0%), rhyme d1/d2 0%/50%, "
        "invented words 2.0%")


def test_the_markdown_table_row_by_row():
    md = report.format_markdown(_result())
    assert md == "\n".join([
        "# Poem report: runs/x/checkpoints/step-000300 (step 300)", "",
        "3 poems of 2 lines sampled at temperature 0.9 (seed 7), against 3 stretches of 2 lines of the "
        "validation split of data/poems.", "",
        "Model: validation loss 1.2346 nats/token, 2.3457 bits/char over 12,345 tokens (the whole split).", "",
        "| | model | corpus |", "| --- | ---: | ---: |",
        "| word 8-grams found in the training text | 12.3% | 0.0% |",
        "| longest verbatim copy (words) | 9 | 0 |",
        "| characters per line (mean) | 41.3 | 34.0 |",
        "| syllables per line (mean +- sd) | 10.0 +- 2.1 | 8.2 +- 2.5 |",
        "| line pairs rhyming at distance 1 | 0.5% | 16.9% |",
        "| line pairs rhyming at distance 2 | 50.0% | 17.5% |",
        "| stanza length in lines (mean) | 14.0 | 14.0 |",
        "| words not in the CMU dictionary | 2.0% | 8.5% |",
        "| distinct-1 | 0.724 | 0.751 |",
        "| distinct-2 | 0.986 | 0.951 |",
        "| lines repeating an earlier line | 2.5% | 0.0% |", "",
        "A sample:", "", "```", "first line", "second line", "```", ""])


def test_the_markdown_names_the_longest_copy_and_a_partial_evaluation():
    md = report.format_markdown(_result(whole=False, copy="a b c d e f g h i"))
    assert "over 12,345 tokens (the start of the split)." in md
    whole = report.format_markdown(_result(copy="a b c d e f g h i"))
    assert whole == report.format_markdown(_result()).replace("\n\nA sample:", (
        '\n\nLongest copy (9 words, poem 2): "a b c d e f g h i"; the training text\'s line 12,345: '
        '"the source line"\n\nA sample:'))
    assert "Longest copy" not in report.format_markdown(_result())  # no copy, no line


def test_the_plot_shows_each_figure_of_both_sides(tmp_path, monkeypatch):
    """report.png: 1100 x 800 pixels; three histograms (model blue, corpus orange) of the per-line
    and per-stanza figures and one bar chart of the seven shares, read back from the figure saved."""
    import matplotlib.figure
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    saved = []
    real_savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: (saved.append(fig), real_savefig(fig, *a, **k))[1])
    r = _result()
    r["corpus"]["form"]["line_chars"] = []  # a side with no lines has no bars in that histogram
    r["model"]["form"]["line_chars"] = [3, 5]
    r["model"]["form"]["line_syllables"] = [8, 40]  # up to 40: a bin for each count
    r["model"]["form"]["stanza_lines"] = [3, 41]  # past 40: 40 bins from 0 to the longest + 1
    report.plot_report(r, tmp_path / "report.png")
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (1100, 800)
    (fig,) = saved
    assert len(fig.axes) == 4  # two rows of two panels, no other
    assert [ax.get_subplotspec().get_geometry() for ax in fig.axes] == [(2, 2, k, k) for k in range(4)]
    assert fig._suptitle.get_text() == ("step-000300: 3 poems x 2 lines vs the validation split; 2.346 bits/char")
    (a, b), (c, d) = fig.axes[0:2], fig.axes[2:4]
    assert [ax.get_title() for ax in (a, b, c, d)] == ["characters per line", "syllables per line",
                                                       "stanza length (lines)", "shares"]
    blue, orange = to_hex("tab:blue"), to_hex("tab:orange")

    def bars(ax):  # {colour: [(left edge, width, height)]}
        out = {}
        for p in ax.patches:
            out.setdefault(to_hex(p.get_facecolor()[:3]), []).append(
                (round(p.get_x(), 6), round(p.get_width(), 6), round(p.get_height(), 6)))
        return out

    chars = bars(a)
    assert set(chars) == {blue}  # the corpus side had no lines
    assert [x for x, _, _ in chars[blue]] == [k - 0.5 for k in range(6)]  # unit bins around 0 .. 5
    assert [h for _, _, h in chars[blue]] == [0, 0, 0, 0.5, 0, 0.5]  # density: 3 and 5 once each
    syl = bars(b)
    assert len(syl[blue]) == len(syl[orange]) == 41 and syl[blue][-1][:2] == (39.5, 1.0)
    assert [x for x, _, h in syl[blue] if h] == [7.5, 39.5] and [x for x, _, h in syl[orange] if h] == [7.5, 11.5]
    stanza = bars(c)
    assert len(stanza[blue]) == 40 and stanza[blue][0][:2] == (0.0, 1.05) and stanza[blue][-1][0] == 40.95
    assert [h > 0 for _, _, h in stanza[blue]] == [k in (2, 39) for k in range(40)]
    assert {p.get_alpha() for ax in (a, b, c) for p in ax.patches} == {0.55}
    assert [ax.get_legend() is not None for ax in (a, b, c, d)] == [True] * 4
    assert [[t.get_text() for t in ax.get_legend().get_texts()] for ax in (a, b, c, d)] == [
        ["model"], ["model", "corpus"], ["model", "corpus"], ["model", "corpus"]]
    shares = bars(d)
    heights = [0.12345, 0.0049, 0.5, 0.0204, 0.72449, 0.98551, 0.0251]
    assert [round(h, 5) for _, _, h in shares[blue]] == heights
    assert [round(h, 5) for _, _, h in shares[orange]] == [0.0, 0.169, 0.175, 0.085, 0.7515, 0.951, 0.0]
    assert [(x, w) for x, w, _ in shares[blue]] == [(k - 0.4, 0.4) for k in range(7)]
    assert [(x, w) for x, w, _ in shares[orange]] == [(k, 0.4) for k in range(7)]
    assert [t.get_text() for t in d.get_xticklabels()] == [
        "8-grams\ncopied", "rhyme\nd=1", "rhyme\nd=2", "not in\ndictionary", "distinct-1", "distinct-2",
        "repeated\nlines"]
    assert {t.get_fontsize() for t in d.get_xticklabels()} == {8}
    assert d.get_ylim() == (0, 1)
    assert fig.subplotpars.left < 0.1 and fig.subplotpars.bottom < 0.1  # laid out tightly, not at the 0.125 margins
    assert plt.get_fignums() == []  # the figure is closed: a report per call leaks nothing


def test_the_plot_of_lines_without_syllables_is_a_png_whatever_the_settings(tmp_path):
    """Figures all 0 still get the bins of 0 and 1 and the shares' axis from 0 to 1, each side in
    its own colour (the corpus orange when alone in a panel); the file is a 1100 x 800 PNG written
    to an open file (as the report writes it) even where matplotlib's settings say to save SVG, at
    another figure size and resolution, with other colours."""
    import matplotlib
    import matplotlib.figure

    r = _result()
    for side in ("model", "corpus"):
        r[side]["form"].update(line_chars=[0], line_syllables=[0, 0], stanza_lines=[0])
        r[side]["form"].update(rhyme_share_distance_1=0.0, rhyme_share_distance_2=0.0)
        r[side]["memorisation"]["share_found"] = 0.0
        r[side]["language"].update(oov_share=0.0, distinct_1=0.0, distinct_2=0.0, repeated_line_share=0.0)
    saved = []
    real_savefig = matplotlib.figure.Figure.savefig
    from cycler import cycler
    from matplotlib.colors import to_hex

    settings = {"savefig.format": "svg", "figure.dpi": 72, "figure.figsize": (4, 3),
                "axes.prop_cycle": cycler(color=["red", "green"])}
    r["model"]["form"]["stanza_lines"] = []  # the corpus alone in a panel is still orange
    with matplotlib.rc_context(settings), open(tmp_path / "plot", "wb") as f:
        try:
            matplotlib.figure.Figure.savefig = lambda fig, *a, **k: (saved.append(fig), real_savefig(fig, *a, **k))[1]
            report.plot_report(r, f)
        finally:
            matplotlib.figure.Figure.savefig = real_savefig
    png = (tmp_path / "plot").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (1100, 800)
    assert saved[0].axes[3].get_ylim() == (0, 1)  # every share 0: the axis still runs from 0 to 1
    blue, orange = to_hex("tab:blue"), to_hex("tab:orange")
    colours = [[to_hex(p.get_facecolor()[:3]) for p in ax.patches] for ax in saved[0].axes]
    two = [blue] * 2 + [orange] * 2  # the bins of 0 and 1, model then corpus
    assert colours == [two, two, [orange] * 2, [blue] * 7 + [orange] * 7]
    for ax in saved[0].axes[:3]:
        assert sorted({round(p.get_x(), 6) for p in ax.patches}) == [-0.5, 0.5]  # the bins of 0 and 1
