"""A poem's search at its edges (forms.compose), with a hand-made bigram model whose every
probability is known: the endings search (which words it scores and which line it keeps), the
prompt's unfinished line, stanza breaks, the window past the model's block, the metadata and the
summary line, and the form's and search's limits at their edges.

The model's tokens are whole pieces of verse (a line's opening, a word with its space, a newline);
the next token depends on the last one only, so a line's log-probability is a product read off
the table below, and so is the line the search must keep.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gpt_small import limits
from gpt_small.errors import GPTSmallError
from gpt_small.forms import Form, SearchConfig, compose, summary
from test_verse_edges import LineTokenizer

# after "\n": a line opens with "I saw the" or "we went"; after "I saw the": an end word; "way"
# is rarely followed by a newline (else the filler " la", then a newline)
TOKENS = ["I saw the", "we went", " day", " way", " play", " home"]
TABLE = {
    "\n": {"I saw the": 0.6, "we went": 0.4},
    "I saw the": {" day": 0.5, " way": 0.3, " play": 0.2},
    "we went": {" home": 1.0},
    " day": {"\n": 1.0}, " home": {"\n": 1.0}, " play": {"\n": 1.0},
    " way": {"\n": 0.1, " la": 0.9},
    " la": {"\n": 1.0}, "<unk>": {"\n": 1.0},
}


class BigramModel(nn.Module):
    """p(next | last token) from a table of token texts; records every input it is given."""

    def __init__(self, tok: LineTokenizer, table: dict[str, dict[str, float]], block_size: int = 64):
        super().__init__()
        V = tok.vocab_size
        self.config = SimpleNamespace(vocab_size=V, block_size=block_size)
        logp = torch.full((V, V), -1e9)
        for a, row in table.items():
            for b, p in row.items():
                logp[tok.tokens.index(a), tok.tokens.index(b)] = math.log(p)
        self.table = nn.Parameter(logp, requires_grad=False)
        self.inputs: list[list[int]] = []

        self.modes: list[bool] = []  # self.training at each forward
        self.caches: list[int] = []  # the length of each KV cache set up (a prefix and what follows it)
        self.cleared = 0

    def setup_kv_cache(self, rows: int, length: int) -> None:
        # the real model's cache holds block_size positions: a call that asks for more overflows it
        assert length <= self.config.block_size, f"a cache of {length} positions past the block"
        self.caches.append(length)

    def clear_kv_cache(self) -> None:
        self.cleared += 1

    def forward(self, idx, input_pos=None, last_only=False):
        if input_pos is not None:  # the real model has no position past its block
            assert int(input_pos.max()) < self.config.block_size, f"position {int(input_pos.max())} past the block"
        self.inputs.extend(idx.tolist())
        self.modes.append(self.training)
        return self.table[idx]


def _setup(table=TABLE, tokens=TOKENS, block_size: int = 64):
    tok = LineTokenizer(tokens)
    return BigramModel(tok, table, block_size), tok


def _p(*path: str) -> float:
    """The probability of a path of tokens, each given the one before."""
    return math.prod(TABLE[a][b] for a, b in zip(path, path[1:]))


@pytest.mark.parametrize("endings, word", [(1, "way"), (2, "play"), (64, "play")])
def test_endings_are_ranked_by_their_first_token_then_kept_by_the_whole_line(endings, word):
    """Line 2 must rhyme with "day" but the sampler (top_k 1) only writes "I saw the day" again (its
    word is taken): the search cuts it to the stem "I saw the" and scores dictionary rhymes of "day"
    that the vocabulary spells. "way" has the likelier first token (0.3 against 0.2) but is rarely
    followed by a newline: scored alone (endings=1) it is kept; with "play" scored too, the whole
    line's probability picks "play"."""
    model, tok = _setup()
    poem = compose(model, tok, Form(rhyme="AA"), search=SearchConfig(candidates=4, budget=64, endings=endings),
                   top_k=1, seed=0)
    assert poem.lines == ["I saw the day", f"I saw the {word}"]
    first, second = poem.meta["lines"]
    assert first["how"] == "sampled" and first["candidates"] == 4
    assert first["log_prob"] == pytest.approx(math.log(_p("\n", "I saw the", " day", "\n")), abs=1e-4)
    assert second["how"] == "ending" and second["met"] and second["end_word"] == word
    # the words of the vocabulary that rhyme with "day" are "way" and "play": at most `endings` scored
    assert second["candidates"] == 4 + min(endings, 2)
    assert second["log_prob"] == pytest.approx(math.log(_p("\n", "I saw the", f" {word}", "\n")), abs=1e-4)
    assert poem.meta["candidates"] == 8 + min(endings, 2)
    assert poem.text == "I saw the day\nI saw the " + word + "\n"


def test_the_endings_stop_at_the_budget():
    """budget 5 with 4 sampled lines: one ending is scored (the likelier first token), no more."""
    model, tok = _setup()
    poem = compose(model, tok, Form(rhyme="AA"), search=SearchConfig(candidates=4, budget=5, endings=64),
                   top_k=1, seed=0)
    assert poem.lines == ["I saw the day", "I saw the way"]
    assert [m["candidates"] for m in poem.meta["lines"]] == [4, 5]


