"""Verse forms: the plan of a form, the batched model calls against references, and real poems
from a tiny char model trained for a moment on pseudo-verse (the search must find the rhymes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gpt_small import verse
from gpt_small.checkpoint import save_checkpoint
from gpt_small.config import GPTConfig
from gpt_small.errors import GPTSmallError
from gpt_small.form_calls import _prefill_rows, next_token_logprobs, sample_lines, score_continuations
from gpt_small.forms import Form, SearchConfig, compose, summary
from gpt_small.generate import decode_one
from gpt_small.model import GPT
from gpt_small.tokenizer import CharTokenizer, train_bpe

from conftest import verse as verse_text


def _train(model: GPT, ids: torch.Tensor, steps: int, block: int = 64, batch: int = 16) -> GPT:
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - block - 1, (batch,), generator=g)
        x = torch.stack([ids[s:s + block] for s in starts])
        y = torch.stack([ids[s + 1:s + block + 1] for s in starts])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def poet():
    """A 2-layer char model trained for 150 steps (a few seconds) on 2,000 lines of pseudo-verse."""
    text = verse_text(2000, seed=1)
    tok = CharTokenizer.train(text)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=tok.vocab_size, block_size=128))
    return _train(model, torch.tensor(tok.encode(text)), steps=150), tok


def _pairs(plan: list[list[str | None]]) -> list[tuple[int, int]]:
    """(first line, later line) of every rhyme the plan asks for."""
    letters = [c for st in plan for c in st]
    first: dict[str, int] = {}
    out = []
    for i, c in enumerate(letters):
        if c is None:
            continue
        if c in first:
            out.append((first[c], i))
        else:
            first[c] = i
    return out


# ---------------------------------------------------------------- the form's plan

def test_plan_of_schemes():
    assert Form(rhyme="sonnet").plan() == [list("ABAB"), list("CDCD"), list("EFEF"), list("GG")]
    assert Form(rhyme="ABAB", lines=8).plan() == [list("ABAB"), list("CDCD")]
    assert Form(rhyme="AABB", lines=6).plan() == [list("AABB"), list("CC")]
    assert Form(rhyme="ABAB", stanzas=3).plan() == [list("ABAB"), list("CDCD"), list("EFEF")]
    assert Form(rhyme="sonnet", stanzas=1).plan() == [list("ABABCDCDEFEFGG")]
    assert Form(rhyme="ABCB").plan() == [[None, "B", None, "B"]]  # a letter used once rhymes with nothing
    assert Form(lines=5, stanzas=2).plan() == [[None] * 3, [None] * 2]


@pytest.mark.parametrize("kwargs, message", [
    (dict(rhyme="AB1B"), "characters other than letters A-Z: '1'"),
    (dict(rhyme="ABAD"), "letter D comes before C"),
    (dict(rhyme="ABAB CDCD", lines=6), "--lines 6 does not match"),
    (dict(lines=3, stanzas=4), "--stanzas 4 is more than the poem's 3 lines"),
    (dict(syllables=10), "needs --lines or --rhyme"),
    (dict(lines=0), "lines must be an integer >= 1"),
])
def test_bad_forms_are_refused(kwargs, message):
    with pytest.raises(GPTSmallError, match=message):
        Form(**kwargs).plan()


def test_prosody_from_the_dictionary():
    assert verse.rhymes("day", "away") and verse.rhymes("night", "light")
    assert not verse.rhymes("day", "night") and not verse.rhymes("day", "day")
    assert verse.syllable_range("fire") == (1, 2)
    assert verse.line_syllables("Shall I compare thee to a summer's day?") == 10
    # the documented spelling fallback for words the dictionary lacks
    assert not verse.in_dictionary("glorp") and verse.spelled_rhyme_key("glorp") == "~orp"
    assert verse.rhymes("glorp", "florp") and not verse.rhymes("glorp", "florp", dictionary_only=True)
    assert [verse.spelled_syllables(w) for w in ("flane", "gentle", "glimmerous", "the")] == [1, 2, 3, 1]


# ---------------------------------------------------------------- batched calls vs references

@pytest.fixture(scope="module")
def ngram_rope_model():
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("tiny", vocab_size=40, block_size=64, pos_encoding="rope", qk_norm=True,
                                ngram=3, ngram_buckets=64)
    return GPT(cfg).eval()


def test_shared_prefix_equals_a_prefix_per_row(ngram_rope_model):
    model = ngram_rope_model
    prefix = torch.randint(0, 40, (11,), generator=torch.Generator().manual_seed(1))
    nxt = torch.tensor([3, 17, 29])
    shapes = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: shapes.append(tuple(args[0].shape)),
                                           with_kwargs=True)
    try:
        _prefill_rows(model, prefix, 2, 20)
        shared = _prefill_rows(model, prefix, 3, 20)
    finally:
        hook.remove()
    assert shapes == [(1, 11)] * 2  # the prefix runs once, in one row; the cache copies it to the others
    after_shared = decode_one(model, nxt, torch.tensor([11]))
    model.setup_kv_cache(3, 20)
    from gpt_small.generate import prefill
    each = prefill(model, prefix[None].expand(3, -1).contiguous(), torch.arange(11))
    after_each = decode_one(model, nxt, torch.tensor([11]))
    model.clear_kv_cache()
    torch.testing.assert_close(shared, each)
    torch.testing.assert_close(after_shared, after_each)


@pytest.mark.parametrize("conts", [[[5], [1, 2, 3, 4], [7, 7, 30]],  # two forward groups of 2 rows at most
                                   [[5], [9], [11]]])  # one token each: no forward past the prefix
def test_scores_equal_an_uncached_forward(ngram_rope_model, conts):
    model = ngram_rope_model
    prefix = torch.randint(0, 40, (9,), generator=torch.Generator().manual_seed(2))
    got = score_continuations(model, prefix, conts, batch_rows=2)
    first = next_token_logprobs(model, prefix)
    model.clear_kv_cache()
    with torch.no_grad():
        torch.testing.assert_close(first, F.log_softmax(model(prefix[None]).float(), dim=-1)[0, -1],
                                   atol=1e-4, rtol=0)
    for cont, score in zip(conts, got):
        seq = torch.cat((prefix, torch.tensor(cont)))[None]
        with torch.no_grad():
            lp = F.log_softmax(model(seq).float(), dim=-1)[0]
        want = sum(float(lp[len(prefix) - 1 + j, t]) for j, t in enumerate(cont))
        assert score == pytest.approx(want, abs=1e-4)


def _greedy_line(model, prefix, max_tokens, newline, banned):
    """The reference: one full forward per token, the argmax less the banned ids, its log-probability
    from the model's own distribution."""
    seq, out, total = prefix.tolist(), [], 0.0
    for _ in range(max_tokens):
        with torch.no_grad():
            lp = F.log_softmax(model(torch.tensor(seq)[None]).float(), dim=-1)[0, -1]
        t = int(lp.masked_fill(torch.isin(torch.arange(len(lp)), torch.tensor(banned, dtype=torch.long)),
                               float("-inf")).argmax())
        out.append(t)
        seq.append(t)
        total += float(lp[t])
        if newline[t]:
            return out, total, True
    return out, total, False


