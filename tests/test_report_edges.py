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


def test_the_index_cache(tmp_path):
    text = " ".join(_words(40))
    (tmp_path / "file").write_text("")
    ro, rw = tmp_path / "file" / "cache", tmp_path / "rw"  # a folder that cannot be made, then one that can
    index = NGramIndex.cached(text, [ro, rw])
    cached = list(rw.glob("ngrams8-*.npz"))
    assert len(cached) == 1 and cached[0].name == f"ngrams8-{__import__('hashlib').sha256(text.encode()).hexdigest()[:16]}.npz"
    assert not list(rw.glob(".*"))  # no temporary file left
    again = NGramIndex.cached(text, [rw])
    assert np.array_equal(again.sorted_hash, index.sorted_hash) and np.array_equal(again.sorted_pos, index.sorted_pos)
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
    assert language_stats([]) == {"words": 0, "oov_share": 0.0, "distinct_1": 0.0, "distinct_2": 0.0,
                                  "repeated_line_share": 0.0}


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