def test_a_line_without_a_rhyme_within_budget_is_kept_and_reported():
    """budget = candidates: no ending is scored; the sampled line that breaks the form is kept with
    what it breaks, and the summary names the line."""
    model, tok = _setup()
    poem = compose(model, tok, Form(rhyme="AA"), search=SearchConfig(candidates=4, budget=4), top_k=1, seed=0)
    assert poem.lines == ["I saw the day", "I saw the day"]
    m = poem.meta["lines"][1]
    assert m["violations"] == ["'day' is already a rhyme of group A"] and m["over_budget"] and not m["met"]
    assert poem.meta["over_budget_lines"] == [2] and not poem.meta["all_met"]
    assert summary(poem.meta) == ("form: 2 lines, rhyme AA; budget spent on line(s) 2: line 2: 'day' is already "
                                  f"a rhyme of group A; 8 candidate lines in {poem.meta['seconds']:.1f} s")


@pytest.mark.parametrize("prompt", ["we went home\nI saw the", "I saw the", "we went home\nwe went home\nI saw the"])
def test_the_prompts_unfinished_line_starts_the_first_line(prompt):
    """The prompt's last line (after its last newline, if any) is line 1's beginning; the model
    sees the prompt and then the lines so far, each once."""
    model, tok = _setup()
    poem = compose(model, tok, Form(lines=3), prompt=prompt, search=SearchConfig(candidates=1, budget=1), top_k=1,
                   seed=0)
    # line 1 continues "I saw the" (its most probable end: " day"); lines 2 and 3 start afresh
    assert poem.lines == ["I saw the day"] * 3
    assert poem.text == prompt + " day\nI saw the day\nI saw the day\n"
    assert poem.meta["lines"][0]["log_prob"] == pytest.approx(math.log(0.5), abs=1e-4)  # " day" then "\n"
    prefixes = [prompt, prompt + " day\n", prompt + " day\nI saw the day\n"]
    assert [x for x in model.inputs if len(x) > 1] == [tok.encode(t) for t in prefixes if len(tok.encode(t)) > 1]


def test_a_prompt_the_vocabulary_cannot_spell_is_refused_before_the_model_runs():
    model, tok = _char_setup({"\n": {"t": 1.0}}, "\n theDay")
    with pytest.raises(GPTSmallError, match="^character 'o' \\(U\\+006F\\) is not in the char vocabulary of this model$"):
        compose(model, tok, Form(lines=1), prompt="the Dog", search=SearchConfig(candidates=1, budget=1))
    assert model.inputs == []