@pytest.mark.parametrize("ends, ban_first", [(True, False), (True, True), (False, False)])
def test_sampled_lines_equal_greedy_decoding_by_an_uncached_forward(ngram_rope_model, ends, ban_first):
    """top_k 1 from a shared prefix in 3 rows: each row is the uncached greedy line, cut at the
    first newline token (here: the 4th token the model would write) or at max_tokens, with its
    log-probability; a banned id is never written but keeps its mass."""
    model = ngram_rope_model
    prefix = torch.randint(0, 40, (9,), generator=torch.Generator().manual_seed(4))
    free, _, _ = _greedy_line(model, prefix, 8, torch.zeros(40, dtype=torch.bool), [])
    banned = [free[0]] if ban_first else []
    line, _, _ = _greedy_line(model, prefix, 8, torch.zeros(40, dtype=torch.bool), banned)
    assert (line[0] != free[0]) == ban_first
    newline = torch.zeros(40, dtype=torch.bool)
    if ends:
        newline[line[3]] = True
    want = _greedy_line(model, prefix, 8, newline, banned)
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape)))
    try:
        got = sample_lines(model, prefix, 3, 8, newline, None, dict(temperature=1.0, top_k=1, top_p=None), banned)
    finally:
        hook.remove()
    model.clear_kv_cache()
    assert want[2] == ends and (len(want[0]) <= 4 if ends else len(want[0]) == 8)
    # the prefix once in one row, then one step for all rows per token but the last: none once all ended
    assert calls == [(1, 9)] + [(3, 1)] * (len(want[0]) - 1)
    for ids, lp, ended in got:
        assert ids == want[0] and ended == want[2] and lp == pytest.approx(want[1], abs=1e-4)


# ---------------------------------------------------------------- poems

