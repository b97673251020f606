"""Verse forms and prosody at their edges, pinned to the contracts of verse.py and forms.py.

Prosody against the CMU dictionary on hand-picked words (secondary stress, apostrophes, hyphens,
the spelling fallback). The line search with a hand-made model whose probabilities are known:
each line of the model is one token followed by a newline (or by a filler), so every line it can
write and that line's log-probability are known in advance, and with that the line the search
must keep (forms.py: the most probable line that meets the form; when none does, the line that
breaks the fewest constraints, the most probable among those).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gpt_small import verse
from gpt_small.errors import GPTSmallError
from gpt_small.form_calls import sample_lines
from gpt_small.forms import Form, SearchConfig, _Judge, _stem, compose

# ---------------------------------------------------------------- words

@pytest.mark.parametrize("line, expected", [
    ("O'er the hills", ["o'er", "the", "hills"]),  # an inner apostrophe keeps the word whole
    ("Heav\u2019n is near", ["heav'n", "is", "near"]),  # a curly apostrophe is a straight one
    ("'Tis the lovers' hour", ["tis", "the", "lovers", "hour"]),  # outer apostrophes are not letters
    ("a well-known twenty-one", ["a", "well", "known", "twenty", "one"]),  # a hyphen parts words
    ("In 1609, twice: 2 times!", ["in", "twice", "times"]),  # digits and punctuation are not words
    ("don't  --  WON'T", ["don't", "won't"]),
    ("", []),
])
def test_words_of_a_line(line, expected):
    assert verse.words(line) == expected
    assert verse.last_word(line) == (expected[-1] if expected else None)


def test_apostrophes_and_hyphens_against_the_dictionary():
    # the dictionary has these with their apostrophe: one word each, its own pronunciation
    for word, n in (("don't", 1), ("couldn't", 2), ("heaven's", 2)):
        assert verse.in_dictionary(word), word
        assert verse.syllable_range(word) == (n, n), word
        assert verse.line_syllables(word.upper()) == n
    assert verse.line_syllables("Don\u2019t") == 1  # curly, same word
    # a hyphenated word is its parts: twenty (2) + one (1)
    assert verse.line_syllable_range("twenty-one") == (3, 3)
    assert verse.line_syllables("well-known") == 2


def test_syllables_take_the_first_pronunciation_and_ranges_all():
    assert verse.syllable_range("fire") == (1, 2)
    assert verse.syllables("fire") == 2  # F AY1 ER0 is listed first, F AY1 R second
    assert verse.syllable_range("aged") == (1, 2) and verse.syllables("aged") == 1  # EY1 JH D first
    assert verse.line_syllables("fire aged") == 3
    assert verse.line_syllable_range("the fire") == (2, 3)
    assert verse.syllable_range("hmm") == (0, 0)  # HH M: no vowel, no syllable
    assert verse.line_syllable_range("") == (0, 0)
    # a word the dictionary lacks: its spelled count, the same at both ends
    assert verse.syllable_range("glimmerous") == (3, 3) and verse.syllables("glimmerous") == 3


# ---------------------------------------------------------------- rhyme keys

def test_rhyme_key_starts_at_the_last_stressed_vowel_secondary_stress_included():
    # "telephone" T EH1 L AH0 F OW2 N: the last stressed vowel carries secondary stress
    assert "OW N" in verse.rhyme_keys("telephone")
    assert verse.rhymes("telephone", "own") and verse.rhymes("telephone", "stone", dictionary_only=True)
    # "understand" AH2 N D ER0 S T AE1 N D: the primary stress comes last
    assert verse.rhyme_keys("understand") == frozenset({"AE N D"})
    assert verse.rhymes("understand", "hand")
    assert verse.rhyme_keys("morning") >= {"AO R N IH NG"}
    assert verse._rhyme_key(["DH", "AH0"]) == "AH"  # no stressed vowel: the last vowel
    assert verse._rhyme_key(["AH0", "B", "AH0", "T"]) == "AH T"
    assert verse._rhyme_key(["HH", "M"]) == "HH M"  # no vowel at all: the whole word
    assert verse._rhyme_key(["W", "ER1", "D", "IH2", "NG", "Z"]) == "IH NG Z"


def test_rhymes_contract():
    assert not verse.rhymes("day", "day")  # the same word is no rhyme
    assert not verse.rhymes(None, "day") and not verse.rhymes("day", None) and not verse.rhymes("", "day")
    assert verse.rhymes("day", "away") and verse.rhymes("away", "day")
    # a word the dictionary lacks: spelled keys, and never under dictionary_only
    assert verse.rhymes("flane", "crane")  # "~ane" both (crane is in the dictionary, flane is not)
    assert not verse.rhymes("flane", "crane", dictionary_only=True)
    assert not verse.rhymes("glorp", "day")


def test_spelling_fallback():
    cases = {"flane": (1, "~ane"), "gentle": (2, "~e"), "glorp": (1, "~orp"), "the": (1, "~e"),
             "bree": (1, "~ee"), "xyz": (1, "~yz"), "brrr": (1, "~brrr"), "ble": (1, "~e"),
             "sprokable": (3, "~e"), "glorpe": (1, "~orpe"), "ae": (1, "~ae"),
             "ume": (1, "~ume"),  # three letters: the shortest silent e
             "flobee": (2, "~ee"),  # a vowel before the e: not silent
             "blorpat": (2, "~at"), "galopt": (2, "~opt"),  # no final e
             "sprokane": (2, "~ane")}  # three vowel groups less the silent e
    for word, (n, key) in cases.items():
        assert verse.spelled_syllables(word) == n, word
        assert verse.spelled_rhyme_key(word) == key, word
        if not verse.in_dictionary(word):
            assert verse.rhyme_keys(word) == frozenset({key})


def test_rhyming_words():
    found = verse.rhyming_words("day")
    assert "away" in found and "play" in found and "day" not in found
    assert found == sorted(found) and all(w.isalpha() for w in found)
    assert verse.rhyming_words("glorp") == []  # not in the dictionary
    # in the dictionary, but its rhyme key belongs to no plain word (the index holds plain words only)
    assert verse.in_dictionary("acme's") and verse.rhyming_words("acme's") == []
    assert "a" in verse.rhyme_index()["EY"] or "a" in verse.rhyme_index()["AH"]
    assert all(len(w) > 1 or w in ("a", "i") for ws in verse.rhyme_index().values() for w in ws)


# ---------------------------------------------------------------- schemes

@pytest.mark.parametrize("scheme, stanzas", [
    ("abab", ["ABAB"]), ("ABAB CDCD EFEF GG", ["ABAB", "CDCD", "EFEF", "GG"]), (" Sonnet ", ["ABAB", "CDCD", "EFEF", "GG"]),
    ("limerick", ["AABBA"]), ("A", ["A"]), ("ABCDEFGHIJKLMNOPQRSTUVWXYZ", ["ABCDEFGHIJKLMNOPQRSTUVWXYZ"]),
])
def test_schemes_accepted(scheme, stanzas):
    assert verse.parse_scheme(scheme) == stanzas


@pytest.mark.parametrize("scheme, message", [
    ("", "empty"), ("   ", "empty"), ("AB1A", "other than letters A-Z: '1'"), ("AB-BA", "'-'"),
    ("B", "letter B comes before A"), ("ABD", "letter D comes before C"), ("ÀB", "other than letters"),
])
def test_schemes_refused(scheme, message):
    with pytest.raises(GPTSmallError, match=message.replace("(", r"\(")):
        verse.parse_scheme(scheme)


def test_scheme_refusals_are_one_whole_line():
    names = "sonnet, petrarchan, couplets, quatrain, envelope, ballad, limerick"
    cases = {
        "": "rhyme scheme is empty; give letters such as ABAB or 'ABAB CDCD EFEF GG'",
        "A1B2 A_": f"rhyme scheme 'A1B2 A_' has characters other than letters A-Z: '12_'; give letters such as "
                   f"ABAB, or one of: {names}",
        "AB^A": f"rhyme scheme 'AB^A' has characters other than letters A-Z: '^'; give letters such as ABAB, or "
                f"one of: {names}",
        "ABAB CECE": "rhyme scheme 'ABAB CECE': letter E comes before D; new rhymes take the next letter of the "
                     "alphabet, as in ABAB CDCD EFEF GG",
    }
    for scheme, message in cases.items():
        with pytest.raises(GPTSmallError) as e:
            verse.parse_scheme(scheme)
        assert str(e.value) == message


def test_repeat_scheme_takes_fresh_letters_up_to_z():
    assert verse.repeat_scheme("ABAB", 3) == ["ABAB", "CDCD", "EFEF"]
    assert verse.repeat_scheme("ABBA", 1) == ["ABBA"]
    assert verse.repeat_scheme("AB", 13)[-1] == "YZ"  # 26 letters: the last allowed
    assert verse.repeat_scheme("ABC", 8)[-1] == "VWX"
    for stanza, times in (("AB", 14), ("ABC", 9)):  # 28 and 27 letters
        with pytest.raises(GPTSmallError, match="more than 26 letters"):
            verse.repeat_scheme(stanza, times)


# ---------------------------------------------------------------- a model with known probabilities

class LineTokenizer:
    """Tokens: newline, <unk>, the filler " la", then one token per whole line of verse."""

    def __init__(self, lines: list[str]):
        self.tokens = ["\n", "<unk>", " la", *lines]
        self.vocab_size = len(self.tokens)
        self.unk_id = 1

    def encode(self, text: str, *, unknown: str = "error") -> list[int]:
        out, i = [], 0
        while i < len(text):
            best = max((t for t in range(len(self.tokens)) if t != 1 and text.startswith(self.tokens[t], i)),
                       key=lambda t: len(self.tokens[t]), default=None)
            if best is None:
                if unknown == "error":
                    raise GPTSmallError(f"cannot encode {text[i:]!r}")
                out.append(self.unk_id)
                i += 1
                continue
            out.append(best)
            i += len(self.tokens[best])
        return out

    def decode(self, ids) -> str:
        return "".join("" if i == 1 else self.tokens[i] for i in ids)


class LineModel(nn.Module):
    """A bigram model: after a newline (or the prompt) line k with probability p[k]; after line k a
    newline with probability q[k], else the filler; after the filler a newline."""

    def __init__(self, p: list[float], q: list[float]):
        super().__init__()
        V = 3 + len(p)
        self.config = SimpleNamespace(vocab_size=V, block_size=64)
        logp = torch.full((V, V), -1e9)
        logp[0, 3:] = torch.tensor(p).log()
        for k, qk in enumerate(q):
            logp[3 + k, 0] = math.log(qk)
            if qk < 1:
                logp[3 + k, 2] = math.log(1 - qk)
        logp[2, 0] = 0.0
        logp[1, 0] = 0.0
        self.table = nn.Parameter(logp, requires_grad=False)  # compose finds the device by a parameter

    def setup_kv_cache(self, rows: int, length: int) -> None:
        pass

    def clear_kv_cache(self) -> None:
        pass

    def forward(self, idx, input_pos=None, last_only=False):
        return self.table[idx]  # (B, T, V): the next token depends on this one only


def _poem(lines, p, q, form, **search):
    tok = LineTokenizer(lines)
    search = SearchConfig(**{"candidates": 64, "budget": 64, **search})
    return compose(LineModel(p, q), tok, form, search=search, temperature=1.0, seed=0)


def test_a_lines_log_probability_is_the_sum_over_its_tokens_newline_included():
    tok = LineTokenizer(["the cat sat", "the big black dog"])
    model = LineModel([0.25, 0.75], [0.4, 1.0])
    prefix = torch.tensor(tok.encode("\n"))
    newline = torch.tensor([True] + [False] * (tok.vocab_size - 1))
    g = torch.Generator().manual_seed(0)
    rows = sample_lines(model, prefix, 200, 4, newline, g, dict(temperature=1.0, top_k=None, top_p=None), [1])
    expected = {(3, 0): math.log(0.25 * 0.4), (3, 2, 0): math.log(0.25 * 0.6), (4, 0): math.log(0.75)}
    seen = set()
    for ids, lp, ended in rows:
        assert ended and tuple(ids) in expected
        assert lp == pytest.approx(expected[tuple(ids)], abs=1e-5)
        seen.add(tuple(ids))
    assert seen == set(expected)
    # a line cut at max_tokens: not ended, scored over the tokens it has
    rows = sample_lines(model, prefix, 50, 1, newline, g, dict(temperature=1.0, top_k=None, top_p=None), [1])
    for ids, lp, ended in rows:
        assert not ended and len(ids) == 1
        assert lp == pytest.approx(math.log([0.25, 0.75][ids[0] - 3]), abs=1e-5)


def test_the_most_probable_line_that_meets_the_form_is_kept():
    lines = ["the cat sat", "the big black dog", "my old brown shoe"]  # 3, 4, 4 syllables
    poem = _poem(lines, [0.5, 0.3, 0.2], [1.0, 1.0, 1.0], Form(lines=1, syllables=4, tolerance=0))
    assert poem.lines == ["the big black dog"]
    m = poem.meta["lines"][0]
    assert m["met"] and not m["over_budget"] and m["log_prob"] == pytest.approx(math.log(0.3), abs=1e-4)
    assert poem.meta["all_met"] and poem.meta["over_budget_lines"] == []


def test_the_line_chosen_by_its_whole_probability_not_its_first_token():
    lines = ["the cat sat", "the big black dog", "my old brown shoe"]
    # "the big black dog" + newline: 0.3 * 0.2 = 0.06 < 0.2 (its other ending adds a syllable)
    poem = _poem(lines, [0.5, 0.3, 0.2], [1.0, 0.2, 1.0], Form(lines=1, syllables=4, tolerance=0))
    assert poem.lines == ["my old brown shoe"]
    assert poem.meta["lines"][0]["log_prob"] == pytest.approx(math.log(0.2), abs=1e-4)


def test_tolerance_is_inclusive_at_its_edge():
    lines = ["the cat sat", "a small red hen sat down"]  # 3 and 6 syllables
    poem = _poem(lines, [0.6, 0.4], [1.0, 1.0], Form(lines=1, syllables=5, tolerance=1))
    assert poem.lines == ["a small red hen sat down"]  # 6 = 5 + 1: met; 3 < 5 - 1: not
    poem = _poem(lines, [0.6, 0.4], [1.0, 1.0], Form(lines=1, syllables=4, tolerance=1))
    assert poem.lines == ["the cat sat"]  # 3 = 4 - 1


def test_when_no_line_meets_the_form_the_fewest_violations_win_then_probability():
    lines = ["the cat sat", "the big black dog", "my old brown shoe"]
    # the most probable line is always followed by the filler: at 2 tokens at most it never ends
    # (two violations: syllables and no newline); the others break the syllables only
    poem = _poem(lines, [0.5, 0.2, 0.3], [1e-9, 1.0, 1.0], Form(lines=1, syllables=7, tolerance=0),
                 max_line_tokens=2)
    assert poem.lines == ["my old brown shoe"]
    m = poem.meta["lines"][0]
    assert not m["met"] and m["over_budget"] and m["candidates"] == 64
    assert m["violations"] == ["4 syllables, not 7+-0"]
    assert poem.meta["over_budget_lines"] == [1] and not poem.meta["all_met"]
    assert "budget spent on line(s) 1" in __import__("gpt_small.forms", fromlist=["summary"]).summary(poem.meta)


def test_an_end_word_is_used_once_per_rhyme_group():
    lines = ["I saw the day", "we went away", "it was the day", "they came to play", "the night"]
    poem = _poem(lines, [0.3, 0.25, 0.2, 0.1, 0.15], [1.0] * 5, Form(rhyme="AAA"))
    # line 1 opens the group with the most probable line; line 2 may not end on "day" again (the
    # group's word), line 3 on neither "day" nor "away": the less probable "play"
    assert poem.lines == ["I saw the day", "we went away", "they came to play"]
    assert [m["end_word"] for m in poem.meta["lines"]] == ["day", "away", "play"]
    assert poem.meta["all_met"]


def test_a_new_group_may_not_rhyme_with_another():
    lines = ["I saw the day", "we went away", "the night", "the light is bright"]
    poem = _poem(lines, [0.4, 0.3, 0.2, 0.1], [1.0] * 4, Form(rhyme="AABB"))
    assert poem.lines == ["I saw the day", "we went away", "the night", "the light is bright"]
    assert poem.text == "\n".join(poem.lines) + "\n"


def test_judge_word_rules():
    form, search = Form(rhyme="ABAB"), SearchConfig(min_rhymes=3)
    later = _Judge(form, search, "A", {"A": "day"}, {"A": {"day", "away"}})
    assert "already a rhyme of group A" in later.word_ok("away")
    assert later.word_ok("play") is None
    assert "does not rhyme with 'day'" in later.word_ok("night")
    assert "not in the dictionary" in later.word_ok("glorp")
    opener = _Judge(form, search, "B", {"A": "day"}, {"A": {"day"}})
    assert opener.word_ok("night") is None
    assert "rhymes with 'day' of another group" in opener.word_ok("play")
    free = _Judge(form, search, None, {"A": "day"}, {})
    assert free.word_ok("glorp") is None and free.check("glorp glorp") == []
    assert free.check("1, 2, 3!") == ["no words"]
    # min_rhymes: a word with exactly that many rhymes opens a group, one fewer does not
    word, n = "window", 4  # four rhyming dictionary words
    assert len(verse.rhyming_words(word)) == n
    assert _Judge(form, SearchConfig(min_rhymes=n), "A", {}, {}).word_ok(word) is None
    assert "fewer than" in _Judge(form, SearchConfig(min_rhymes=n + 1), "A", {}, {}).word_ok(word)


def test_syllable_window_of_the_judge():
    judge = _Judge(Form(lines=1, syllables=10, tolerance=1), SearchConfig(), None, {}, {})
    assert judge.syllables_ok(9, 9) and judge.syllables_ok(11, 11) and judge.syllables_ok(5, 9)
    assert judge.syllables_ok(11, 20)
    assert not judge.syllables_ok(8, 8) and not judge.syllables_ok(12, 12)
    assert _Judge(Form(lines=1), SearchConfig(), None, {}, {}).syllables_ok(0, 99)
    # what a line that misses is told: its count, or its range when a word's count is not certain
    five = _Judge(Form(lines=1, syllables=5, tolerance=0), SearchConfig(), None, {}, {})
    assert five.check("the day") == ["2 syllables, not 5+-0"]
    assert five.check("fire") == ["1-2 syllables, not 5+-0"]


def test_stem_is_the_line_less_its_last_word():
    assert _stem("The sun is bright,") == "The sun is"
    assert _stem("O'er  the hills!") == "O'er  the"
    assert _stem("alone") is None and _stem("...") is None
    assert _stem("Don\u2019t go") == "Don\u2019t"
    # an apostrophe inside the last word, straight or curly, keeps the word whole (as verse.words does)
    for line in ("I sing the summer's", "I sing the summer\u2019s", "Where the bee sucks, there suck\u2019d I"):
        assert _stem(line) == line.rsplit(" ", 1)[0]
        assert verse.words(_stem(line)) == verse.words(line)[:-1]
