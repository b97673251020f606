"""Verse forms through `/v1/poem`: the fields refused by name, a form met and reported line by line,
seeds, streaming, and the load check that form requests run as rows of the batch (a plain stream
beside them never waits as long as one form line takes)."""

from __future__ import annotations

import copy
import json
import logging
import re
import statistics
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")
from starlette.testclient import TestClient  # noqa: E402

from gpt_small import form_calls, verse  # noqa: E402
from gpt_small.serve import create_app  # noqa: E402
from gpt_small.limits import MAX_SYLLABLES  # noqa: E402
from gpt_small.forms import Form  # noqa: E402
from gpt_small.serve.forms import FORMS, MAX_FORM_LINES, Cancelled, EngineCalls, decode_form  # noqa: E402
from gpt_small.serve.engine import Engine, Sequence  # noqa: E402
from gpt_small.serve.protocol import ApiError, Sampling  # noqa: E402
from serve_util import live_server, make_checkpoint, make_model  # noqa: E402


@pytest.fixture(scope="module")
def client():
    model, tok = make_model()
    app = create_app(model=model, tokenizer=tok, model_name="tiny-poet", max_batch=16, max_new_tokens=300,
                     max_prompt_tokens=200)
    with TestClient(app) as c:
        yield c


@pytest.mark.parametrize("body,param", [
    ({"form": "haiku"}, "form"),
    ({"form": 3}, "form"),
    ({"form": "sonnet", "rhyme": "AA"}, "rhyme"),
    ({"rhyme": "ABA1"}, "rhyme"),
    ({"rhyme": "BA"}, "rhyme"),
    ({"rhyme": ""}, "rhyme"),
    ({"rhyme": ["A", "A"]}, "rhyme"),
    ({"syllables": 0}, "syllables"),
    ({"syllables": MAX_SYLLABLES + 1}, "syllables"),
    ({"syllables": "ten"}, "syllables"),
    ({"form": "sonnet", "lines": 4}, "lines"),
    ({"rhyme": "AA", "lines": MAX_FORM_LINES + 1}, "lines"),
    ({"rhyme": "ABAB", "stanzas": 14}, "stanzas"),  # 14 x 2 letters: more than 26
    ({"form": "sonnet", "stanzas": 15}, "stanzas"),  # more stanzas than lines
    ({"rhyme": "AA", "max_tokens": 10}, "max_tokens"),
    ({"rhyme": "AA", "repetition_penalty": 1.2}, "repetition_penalty"),
])
def test_bad_form_fields_are_one_400_naming_the_field(client, body, param):
    r = client.post("/v1/poem", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(f"{param}: ")


PRESETS = ", ".join(FORMS)
SYLLABLES = f"expected an integer 1..{MAX_SYLLABLES} (syllables per line), got "


@pytest.mark.parametrize("body,lines,stanzas,param,message", [
    ({"form": "haiku"}, None, None, "form", f"expected one of {PRESETS}; any other scheme goes in rhyme"),
    ({"form": 3}, None, None, "form", f"expected one of {PRESETS}; any other scheme goes in rhyme"),
    ({"form": "sonnet", "rhyme": "AA"}, None, None, "rhyme",
     "give either form (a preset) or rhyme (a scheme), not both"),
    ({"syllables": 0}, None, None, "syllables", SYLLABLES + "0"),
    ({"syllables": MAX_SYLLABLES + 1}, None, None, "syllables", SYLLABLES + str(MAX_SYLLABLES + 1)),
    ({"syllables": 7.5}, None, None, "syllables", SYLLABLES + "7.5"),
    ({"syllables": True}, None, None, "syllables", SYLLABLES + "True"),
    ({"rhyme": 5}, None, None, "rhyme", 'expected a scheme such as "ABAB" or "ABAB CDCD EFEF GG"'),
    ({"rhyme": "AB1"}, None, None, "rhyme",  # verse.parse_scheme's own account
     "rhyme scheme 'AB1' has characters other than letters A-Z: '1'; give letters such as ABAB, or one of: "
     + ", ".join(verse.NAMED_SCHEMES)),
    ({"rhyme": "ABAB CDCD"}, 4, None, "lines", "the scheme 'ABAB CDCD' has its own length (8 lines); leave lines out"),
    ({"rhyme": "AA", "syllables": 5}, MAX_FORM_LINES + 1, None, "lines",
     f"a poem in a form has at most {MAX_FORM_LINES} lines; this one has {MAX_FORM_LINES + 1}"),
    ({"syllables": 5}, None, 6, "lines", f"a poem in a form has at most {MAX_FORM_LINES} lines; this one has 72"),
    # a scheme repeated past the alphabet or split past its lines: the field that asked for it
    ({"rhyme": "AA"}, MAX_FORM_LINES, None, "lines", "rhyme scheme 'AA' repeated 32 times needs more than 26 letters"),
    ({"rhyme": "AB"}, None, 14, "stanzas", "rhyme scheme 'AB' repeated 14 times needs more than 26 letters"),
    ({"form": "sonnet"}, None, 15, "stanzas", "stanzas 15 is more than the poem's 14 lines"),
])
def test_decode_form_refuses_each_field_with_its_message(body, lines, stanzas, param, message):
    with pytest.raises(ApiError) as e:
        decode_form(body, lines, stanzas)
    assert (e.value.status, e.value.param, e.value.message) == (400, param, f"{param}: {message}")


@pytest.mark.parametrize("body,lines,stanzas,form,name", [
    ({}, None, None, None, None),
    ({"form": "free"}, 3, 2, None, None),  # free verse without syllables: the plain poem path
    ({"form": "free", "syllables": 4}, None, None, Form(lines=12, stanzas=1, syllables=4), "free"),
    ({"form": "Sonnet"}, None, None, Form(rhyme="ABAB CDCD EFEF GG", syllables=10), "sonnet"),
    ({"form": "sonnet", "syllables": 8}, None, None, Form(rhyme="ABAB CDCD EFEF GG", syllables=8), "sonnet"),
    ({"form": "sonnet"}, None, 7, Form(rhyme="ABAB CDCD EFEF GG", stanzas=7, syllables=10), "sonnet"),
    ({"form": "limerick"}, None, None, Form(rhyme="AABBA", lines=5, stanzas=1), "limerick"),
    ({"form": "couplets", "syllables": 3.0}, None, 2, Form(rhyme="AA", lines=4, stanzas=2, syllables=3), "couplets"),
    ({"syllables": 1}, None, None, Form(lines=12, stanzas=1, syllables=1), None),
    ({"syllables": MAX_SYLLABLES}, None, None, Form(lines=12, stanzas=1, syllables=MAX_SYLLABLES), None),
    ({"syllables": 5}, 2, 3, Form(lines=6, stanzas=3, syllables=5), None),
    ({"syllables": 5}, None, 5, Form(lines=60, stanzas=5, syllables=5), None),
    ({"syllables": 5}, MAX_FORM_LINES, None, Form(lines=MAX_FORM_LINES, stanzas=1, syllables=5), None),
    ({"syllables": 5}, MAX_FORM_LINES // 2, 2, Form(lines=MAX_FORM_LINES, stanzas=2, syllables=5), None),
    ({"rhyme": "AA", "syllables": 6}, None, None, Form(rhyme="AA", lines=2, stanzas=1, syllables=6), None),
    ({"rhyme": "AA"}, 3, 2, Form(rhyme="AA", lines=6, stanzas=2), None),
    ({"rhyme": "AB"}, None, 13, Form(rhyme="AB", lines=26, stanzas=13), None),
    ({"rhyme": "ABAB CDCD"}, None, None, Form(rhyme="ABAB CDCD"), None),
    ({"rhyme": "ABAB CDCD", "syllables": 6}, None, 2, Form(rhyme="ABAB CDCD", stanzas=2, syllables=6), None),
    ({"rhyme": "sonnet"}, None, None, Form(rhyme="sonnet"), None),
])
def test_decode_form_takes_each_field_as_documented(body, lines, stanzas, form, name):
    """A preset's scheme and syllables (the sonnet's 10, unless syllables says otherwise); a one-stanza
    scheme repeated `stanzas` times, `lines` per stanza (its own length by default); free verse with
    syllables 12 lines per stanza; a scheme of several stanzas keeps its own length."""
    assert decode_form(body, lines, stanzas) == (None if form is None else (form, name))


def documented_form_check() -> tuple[set[str], set[str]]:
    """The keys docs/serve.md gives the form check, and those of each of its lines."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "serve.md").read_text()
    block = re.search(r'"form": \{(.*?)\}, \.\.\.\]\}', doc, re.S)[1]
    top, per_line = block.split('"lines": [{')
    return set(re.findall(r'"(\w+)"', top)) | {"lines"}, set(re.findall(r'"(\w+)"', per_line))


def test_form_limits_at_the_boundary_are_accepted(client):
    r = client.post("/v1/poem", json={"syllables": MAX_SYLLABLES, "lines": 1, "seed": 0, "temperature": 0.5})
    assert r.status_code == 200, r.text
    check = r.json()["form"]
    assert check["syllables"] == MAX_SYLLABLES and check["lines_total"] == 1
    # the form check has the documented keys; free verse has no rhyme plan; a line may miss by one
    keys, line_keys = documented_form_check()
    assert set(check) == keys and all(set(m) == line_keys for m in check["lines"])
    assert check["rhyme"] is None and check["tolerance"] == 1 and check["name"] is None
    assert check["candidates"] == sum(m["candidates"] for m in check["lines"]) >= 1
    assert all(isinstance(m["seconds"], float) and m["seconds"] >= 0 for m in check["lines"])


def test_couplets_meet_the_form_seeded_and_streamed_alike(client):
    body = {"prompt": "The sea\n", "form": "couplets", "lines": 4, "seed": 5}
    t0 = time.perf_counter()
    a = client.post("/v1/poem", json=body).json()
    wall = time.perf_counter() - t0
    check = a["form"]
    assert check["name"] == "couplets" and check["rhyme"] == "AABB" and check["lines_total"] == 4
    lines = a["text"].splitlines()
    assert len(lines) == 4 and a["poem"] == "The sea\n" + a["text"]
    # the form engine keeps a line only when it meets the form: endings from the dictionary at worst
    assert check["all_met"] and check["lines_met"] == 4 and all(m["met"] for m in check["lines"])
    ends = [verse.last_word(line) for line in lines]
    assert verse.rhymes(ends[0], ends[1], dictionary_only=True) and verse.rhymes(ends[2], ends[3], dictionary_only=True)
    assert [m["text"] for m in check["lines"]] == lines and a["seed"] == 5
    # each line's own search time, in ms steps: together within the request's time as the client saw it
    seconds = [m["seconds"] for m in check["lines"]]
    assert all(s >= 0 and round(s, 3) == s for s in seconds) and sum(seconds) <= wall
    # the time to the first token is the first line's: once chosen, it is sent
    assert 1000 * seconds[0] - 1 <= a["timing"]["ttft_ms"] < 1000 * sum(seconds[:2])
    assert 1000 * sum(seconds) <= a["timing"]["ms"] + 2

    again = client.post("/v1/poem", json=body).json()
    assert again["text"] == a["text"]  # the same seed, the same poem
    r = client.post("/v1/poem", json={**body, "stream": True})
    events = [json.loads(e[6:]) for e in r.text.split("\n\n") if e and e != "data: [DONE]"]
    pieces, done = [e["text"] for e in events if not e.get("done")], events[-1]
    assert len(pieces) == 4 and "".join(pieces) == a["text"] == done["text"]  # one event per line
    assert done["done"] and done["form"]["all_met"] and done["finish_reason"] == "stop"


def test_a_form_streams_its_stanzas_and_continues_a_prompts_last_line(client, caplog):
    """A prompt that ends inside a line: the poem's first line finishes it, so the first piece is
    that line's rest; stanzas arrive with the blank line between them; the pieces are the text, and
    the usage counts the prompt's and the text's tokens (one per character here)."""
    body = {"prompt": "The sea", "rhyme": "AA", "lines": 2, "stanzas": 3, "seed": 4}
    caplog.set_level(logging.INFO, logger="gpt_small.serve")
    a = client.post("/v1/poem", json=body).json()
    assert a["poem"] == "The sea" + a["text"] and a["text"].count("\n\n") == 2
    # the request's log line counts the poem's tokens
    logged = [r.getMessage() for r in caplog.records if r.name == "gpt_small.serve"][-1]
    assert re.fullmatch(rf"POST /v1/poem 200 tokens={len(a['text'])} ms=\d+", logged), logged
    assert a["form"]["lines"][0]["text"].startswith("The sea")
    assert a["form"]["lines"][0]["text"] == "The sea" + a["text"].split("\n")[0]
    assert a["usage"] == {"prompt_tokens": 7, "completion_tokens": len(a["text"]), "total_tokens": 7 + len(a["text"])}
    r = client.post("/v1/poem", json={**body, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
    events = [json.loads(e[6:]) for e in r.text.split("\n\n") if e and e != "data: [DONE]"]
    assert r.text.endswith("data: [DONE]\n\n")
    pieces = [e["text"] for e in events[:-1]]
    assert [p.count("\n") for p in pieces] == [1, 2, 1, 2, 1, 1]  # a blank line after each stanza but the last
    assert "".join(pieces) == a["text"] == events[-1]["text"] and events[-1]["usage"] == a["usage"]


def test_a_form_is_refused_by_name_what_does_not_apply_to_it(client):
    r = client.post("/v1/poem", json={"rhyme": "AA", "repetition_penalty": 1.2})
    assert r.status_code == 400 and r.json()["error"] == {
        "message": "repetition_penalty: does not apply to a poem in a form", "type": "invalid_request_error",
        "param": "repetition_penalty", "code": None}


def test_a_form_waits_for_free_rows_but_not_in_a_full_queue():
    """Admission as for a plain request: with no queue (max_queue 0) a form runs on free rows, one
    free row being enough; when not one more row could wait
    (every row busy, no queue), it is a 429 in OpenAI's shape, with Retry-After."""
    model, tok = make_model()
    app = create_app(model=model, tokenizer=tok, model_name="tiny-poet", max_batch=2, max_queue=0)
    body = {"syllables": 3, "lines": 1, "seed": 3}
    busy: list[Sequence] = []

    def hold_a_row() -> None:
        started = threading.Event()
        busy.append(Sequence(tok.encode("the "), Sampling(seed=len(busy)), max_new_tokens=100_000, tokenizer=tok,
                             on_event=lambda kind, value: started.set()))
        app.state.engine.submit(busy[-1:])
        assert started.wait(30)

    with TestClient(app) as c:
        try:
            hold_a_row()
            assert app.state.engine.room() == 1
            got: list = []
            t = threading.Thread(target=lambda: got.append(c.post("/v1/poem", json=body)))
            t.start()
            deadline = time.monotonic() + 10  # admitted: its candidates take the free row at once
            while not got and app.state.engine.stats()["active"] < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            admitted = bool(got) or app.state.engine.stats()["active"] == 2
            app.state.engine.cancel(busy)  # then both rows are its own
            t.join(60)
            assert admitted, "the form did not take the free row"
            assert got and got[0].status_code == 200, got and got[0].text  # one free row, no queue: it runs
            busy.clear()
            hold_a_row()
            hold_a_row()
            assert app.state.engine.room() == 0
            r = c.post("/v1/poem", json=body)
        finally:
            app.state.engine.cancel(busy)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"] == {"message": "the server is busy: its queue is full; retry shortly",
                                     "type": "requests", "param": None, "code": "rate_limit_exceeded"}


def test_presets_and_stanzas(client):
    assert set(FORMS) == {"free", "couplets", "quatrains", "sonnet", "limerick"}
    r = client.post("/v1/poem", json={"rhyme": "AA", "lines": 2, "stanzas": 2, "seed": 1}).json()
    assert r["form"]["rhyme"] == "AA BB" and r["text"].count("\n\n") == 1  # a blank line between stanzas
    assert [s.count("\n") for s in r["text"].split("\n\n")] == [1, 2]
    # free verse without syllables is the plain poem path: no form check
    assert "form" not in client.post("/v1/poem", json={"form": "free", "lines": 1, "seed": 1}).json()


def _stream_gaps(url: str, out: list, start: threading.Event) -> None:
    start.wait()
    times = []
    with httpx.stream("POST", f"{url}/v1/completions", timeout=300,
                      json={"model": "tiny-poet", "prompt": "The sea", "max_tokens": 400, "stream": True,
                            "seed": len(out)}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                times.append(time.perf_counter())
    out.append(max(b - a for a, b in zip(times, times[1:])))


def _form(url: str, out: list, start: threading.Event, seed: int) -> None:
    start.wait()
    r = httpx.post(f"{url}/v1/poem", timeout=600, json={"rhyme": "AA", "lines": 2, "seed": seed})
    assert r.status_code == 200, r.text
    out.extend(m["seconds"] for m in r.json()["form"]["lines"])


@pytest.mark.slow
def test_forms_run_beside_plain_streams_without_stalling_them(tmp_path):
    """8 form requests and 16 plain streams at once: no plain stream waits between two chunks as
    long as one form line takes (a form held outside the batch would stall them for whole poems).
    Relative, not absolute: both sides run on the same loaded machine at the same time."""
    run_dir = make_checkpoint(tmp_path / "tiny-poet")
    with live_server(run_dir, "--max-batch", "32", "--max-queue", "256") as (url, _, err):
        gaps: list[float] = []
        line_seconds: list[float] = []
        start = threading.Event()
        threads = [threading.Thread(target=_form, args=(url, line_seconds, start, i)) for i in range(8)]
        threads += [threading.Thread(target=_stream_gaps, args=(url, gaps, start)) for _ in range(16)]
        for t in threads:
            t.start()
        start.set()
        for t in threads:
            t.join(timeout=900)
        assert len(gaps) == 16 and len(line_seconds) == 16, err
        line = statistics.median(line_seconds)
        print(f"longest wait between two chunks of a plain stream {max(gaps):.3f} s; "
              f"a form line: median {line:.3f} s, shortest {min(line_seconds):.3f} s")
        assert max(gaps) < line, (max(gaps), sorted(line_seconds))


def test_a_forms_lines_are_sampled_with_the_requests_settings(client):
    """Each line a form samples uses the request's temperature, top_k and top_p: any of them set to
    keep only the likeliest token gives the greedy line whatever the seed, where the default sampling
    (temperature 0.8) gives another."""
    def line(seed, **kw):
        r = client.post("/v1/poem", json={"prompt": "The sea\n", "syllables": 6, "lines": 1, "seed": seed, **kw})
        assert r.status_code == 200, r.text
        return r.json()["text"]

    greedy = line(1, temperature=0)
    assert line(1) != greedy  # the default, temperature 0.8, samples
    assert line(2, top_k=1) == greedy and line(3, top_p=1e-9) == greedy


# --- EngineCalls: a form's three model calls as rows of a real engine, against form_calls' own ---

def _calls(max_batch: int = 2, max_queue: int = 0, seed: int | None = 0, **sampling):
    """An engine over a model, EngineCalls on it, and a copy of the model to compute the same calls
    directly (form_calls); a timer sets `stop` after 20 s (each test takes a second or two), so a
    call that never returns fails the test instead of holding it."""
    model, tok = make_model()
    ref = copy.deepcopy(model)
    engine = Engine(model, tok, max_batch=max_batch, max_queue=max_queue)
    stop = threading.Event()
    timer = threading.Timer(20, stop.set)
    timer.start()
    calls = EngineCalls(engine, tok, {"temperature": 0.8, "top_k": None, "top_p": None, **sampling}, seed, stop)
    return calls, ref, tok, engine, stop, timer


def test_engine_calls_give_the_numbers_of_the_direct_calls_however_many_rows():
    """Scores, next-token log-probabilities and greedy lines equal form_calls' on the model itself,
    with more rows than the engine's batch and queue hold at once (submitted in slices)."""
    calls, ref, tok, engine, stop, timer = _calls(max_batch=2, max_queue=0, temperature=0.0)
    try:
        prefix = torch.tensor(tok.encode("The sea and "))
        conts = [tok.encode(w) for w in ("sky\n", "a", "the tide", "me", "stars\n")]
        torch.testing.assert_close(torch.tensor(calls.score_continuations(prefix, conts)),
                                   torch.tensor(form_calls.score_continuations(ref, prefix, conts, 2)),
                                   atol=1e-4, rtol=0)
        torch.testing.assert_close(calls.next_token_logprobs(prefix), form_calls.next_token_logprobs(ref, prefix),
                                   atol=1e-4, rtol=0)
        newline = torch.zeros(tok.vocab_size, dtype=torch.bool)
        newline[tok.encode("\n")] = True
        direct = form_calls.sample_lines(ref, prefix, 5, 12, newline, None,
                                         {"temperature": 0.0, "top_k": None, "top_p": None}, [])
        served = calls.sample_lines(prefix, 5, 12)
        assert [(ids, ended) for ids, _, ended in served] == [(ids, ended) for ids, _, ended in direct]
        torch.testing.assert_close(torch.tensor([s for _, s, _ in served]), torch.tensor([s for _, s, _ in direct]),
                                   atol=1e-4, rtol=0)
        assert not stop.is_set()
    finally:
        timer.cancel()
        engine.close(10)


def test_engine_calls_seed_each_row_from_the_poems_seed():
    """Rows sampled with one seed: the same lines every time (another seed, other lines); each row
    its own seed, so rows differ from one another."""
    def lines(seed):
        calls, _, tok, engine, stop, timer = _calls(max_batch=4, seed=seed)
        try:
            return [ids for ids, _, _ in calls.sample_lines(torch.tensor(tok.encode("The sea ")), 4, 10)]
        finally:
            timer.cancel()
            engine.close(10)

    a = lines(7)
    assert a == lines(7) and a != lines(8) and len({tuple(x) for x in a}) > 1


def test_engine_calls_sample_one_line_per_row_and_say_which_ended():
    """A sampled candidate is one line: it ends at its first newline (then `ended`) or at the token
    budget (then not), never past a newline."""
    calls, _, tok, engine, stop, timer = _calls(max_batch=8, seed=3, temperature=1.0)
    try:
        rows = calls.sample_lines(torch.tensor(tok.encode("The sea ")), 8, 30)
    finally:
        timer.cancel()
        engine.close(10)
    nl = tok.encode("\n")[0]
    assert len(rows) == 8 and any(ended for _, _, ended in rows) and not all(ended for _, _, ended in rows)
    for ids, score, ended in rows:
        assert nl not in ids[:-1] and ended == (ids[-1] == nl) and (ended or len(ids) == 30)
        assert score < 0


def test_engine_calls_stop_when_told_and_free_their_rows():
    calls, _, tok, engine, stop, timer = _calls(max_batch=2)
    timer.cancel()
    try:
        threading.Timer(0.5, stop.set).start()  # the client leaves while its rows decode
        with pytest.raises(Cancelled):  # 3 continuations of 100,000 tokens: they run until told
            calls.score_continuations(torch.tensor(tok.encode("The sea ")), [tok.encode("a") * 100_000] * 3)
        deadline = time.monotonic() + 30
        while engine.stats()["active"] and time.monotonic() < deadline:
            time.sleep(0.02)
        stats = engine.stats()
        assert stats["active"] == 0 and stats["queued"] == 0 and stats["cancelled"] == 2  # the third never got a row
        threading.Timer(0.5, stop.set).start()
        stop.clear()
        with pytest.raises(Cancelled):  # every row running, none waiting for room: told all the same
            calls.score_continuations(torch.tensor(tok.encode("The sea ")), [tok.encode("a") * 5000] * 2)
        deadline = time.monotonic() + 30
        while engine.stats()["active"] and time.monotonic() < deadline:
            time.sleep(0.02)
        stats = engine.stats()
        assert stats["active"] == 0 and stats["cancelled"] == 4
        with pytest.raises(Cancelled):  # told before it starts: nothing is submitted
            calls.next_token_logprobs(torch.tensor(tok.encode("a")))
        assert engine.stats()["cancelled"] == stats["cancelled"]
    finally:
        engine.close(10)


def test_engine_calls_of_a_closing_engine_or_a_failed_step_raise():
    calls, _, tok, engine, stop, timer = _calls(max_batch=2)
    try:
        real = engine._step

        def boom():
            raise RuntimeError("injected")

        engine._step = boom  # a failure injected into the decode loop
        with pytest.raises(RuntimeError, match=r"^the decode loop failed \(logged\)$"):
            calls.sample_lines(torch.tensor(tok.encode("The sea ")), 2, 5)
        engine._step = real
        assert len(calls.sample_lines(torch.tensor(tok.encode("The sea ")), 2, 5)) == 2  # the engine goes on
        engine.close(10)
        with pytest.raises(Cancelled):  # the server is shutting down: the form ends, not waits
            calls.score_continuations(torch.tensor(tok.encode("a")), [tok.encode("b")])
        assert not stop.is_set()
    finally:
        timer.cancel()
        engine.close(10)


@pytest.mark.parametrize("stream", [False, True])
def test_a_form_whose_client_leaves_frees_its_rows_and_is_logged_so(caplog, stream):
    """Over a real uvicorn: a form poem of 64 lines whose client closes the socket stops within the
    form's poll, its rows cancelled and freed, and its log line says `(client left)` (status 499,
    nginx's "client closed request", where nobody reads a body)."""
    import socket

    from gpt_small.serve.protocol import HTTP_LIMITS
    from serve_util import uvicorn_thread

    model, tok = make_model()
    app = create_app(model=model, tokenizer=tok, model_name="tiny-poet")
    caplog.set_level(logging.INFO, logger="gpt_small.serve")
    stats = app.state

    def until(check, seconds: float = 30):
        deadline = time.monotonic() + seconds
        while not check():
            assert time.monotonic() < deadline, stats.engine.stats()
            time.sleep(0.02)

    with uvicorn_thread(app, HTTP_LIMITS, drain_seconds=1, daemon=False) as address:
        payload = json.dumps({"syllables": 8, "lines": MAX_FORM_LINES, "stream": stream}).encode()
        s = socket.create_connection(address)
        s.sendall(b"POST /v1/poem HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
        until(lambda: stats.engine.stats()["active"] > 0)
        # the search runs on a daemon thread of its own, named for thread dumps: a stopping server
        # never waits on one
        assert [t.daemon for t in threading.enumerate() if t.name == "gpt-small-form"] == [True]
        s.close()
        until(lambda: [r for r in caplog.records if r.name == "gpt_small.serve"])
        until(lambda: stats.engine.stats()["active"] == 0 and stats.engine.stats()["queued"] == 0)
        tokens = stats.engine.stats()["tokens"]
        time.sleep(1.0)  # two of the form's polls: its search has stopped, not gone on unread
        assert stats.engine.stats()["tokens"] == tokens and stats.engine.stats()["active"] == 0
    (line,) = [r.getMessage() for r in caplog.records if r.name == "gpt_small.serve"]
    status = 200 if stream else 499  # a stream has sent its status line before the client left
    assert re.fullmatch(rf"POST /v1/poem {status} tokens=0 ms=\d+ \(client left\)", line), line


def test_a_form_whose_search_fails_is_a_500_or_an_error_event_and_the_server_goes_on(caplog):
    """A failure injected into the decode loop: the form's JSON answer is a 500 in OpenAI's shape; a
    streamed form ends with the error event and [DONE], as a plain poem's stream does, and the
    failure is logged; the next form is served."""
    from serve_util import failing_decode_steps

    model, tok = make_model()
    app = create_app(model=model, tokenizer=tok, model_name="tiny-poet")
    body = {"rhyme": "AA", "lines": 2, "seed": 1}
    with TestClient(app, raise_server_exceptions=False) as c:
        with failing_decode_steps(app):
            caplog.set_level(logging.INFO, logger="gpt_small.serve")
            r = c.post("/v1/poem", json=body)
            logged = [rec.getMessage() for rec in caplog.records if rec.name == "gpt_small.serve"
                      and rec.levelno == logging.INFO]
            assert re.fullmatch(r"POST /v1/poem 500 tokens=0 ms=\d+", logged[-1]), logged  # not "(client left)"
            assert r.status_code == 500 and r.json() == {"error": {
                "message": "internal error (logged by the server)", "type": "server_error", "param": None,
                "code": None}}
            caplog.clear()
            caplog.set_level(logging.ERROR, logger="gpt_small.serve")
            r = c.post("/v1/poem", json={**body, "stream": True})
        assert r.status_code == 200
        assert r.text.endswith("data: [DONE]\n\n")
        events = [json.loads(e[6:]) for e in r.text.split("\n\n") if e and e != "data: [DONE]"]
        assert events[-1] == {"error": {"message": "internal error while generating (logged by the server)",
                                        "type": "server_error", "param": None, "code": None}}
        assert not any(e.get("done") for e in events)
        failed = [rec for rec in caplog.records if rec.getMessage() == "a poem in a form failed"]
        assert len(failed) == 1 and "the decode loop failed" in str(failed[0].exc_info[1])
        assert c.post("/v1/poem", json=body).status_code == 200


def test_a_form_running_when_the_server_stops_is_a_503():
    """The engine closing under a form poem (the server shutting down): the search stops at its
    next model call and the client gets 503 with Retry-After, not a poem cut short as if whole."""
    model, tok = make_model()
    app = create_app(model=model, tokenizer=tok, model_name="tiny-poet")
    with TestClient(app) as c:
        got: list = []
        t = threading.Thread(target=lambda: got.append(
            c.post("/v1/poem", json={"syllables": 8, "lines": MAX_FORM_LINES, "seed": 2})))
        t.start()
        deadline = time.monotonic() + 30
        while app.state.engine.stats()["active"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        app.state.engine.close()
        t.join(60)
        r = got[0]
        assert r.status_code == 503 and r.headers["retry-after"] == "5"  # as a plain request's
        assert r.json()["error"] == {"message": "the server is shutting down; retry on another server or once it is back",
                                     "type": "server_error", "param": None, "code": "service_unavailable"}