def test_sonnet_rhymes_and_scans(poet):
    model, tok = poet
    form = Form(rhyme="ABAB CDCD EFEF GG", syllables=10, tolerance=1)
    poem = compose(model, tok, form, seed=0)
    assert len(poem.lines) == 14
    assert [len(s.splitlines()) for s in poem.text.strip("\n").split("\n\n")] == [4, 4, 4, 2]
    ends = [verse.last_word(line) for line in poem.lines]
    for i, j in _pairs(form.plan()):  # checked again here, with the dictionary
        assert verse.in_dictionary(ends[i]) and verse.in_dictionary(ends[j]), (ends[i], ends[j])
        assert verse.rhymes(ends[i], ends[j], dictionary_only=True), (i, j, ends[i], ends[j])
    for line in poem.lines:
        lo, hi = verse.line_syllable_range(line)
        assert lo <= 11 and hi >= 9, (line, lo, hi)
    assert poem.meta["all_met"] and not poem.meta["over_budget_lines"]
    assert all(m["candidates"] <= 512 for m in poem.meta["lines"])
    assert "every line meets the form" in summary(poem.meta)


def test_seeded_poems_repeat(poet):
    model, tok = poet
    form = Form(rhyme="AABB", syllables=8, tolerance=1)
    a = compose(model, tok, form, seed=7)
    b = compose(model, tok, form, seed=7)
    c = compose(model, tok, form, seed=8)
    assert a.text == b.text and a.meta["lines"] == b.meta["lines"]
    assert c.text != a.text


def test_spent_budget_is_reported_not_looped(poet):
    model, tok = poet
    search = SearchConfig(candidates=1, budget=1)
    poem = compose(model, tok, Form(rhyme="AABB", syllables=10, tolerance=0), search=search, seed=3)
    assert len(poem.lines) == 4
    assert all(m["candidates"] == 1 for m in poem.meta["lines"])
    over = poem.meta["over_budget_lines"]
    assert over and not poem.meta["all_met"]
    for m in poem.meta["lines"]:
        assert m["over_budget"] == (m["line"] in over) == bool(m["violations"])
    assert "budget spent on line(s)" in summary(poem.meta)


def test_prompt_starts_the_first_line(poet):
    model, tok = poet
    poem = compose(model, tok, Form(rhyme="AA"), prompt="Title\nThe night", seed=1)
    assert poem.text.startswith("Title\nThe night") and poem.lines[0].startswith("The night")
    assert verse.rhymes(*(verse.last_word(x) for x in poem.lines), dictionary_only=True)


@pytest.mark.parametrize("kind", ["bpe", "gpt2"])
def test_byte_level_tokenizers(kind):
    """An untrained model: the sampled lines are noise, and the endings search still finds rhymes."""
    from gpt_small.tokenizer import gpt2_tokenizer

    tok = train_bpe(verse_text(300), vocab_size=300) if kind == "bpe" else gpt2_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=tok.vocab_size, block_size=64)).eval()
    poem = compose(model, tok, Form(rhyme="AABB"), search=SearchConfig(candidates=4, endings=16), seed=0)
    ends = [verse.last_word(line) for line in poem.lines]
    assert poem.meta["all_met"], poem.meta["lines"]
    assert verse.rhymes(ends[0], ends[1], dictionary_only=True) and verse.rhymes(ends[2], ends[3], dictionary_only=True)


# ---------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def poet_checkpoint(poet, tmp_path_factory):
    model, tok = poet
    run = tmp_path_factory.mktemp("poet")
    save_checkpoint(run, step=150, model=model, tokenizer=tok, config={"model": model.config.to_dict()},
                    links=("last", "best"))
    return run


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt_small", *args], capture_output=True, text=True, timeout=300)


def test_cli_quatrain_with_metadata(poet_checkpoint, tmp_path):
    meta = tmp_path / "meta.json"
    r = _cli("generate", "--checkpoint", str(poet_checkpoint), "--rhyme", "ABAB", "--syllables", "8",
             "--seed", "2", "--form-meta", str(meta))
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip("\n").splitlines()) == 4
    assert r.stderr.startswith("form: 4 lines, rhyme ABAB, 8+-1 syllables;")
    m = json.loads(meta.read_text())
    assert [x["text"] for x in m["lines"]] == r.stdout.strip("\n").splitlines()


@pytest.mark.parametrize("scheme", ["AB1B", "ABZZ"])
def test_cli_refuses_an_unknown_scheme_in_one_line(poet_checkpoint, scheme):
    r = _cli("generate", "--checkpoint", str(poet_checkpoint), "--rhyme", scheme)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("gpt-small generate: error: rhyme scheme")