@pytest.mark.parametrize("settings, name", [(dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"),
                                            (dict(temperature=-0.5), "temperature")])
def test_bad_sampling_settings_are_refused_before_the_model_runs(settings, name):
    model, tok = _setup()
    with pytest.raises(GPTSmallError, match=name):
        compose(model, tok, Form(lines=1), search=SearchConfig(candidates=1, budget=1), **settings)
    assert model.inputs == []


def test_unk_is_never_sampled_but_keeps_its_mass_in_the_lines_probability():
    """After a newline the model gives <unk> 0.9: no line holds it, and each line's log-probability
    is the model's (0.1 for "I saw the", then 1 for " day" and the newline)."""
    table = {**TABLE, "\n": {"<unk>": 0.9, "I saw the": 0.1}, "I saw the": {" day": 1.0}}
    model, tok = _setup(table)
    poem = compose(model, tok, Form(lines=4), search=SearchConfig(candidates=4, budget=4), temperature=1.0, seed=0)
    assert poem.lines == ["I saw the day"] * 4
    assert all(m["log_prob"] == pytest.approx(math.log(0.1), abs=1e-4) for m in poem.meta["lines"])


def test_calls_given_run_the_poem_with_the_mask_settings_and_bans_compose_hands_them():
    """`calls(newline, sampling, banned)` makes the object that runs the model (the server's rows):
    it gets the newline tokens, the sampling settings and <unk> to ban; the model is left alone
    (its mode, its cache), and the poem is the one compose writes itself."""
    from gpt_small.form_calls import ModelCalls

    model, tok = _setup()
    seen = []

    def calls(newline, sampling, banned):
        seen.append((newline.tolist(), sampling, banned))
        return ModelCalls(model, newline, None, sampling, banned, 128)

    model.train()
    form, search = Form(rhyme="AA"), SearchConfig(candidates=4, budget=64)
    poem = compose(model, tok, form, search=search, temperature=0.7, top_k=1, top_p=0.9, calls=calls)
    assert seen == [([t == "\n" for t in tok.tokens], dict(temperature=0.7, top_k=1, top_p=0.9), [tok.unk_id])]
    assert model.training and model.cleared == 0
    own = compose(model, tok, form, search=search, temperature=0.7, top_k=1, top_p=0.9)
    assert poem.lines == own.lines == ["I saw the day", "I saw the play"]


def test_without_a_seed_a_poem_is_still_drawn():
    model, tok = _setup()
    poem = compose(model, tok, Form(lines=6), search=SearchConfig(candidates=1, budget=1), temperature=1.0)
    assert poem.meta["seed"] is None
    assert set(poem.lines) <= {"I saw the day", "I saw the way la", "I saw the way", "I saw the play", "we went home"}


def test_lines_of_no_rhyme_group_give_no_group_word():
    """In ABCB, lines 1 and 3 rhyme with nothing: their "day" neither opens a group nor is taken,
    so line 2 may open B with "day" and line 4 rhymes with it."""
    model, tok = _setup()
    poem = compose(model, tok, Form(rhyme="ABCB"), search=SearchConfig(candidates=4, budget=64), top_k=1, seed=0)
    assert [m["rhyme"] for m in poem.meta["lines"]] == [None, "B", None, "B"]
    assert poem.lines == ["I saw the day"] * 3 + ["I saw the play"]
    assert poem.meta["all_met"] and [m["how"] for m in poem.meta["lines"]] == ["sampled"] * 3 + ["ending"]


def test_a_groups_word_comes_from_its_first_line_that_meets_the_form():
    """Both lines miss their 6 syllables (budget 1, no endings): line 1's "day" does not become
    group A's word, so line 2 breaks the syllables only, not the rhyme."""
    model, tok = _setup()
    poem = compose(model, tok, Form(rhyme="AA", syllables=6, tolerance=0), search=SearchConfig(candidates=1, budget=1),
                   top_k=1, seed=0)
    assert [m["violations"] for m in poem.meta["lines"]] == [["4 syllables, not 6+-0"]] * 2


def test_stanzas_are_blank_lines_in_the_text_only():
    """The model sees the poem's lines one newline apart, never the blank line between stanzas."""
    model, tok = _setup()
    poem = compose(model, tok, Form(lines=3, stanzas=2), search=SearchConfig(candidates=2, budget=2), top_k=1,
                   seed=0)
    assert poem.text == "I saw the day\nI saw the day\n\nI saw the day\n"
    assert [m["stanza"] for m in poem.meta["lines"]] == [1, 1, 2]
    nl = tok.tokens.index("\n")
    assert not any(a == b == nl for x in model.inputs for a, b in zip(x, x[1:]))


@pytest.mark.parametrize("keep, context", [(None, 32), (10, 10), ("slide", 32), (1, 1), (0, 1)])
def test_past_the_block_the_context_is_the_last_keep_tokens_leaving_room_for_a_line(keep, context):
    """block 64, a line of at most 32 tokens (half the block): while the poem and a line fit, the
    whole poem is the context; past that, its last `keep` tokens, never more than 64 - 32 and never
    fewer than one (keep 0 still leaves the token the line follows)."""
    model, tok = _setup()
    lines = 14  # 3 tokens a line: "\n" and 11 lines (34 tokens) leave no room for a line of 32
    compose(model, tok, Form(lines=lines), search=SearchConfig(candidates=1, budget=1), top_k=1, seed=0, keep=keep)
    prefixes = [n - 32 for n in model.caches]  # each line's cache: its prefix and 32 tokens
    assert prefixes[:11] == [1 + 3 * k for k in range(11)]  # "\n" and the lines so far
    assert prefixes[11:] == [context] * (lines - 11)
    assert max(len(x) for x in model.inputs) <= 64 - 32


def test_the_whole_poem_is_context_while_it_and_a_line_fill_the_block_exactly():
    """A prompt of 2 tokens and lines of 3: line 11 follows 32 tokens, and 32 + a line of 32 is the
    block exactly, so it sees them all; line 12 (35 + 32) sees the last `keep` (10)."""
    model, tok = _setup()
    compose(model, tok, Form(lines=12), prompt="we went\n", search=SearchConfig(candidates=1, budget=1), top_k=1,
            seed=0, keep=10)
    assert [n - 32 for n in model.caches] == [2 + 3 * k for k in range(11)] + [10]


@pytest.mark.parametrize("max_line, met", [(4, True), (3, False)])
def test_a_sampled_line_is_cut_at_max_line_tokens(max_line, met):
    """The only line the model writes is "I saw the way la" and its newline: 4 tokens."""
    model, tok = _setup({**TABLE, "\n": {"I saw the": 1.0}, "I saw the": {" way": 1.0}, " way": {" la": 1.0}})
    poem = compose(model, tok, Form(lines=1), search=SearchConfig(candidates=2, budget=2, max_line_tokens=max_line),
                   seed=0)
    assert poem.lines == ["I saw the way la"]
    assert poem.meta["lines"][0]["violations"] == ([] if met else [f"no newline within {max_line} tokens"])


def test_metadata_records_the_form_the_search_and_the_settings():
    model, tok = _setup()
    search = SearchConfig(candidates=2, budget=2)
    poem = compose(model, tok, Form(rhyme="ABAB", syllables=4, tolerance=2), search=search, seed=11,
                   temperature=0.7, top_k=1)
    meta = poem.meta
    assert meta["form"] == {"lines": None, "stanzas": None, "syllables": 4, "tolerance": 2, "rhyme": "ABAB",
                            "plan": ["ABAB"]}
    assert meta["search"] == {"candidates": 2, "budget": 2, "endings": 64, "stems": 4, "min_rhymes": 3,
                              "max_line_tokens": None, "batch_rows": 128}
    assert meta["seed"] == 11 and meta["temperature"] == 0.7
    assert [m["line"] for m in meta["lines"]] == [1, 2, 3, 4]
    assert [m["rhyme"] for m in meta["lines"]] == list("ABAB")
    assert meta["lines"][0]["syllables"] == 4 and meta["lines"][0]["text"] == "I saw the day"
    assert summary(meta).startswith("form: 4 lines, rhyme ABAB, 4+-2 syllables; ")
    plain = compose(model, tok, Form(lines=1), search=search, seed=0, top_k=1).meta
    assert plain["form"]["plan"] == ["x"] and plain["all_met"]
    assert summary(plain) == f"form: 1 lines; every line meets the form; 2 candidate lines in {plain['seconds']:.1f} s"


def test_a_tokenizer_without_a_newline_is_refused():
    tok = LineTokenizer(TOKENS)
    tok.tokens[0] = "|"  # no token holds a newline
    model = BigramModel(LineTokenizer(TOKENS), TABLE)
    with pytest.raises(GPTSmallError, match="^the tokenizer has no token holding a newline, so the model "
                                            "cannot end a line$"):
        compose(model, tok, Form(lines=1), search=SearchConfig(candidates=1, budget=1))


@pytest.mark.parametrize("field, last, limit_name", [
    ("candidates", "MAX_CANDIDATES", "search candidates"), ("budget", "MAX_FORM_BUDGET", "search budget"),
    ("endings", "MAX_CANDIDATES", "search endings"), ("stems", "MAX_CANDIDATES", "search stems"),
    ("batch_rows", "MAX_CANDIDATES", "search batch_rows"),
])
def test_search_settings_at_their_edges(field, last, limit_name):
    top = getattr(limits, last)
    SearchConfig(**{field: 1})
    SearchConfig(**{field: top})
    for bad in (0, top + 1):
        with pytest.raises(GPTSmallError, match=f"^{limit_name} must be an integer >= 1 and <= {top:,}, got {bad}$"):
            SearchConfig(**{field: bad})


def test_max_line_tokens_at_its_edge():
    SearchConfig(max_line_tokens=2)
    with pytest.raises(GPTSmallError, match="^max_line_tokens must be >= 2, got 1$"):
        SearchConfig(max_line_tokens=1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(lines=1, tolerance=-1), f"^syllable tolerance must be an integer >= 0 and <= {limits.MAX_SYLLABLES}, got -1$"),
    (dict(rhyme="  "), "^rhyme must name a scheme \\(ABAB, AABB, sonnet, ...\\), got an empty text$"),
    (dict(lines=1, stanzas=0), f"^stanzas must be an integer >= 1 and <= {limits.MAX_STANZAS:,}, got 0$"),
    (dict(lines=1, syllables=0), f"^syllables must be an integer >= 1 and <= {limits.MAX_SYLLABLES}, got 0$"),
    (dict(lines=0), f"^lines must be an integer >= 1 and <= {limits.MAX_LINES:,}, got 0$"),
    (dict(syllables=3), "^a form needs --lines or --rhyme$"),
])
def test_form_fields_refused(kwargs, message):
    with pytest.raises(GPTSmallError, match=message):
        Form(**kwargs)


def test_stanzas_share_the_lines_the_first_ones_longer_and_each_needs_one():
    assert Form(lines=7, stanzas=3).plan() == [[None] * 3, [None] * 2, [None] * 2]
    assert Form(lines=3, stanzas=3).plan() == [[None]] * 3  # one line a stanza: the edge
    assert Form(rhyme="AB AB", stanzas=4).plan() == [["A"], ["B"], ["A"], ["B"]]
    with pytest.raises(GPTSmallError, match="^--stanzas 5 is more than the poem's 4 lines$"):
        Form(rhyme="AB AB", stanzas=5).plan()


def test_a_letter_used_once_rhymes_with_nothing_whatever_the_letter():
    assert Form(rhyme="ABCDEFGHIJKLM NOPQRSTUVWXYZ").plan() == [[None] * 13, [None] * 13]
    assert Form(rhyme="ABCDEFGHIJKLMNOPQRSTUVW XYZY").plan() == [[None] * 23, [None, "Y", None, "Y"]]


def test_form_fields_at_their_edges():
    Form(lines=1, tolerance=0)
    Form(lines=limits.MAX_LINES, stanzas=limits.MAX_STANZAS, syllables=limits.MAX_SYLLABLES,
         tolerance=limits.MAX_SYLLABLES)
    for kw in (dict(lines=limits.MAX_LINES + 1), dict(lines=1, stanzas=limits.MAX_STANZAS + 1),
               dict(lines=1, syllables=limits.MAX_SYLLABLES + 1), dict(lines=1, tolerance=limits.MAX_SYLLABLES + 1)):
        with pytest.raises(GPTSmallError):
            Form(**kw)


def test_sampled_lines_are_scored_by_the_models_own_distribution_whatever_samples_them():
    """<unk> is banned from the sampled lines but keeps its mass in their log-probability, which is
    the model's at temperature 1 whatever the sampling temperature (form_calls.sample_lines)."""
    from gpt_small.form_calls import sample_lines

    table = {**TABLE, "\n": {"<unk>": 0.5, "I saw the": 0.3, "we went": 0.2}}
    model, tok = _setup(table)
    newline = torch.tensor([t == "\n" for t in tok.tokens])
    prefix = torch.tensor(tok.encode("\n"))
    expected = {("I saw the", " day", "\n"): 0.3 * 0.5, ("I saw the", " way", "\n"): 0.3 * 0.3 * 0.1,
                ("I saw the", " way", " la", "\n"): 0.3 * 0.3 * 0.9, ("I saw the", " play", "\n"): 0.3 * 0.2,
                ("we went", " home", "\n"): 0.2}
    g = torch.Generator().manual_seed(0)
    seen = set()
    for temperature in (1.0, 0.5):
        for ids, lp, ended in sample_lines(model, prefix, 100, 4, newline, g,
                                           dict(temperature=temperature, top_k=None, top_p=None), [tok.unk_id]):
            line = tuple(tok.tokens[i] for i in ids)
            assert ended and line in expected, line
            assert lp == pytest.approx(math.log(expected[line]), abs=1e-5)
            seen.add(line)
    assert len(seen) >= 3  # several lines, each scored as the table says


def test_the_model_runs_in_eval_mode_and_is_left_as_it_was():
    model, tok = _setup()
    model.train()
    compose(model, tok, Form(lines=2), search=SearchConfig(candidates=2, budget=2), seed=0)
    assert model.modes and not any(model.modes) and model.training and model.cleared == 1
    model.eval()
    compose(model, tok, Form(lines=1), search=SearchConfig(candidates=2, budget=2), seed=0)
    assert not model.training and model.cleared == 2


def test_a_seed_gives_the_same_poem_and_another_seed_another():
    """At temperature 1 the two openings are drawn 0.6 / 0.4: one candidate a line, eight lines."""
    def poem(seed):
        model, tok = _setup()
        return compose(model, tok, Form(lines=8), search=SearchConfig(candidates=1, budget=1), seed=seed)

    a, b = poem(1), poem(1)
    assert a.text == b.text and a.meta["lines"] == b.meta["lines"] and a.meta["seed"] == 1
    assert {poem(s).text for s in range(2, 6)} != {a.text}


def test_ending_words_of_a_group_rhyme_with_its_word_unused_and_fit_the_syllables():
    from gpt_small import verse
    from gpt_small.forms import _Judge

    judge = _Judge(Form(rhyme="AA", syllables=4, tolerance=0), SearchConfig(), "A", {"A": "day"},
                   {"A": {"day", "way"}})
    words = judge.ending_words("I saw the")  # 3 syllables: the ending must have exactly 1
    assert "play" in words and "day" not in words and "way" not in words and "away" not in words
    assert all(verse.rhymes(w, "day", dictionary_only=True) for w in words)
    assert all(verse.syllable_range(w)[0] <= 1 <= verse.syllable_range(w)[1] for w in words)
    assert words == sorted(words, key=lambda w: (len(w), w))  # shortest first (no frequencies)
    loose = _Judge(Form(rhyme="AA"), SearchConfig(), "A", {"A": "day"}, {"A": {"day"}})
    assert "away" in loose.ending_words("I saw the")


def test_a_new_groups_endings_have_enough_rhymes_and_rhyme_with_no_other_group():
    from gpt_small import verse
    from gpt_small.forms import MAX_POOL, _Judge, _rhymable_words

    opener = _Judge(Form(rhyme="ABAB"), SearchConfig(min_rhymes=4), "B", {"A": "day"}, {"A": {"day"}})
    words = opener.ending_words("I saw the")
    assert len(words) == MAX_POOL and words == sorted(words, key=lambda w: (len(w), w))  # the shortest
    assert "bee" in words and "day" not in words and "bay" not in words  # "bay" rhymes with group A's "day"
    assert all(len(verse.rhyming_words(w)) >= 4 for w in words[::50])
    word = "window"  # four rhyming dictionary words: a new group's word at min_rhymes 4, not at 5
    assert word in {w for w, _, _ in _rhymable_words(4)} and word not in {w for w, _, _ in _rhymable_words(5)}


def test_the_summary_lists_every_line_over_budget_with_what_it_breaks():
    meta = {"form": {"rhyme": None, "syllables": None, "plan": ["xxx"]}, "all_met": False,
            "over_budget_lines": [1, 3], "candidates": 1234, "seconds": 2.25,
            "lines": [{"line": 1, "over_budget": True, "violations": ["9 syllables, not 7+-0", "no words"]},
                      {"line": 2, "over_budget": False, "violations": []},
                      {"line": 3, "over_budget": True, "violations": ["'glorp' is not in the dictionary"]}]}
    assert summary(meta) == ("form: 3 lines; budget spent on line(s) 1, 3: line 1: 9 syllables, not 7+-0, no words; "
                             "line 3: 'glorp' is not in the dictionary; 1,234 candidate lines in 2.2 s")


def _char_setup(table: dict[str, dict[str, float]], chars: str, block_size: int = 64):
    """A bigram model over a real char tokenizer (the built-in corpus's kind): one token a character."""
    from gpt_small.tokenizer import CharTokenizer

    tok = CharTokenizer(sorted(set(chars)))
    tok.tokens = [tok.decode([i]) for i in range(tok.vocab_size)]  # the table's names of the ids
    return BigramModel(tok, table, block_size), tok


def _line_two(model, tok, endings: int):
    """Line 1 is the model's most probable line; line 2 must rhyme with its word but the sampler
    writes the same line again, so line 2 comes from the endings search."""
    return compose(model, tok, Form(rhyme="AA"), search=SearchConfig(candidates=2, budget=64, endings=endings),
                   top_k=1, seed=0)


@pytest.mark.parametrize("case, tokens, row, word", [
    # whole-word tokens: the likelier first token wins over the shorter word
    ("likelier", TOKENS, {" day": 0.5, " play": 0.3, " way": 0.2}, "play"),
    # the same first-token probability: the shorter word, then the alphabetically first (" bay"
    # has the larger id)
    ("tie", [*TOKENS, " bay"], {" day": 0.4, " way": 0.2, " play": 0.2, " bay": 0.2}, "bay"),
    # "a" begins "away": the two part at the token after " a" (a newline against "way")
    ("prefix", ["I saw the", " day", " a", "way"], {" day": 0.6, " a": 0.4}, "away"),
])
def test_the_ending_scored_first_is_the_one_whose_first_own_token_is_likeliest(case, tokens, row, word):
    """endings=1: only the best-ranked word is scored, so the line shows the ranking."""
    table = {"\n": {"I saw the": 1.0}, "I saw the": row, " a": {"way": 0.9, "\n": 0.1},
             **{t: {"\n": 1.0} for t in (" day", " way", " play", " bay", "way")}}
    model, tok = _setup({k: v for k, v in table.items() if k in ("\n", *tokens)}, tokens)
    poem = _line_two(model, tok, endings=1)
    assert poem.lines == ["I saw the day", f"I saw the {word}"]
    m = poem.meta["lines"][1]
    assert m["how"] == "ending" and m["met"] and m["candidates"] == 2 + 1
    p = row[" a"] * table[" a"]["way"] if case == "prefix" else row[f" {word}"]
    assert m["log_prob"] == pytest.approx(math.log(p), abs=1e-4)


def test_with_a_char_tokenizer_the_endings_are_ranked_past_their_shared_space():
    """Every ending starts with the space token; the ranking reads the letter after it. Line 1 is
    "the Day" (a capital D, so no dictionary word spells from it); after the space, "h" is likelier
    than "a", and among h-words "hay" and "hey" are the shortest ("hay" first)."""
    table = {"\n": {"t": 1.0}, "t": {"h": 1.0}, "h": {"e": 0.6, "a": 0.4}, "e": {" ": 1.0},
             " ": {"D": 0.5, "h": 0.3, "a": 0.2}, "D": {"a": 1.0}, "a": {"y": 1.0}, "y": {"\n": 1.0}}
    model, tok = _char_setup(table, "\n theDay")
    poem = _line_two(model, tok, endings=1)
    assert poem.lines == ["the Day", "the hay"]
    m = poem.meta["lines"][1]
    assert m["how"] == "ending" and m["met"]
    assert m["log_prob"] == pytest.approx(math.log(0.6 * 0.3 * 0.4), abs=1e-4)  # "the", " h", "a"; the rest 1


@pytest.mark.parametrize("block, scored", [(16, True), (15, False)])
def test_an_ending_is_scored_when_it_fits_the_block_to_its_last_position(block, scored):
    """Line 1 is "I saw the" + five one-token words + " day" (8 tokens with its newline; a line may
    have block // 2). Line 2 repeats it; the only rhyme the vocabulary spells, "francais", takes 9
    tokens after the 6 of the stem: at block 16 one token of the poem before it is left as context
    (16 = 1 + 6 + 9) and it is scored. At block 15 a line has 7 tokens: line 1 is cut before its
    newline and the endings finish it (" day" and a newline: 2 tokens fit); line 2's rhyme would
    leave no token of context (15 = 0 + 6 + 9), so nothing is scored. Nothing ever runs past the
    block (the model refuses a position past it)."""
    fillers = [" old", " sun", " cold", " wet", " sea"]
    tokens = ["I saw the", *fillers, " day", " f", "r", "a", "n", "c", "i", "s"]
    table = {"\n": {"I saw the": 1.0}, "I saw the": {" old": 1.0}, " sea": {" day": 0.9, " f": 0.1},
             **{a: {b: 1.0} for a, b in zip(fillers, fillers[1:])}, " day": {"\n": 1.0},
             " f": {"r": 1.0}, "r": {"a": 1.0}, "a": {"n": 0.5, "i": 0.5}, "n": {"c": 1.0}, "c": {"a": 1.0},
             "i": {"s": 1.0}, "s": {"\n": 1.0}}
    model, tok = _setup(table, tokens, block_size=block)
    poem = compose(model, tok, Form(rhyme="AA"), search=SearchConfig(candidates=1, budget=4), top_k=1, seed=0)
    line = "I saw the old sun cold wet sea"
    if scored:
        assert poem.lines == [f"{line} day", f"{line} francais"]
        m = poem.meta["lines"][1]
        assert m["how"] == "ending" and m["met"] and m["candidates"] == 2
        assert m["log_prob"] == pytest.approx(math.log(0.1 * 0.5 * 0.5), abs=1e-4)
    else:
        assert poem.lines == [f"{line} day"] * 2
        first, second = poem.meta["lines"]
        assert first["how"] == "ending" and first["met"] and first["log_prob"] == pytest.approx(math.log(0.9), abs=1e-4)
        assert second["how"] == "sampled" and second["candidates"] == 4 and poem.meta["over_budget_lines"] == [2]
        assert second["violations"] == ["'day' is already a rhyme of group A", "no newline within 7 tokens"]


def test_no_ending_is_scored_when_the_vocabulary_spells_no_rhyme():
    """The vocabulary spells no rhyme of "day" but "day", which is taken: the budget goes on
    sampled lines and the line is kept over budget with what it breaks."""
    tokens = ["I saw the", " day"]
    table = {"\n": {"I saw the": 1.0}, "I saw the": {" day": 1.0}, " day": {"\n": 1.0}}
    model, tok = _setup(table, tokens)
    poem = compose(model, tok, Form(rhyme="AA"), search=SearchConfig(candidates=2, budget=6), top_k=1, seed=0)
    assert poem.lines == ["I saw the day"] * 2
    m = poem.meta["lines"][1]
    assert m["how"] == "sampled" and m["candidates"] == 6 and m["over_budget"]
    assert m["violations"] == ["'day' is already a rhyme of group A"]


def test_a_stem_that_ends_inside_a_token_is_scored_with_the_unknown_piece_as_unk():
    """The token " the day" holds two words: the stem "I saw the" cuts it, so " the" has no token
    (four <unk>s, each scored as the model gives it) and the tokenizer's own default would refuse it."""
    tokens = ["I saw", " the day", " way"]
    table = {"\n": {"I saw": 1.0}, "I saw": {" the day": 0.9, "<unk>": 0.1}, " the day": {"\n": 1.0},
             "<unk>": {"<unk>": 0.5, " way": 0.5}, " way": {"\n": 1.0}}
    model, tok = _setup(table, tokens)
    poem = _line_two(model, tok, endings=64)
    assert poem.lines == ["I saw the day", "I saw the way"]
    m = poem.meta["lines"][1]
    assert m["how"] == "ending" and m["met"]
    assert m["log_prob"] == pytest.approx(math.log(0.1 * 0.5 ** 3 * 0.5), abs=1e-4)


def test_a_byte_level_tokenizer_without_an_unknown_token_gets_its_rhyme_from_the_endings():
    """A byte-level BPE spells every word and has no <unk>: every rhyme of "day" is a candidate
    ending, and the most probable line among the best-ranked is kept."""
    from gpt_small.tokenizer import train_bpe

    tok = train_bpe(["I saw the day\nI saw the way\n"] * 20, vocab_size=300)
    tok.tokens = [tok.decode([i]) for i in range(tok.vocab_size)]
    assert not hasattr(tok, "unk_id")
    assert [tok.tokens[i] for i in tok.encode("I saw the way\n")] == ["I", " saw", " the", " way", "\n"]
    table = {"\n": {"I": 1.0}, "I": {" saw": 1.0}, " saw": {" the": 1.0}, " the": {" day": 0.6, " way": 0.4},
             " day": {"\n": 1.0}, " way": {"\n": 1.0}}
    model = BigramModel(tok, table)
    poem = _line_two(model, tok, endings=8)
    assert poem.lines == ["I saw the day", "I saw the way"]
    m = poem.meta["lines"][1]
    assert m["how"] == "ending" and m["met"] and m["candidates"] == 2 + 8
    assert m["log_prob"] == pytest.approx(math.log(0.4), abs=1e-4)


def test_the_prompts_unfinished_line_may_be_the_whole_stem():
    """Line 1 continues the prompt's "I saw the" with " day": 4 syllables, not 5. Its stem is the
    prompt's line itself, and the endings (two-syllable words, whole tokens: " away" likelier than
    " today") complete it; line 2 gets the other."""
    tokens = [*TOKENS, " away", " today"]
    table = {**TABLE, "I saw the": {" day": 0.5, " away": 0.3, " today": 0.2}, " away": {"\n": 1.0},
             " today": {"\n": 1.0}}
    model, tok = _setup(table, tokens)
    poem = compose(model, tok, Form(rhyme="AA", syllables=5, tolerance=0), prompt="we went home\nI saw the",
                   search=SearchConfig(candidates=2, budget=64), top_k=1, seed=0)
    assert poem.text == "we went home\nI saw the away\nI saw the today\n"
    first, second = poem.meta["lines"]
    assert first["how"] == "ending" and first["met"] and first["log_prob"] == pytest.approx(math.log(0.3), abs=1e-4)
    assert second["how"] == "ending" and second["met"]
    assert second["log_prob"] == pytest.approx(math.log(0.6 * 0.2), abs=1e-4)  # this line opens with "I saw the"


def test_a_line_that_need_not_rhyme_spends_its_budget_on_sampled_lines():
    """The endings are for lines that must rhyme: a free line that misses its syllables gets
    round after round of sampled lines (4, then the 2 the budget leaves), never an ending, though
    " away" would give the 5 syllables."""
    tokens = [*TOKENS, " away"]
    table = {**TABLE, "\n": {"I saw the": 1.0}, " away": {"\n": 1.0}}
    model, tok = _setup(table, tokens)
    poem = compose(model, tok, Form(lines=1, syllables=5, tolerance=0),
                   search=SearchConfig(candidates=4, budget=6), top_k=1, seed=0)
    m = poem.meta["lines"][0]
    assert poem.lines == ["I saw the day"] and m["how"] == "sampled" and m["candidates"] == 6
    assert m["violations"] == ["4 syllables, not 5+-0"] and poem.meta["over_budget_lines"] == [1]


# the second line must rhyme with "home"; top_p 0.9 never samples " roam" (0.02), which only the
# endings search writes
_STEM_TABLE = {"\n": {"we went": 0.6, "they go": 0.4}, "we went": {" home": 0.98, " roam": 0.02},
               "they go": {" home": 0.98, " roam": 0.02}, " home": {"\n": 1.0}, " roam": {"\n": 1.0},
               "I saw the": {" la": 1.0}, " la": {" la": 1.0}}
_STEM_TOKENS = ["we went", "they go", " home", " roam", "I saw the"]


@pytest.mark.parametrize("opening", [
    {"we went": 0.6, "they go": 0.4},  # the other stem is less probable
    {"I saw the": 0.6, "we went": 0.4},  # the other line is more probable but never ends (" la" for ever)
])
def test_the_stem_tried_first_is_the_most_probable_finished_lines(opening):
    """stems=1: of the sampled lines that miss the rhyme, the stem tried is the most probable
    finished line's; a line cut at max_line_tokens (3) only after every finished one."""
    model, tok = _setup({**_STEM_TABLE, "\n": opening}, _STEM_TOKENS)
    poem = compose(model, tok, Form(rhyme="AA"),
                   search=SearchConfig(candidates=16, budget=64, stems=1, endings=1, max_line_tokens=3),
                   top_p=0.9, seed=0)
    assert poem.lines == ["we went home", "we went roam"]
    m = poem.meta["lines"][1]
    assert m["how"] == "ending" and m["met"] and m["candidates"] == 16 + 1
    assert m["log_prob"] == pytest.approx(math.log(0.4 * 0.02 if "I saw the" in opening else 0.6 * 0.02), abs=1e-4)


@pytest.mark.parametrize("budget", [17, 18])
def test_the_stems_share_the_budget_and_none_is_tried_past_it(budget):
    """stems=2, one ending each, 16 sampled lines: at budget 17 only the first stem ("we went", the
    likelier) is scored and the model never sees the second; at 18 both are, and the likelier line
    is kept."""
    model, tok = _setup(_STEM_TABLE, _STEM_TOKENS)
    poem = compose(model, tok, Form(rhyme="AA"), search=SearchConfig(candidates=16, budget=budget, stems=2, endings=1),
                   top_p=0.9, seed=0)
    assert poem.lines == ["we went home", "we went roam"]
    m = poem.meta["lines"][1]
    assert m["how"] == "ending" and m["met"] and m["candidates"] == budget
    they_go, roam = tok.tokens.index("they go"), tok.tokens.index(" roam")
    second = [x for x in model.inputs if any(a == they_go and b == roam for a, b in zip(x, x[1:]))]
    assert bool(second) == (budget == 18)


def test_a_line_ends_at_the_first_newline_inside_its_last_token():
    """A token may hold text, a newline and more (a byte-level BPE's ".\\n\\n"): the line is its
    text up to the first newline; the model sees the poem's lines one newline apart."""
    tokens = ["I saw the", " day.", " day.\n\n"]
    table = {"\n": {"I saw the": 1.0}, "I saw the": {" day.\n\n": 1.0}, " day.": {"\n": 1.0}}
    model, tok = _setup(table, tokens)
    poem = compose(model, tok, Form(lines=2), search=SearchConfig(candidates=1, budget=1), top_k=1, seed=0)
    assert poem.lines == ["I saw the day."] * 2 and poem.text == "I saw the day.\nI saw the day.\n"
    assert all(m["met"] for m in poem.meta["lines"])


def test_stanzas_take_the_lines_in_order_and_the_plan_shows_them():
    """Three lines in turn (the model's next line depends on how the last one ended), six lines in
    three stanzas: each stanza has the next two."""
    tokens = ["I saw the", " day\n", "we went", " home\n", "they go", " far\n"]
    table = {"\n": {"I saw the": 1.0}, "I saw the": {" day\n": 1.0}, " day\n": {"we went": 1.0},
             "we went": {" home\n": 1.0}, " home\n": {"they go": 1.0}, "they go": {" far\n": 1.0},
             " far\n": {"I saw the": 1.0}}
    model, tok = _setup(table, tokens)
    heard = []
    poem = compose(model, tok, Form(lines=6, stanzas=3), search=SearchConfig(candidates=1, budget=1), top_k=1,
                   seed=0, on_line=heard.append)
    a, b, c = "I saw the day", "we went home", "they go far"
    assert poem.lines == [a, b, c, a, b, c]
    assert poem.text == f"{a}\n{b}\n\n{c}\n{a}\n\n{b}\n{c}\n"
    assert poem.meta["form"]["plan"] == ["xx xx xx"]
    assert heard == poem.meta["lines"]  # each line's metadata, heard as it is chosen


def test_metadata_numbers_as_written():
    """A line's syllables are a number, or [fewest, most] when a word's count is not certain
    ("fire": 1 or 2); its log-probability is rounded to 4 decimals; the poem's seconds to 3, a
    float within the call's own time."""
    import time

    tokens = [*TOKENS, " fire"]
    table = {**TABLE, "\n": {"I saw the": 1.0}, "I saw the": {" fire": 0.7, " day": 0.3}, " fire": {"\n": 1.0}}
    model, tok = _setup(table, tokens)
    t0 = time.perf_counter()
    poem = compose(model, tok, Form(lines=1), search=SearchConfig(candidates=1, budget=1), top_k=1, seed=0)
    elapsed = time.perf_counter() - t0
    m = poem.meta["lines"][0]
    assert poem.lines == ["I saw the fire"] and m["syllables"] == [4, 5]
    assert m["log_prob"] == round(math.log(0.7), 4)
    seconds = poem.meta["seconds"]
    assert isinstance(seconds, float) and 0 <= seconds <= elapsed + 5e-4 and seconds == round(seconds, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_line_log_probabilities_are_summed_in_double_precision(dtype):
    """sample_lines and score_continuations add the model's log-softmax of each token, taken in
    float32 whatever the model's dtype, in float64: exactly the Python sum of those numbers (a
    float32 sum is off by up to ~1e-7 of it; a bfloat16 log-softmax by ~1e-2)."""
    from gpt_small.form_calls import next_token_logprobs, sample_lines, score_continuations

    table = {**TABLE, "\n": {"I saw the": 0.7, "we went": 0.3}, "I saw the": {" way": 0.9, " day": 0.1},
             " way": {" la": 0.3, "\n": 0.7}}
    model, tok = _setup(table)
    model.to(dtype)
    lsm = torch.log_softmax(model.table.float(), dim=-1)  # the model's own numbers, in float32

    def exact(tokens):
        ids = [tok.tokens.index(t) for t in tokens]
        return sum(float(lsm[a, b]) for a, b in zip(ids, ids[1:]))

    prefix = torch.tensor(tok.encode("\n"))
    newline = torch.tensor([t == "\n" for t in tok.tokens])
    for ids, lp, ended in sample_lines(model, prefix, 8, 6, newline, torch.Generator().manual_seed(0),
                                       dict(temperature=1.0, top_k=None, top_p=None), [tok.unk_id]):
        assert lp == exact(["\n"] + [tok.tokens[i] for i in ids])
    lines = [["I saw the", " way", " la", "\n"], ["I saw the", " day", "\n"], ["we went", " home", "\n"]]
    scores = score_continuations(model, prefix, [[tok.tokens.index(t) for t in line] for line in lines], 2)
    assert scores == [exact(["\n", *line]) for line in lines]
    assert torch.equal(next_token_logprobs(model, torch.tensor(tok.encode("\nI saw the"))), lsm[tok.tokens.index("I saw the")])
