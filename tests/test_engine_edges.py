"""The serve engine at its edges: the bounded queue while every row is busy (the last sequence
taken, the first refused, all or none), a failed batched decode step, and Sequence.feed where the
line count, the token budget and a split UTF-8 character meet on one token."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from gpt_small.generate import generate_tokens
from gpt_small.serve.engine import Engine, QueueFull, Sequence
from gpt_small.serve.protocol import Sampling
from serve_util import make_model


def _seq(tok, prompt: str, seed: int, n: int, **kw) -> Sequence:
    return Sequence(tok.encode(prompt), Sampling(temperature=1.0, seed=seed), max_new_tokens=n, tokenizer=tok, **kw)


def _busy(engine: Engine, tok, rows: int) -> list[Sequence]:
    """Fill `rows` rows with sequences that would run for 100,000 tokens; return once each has
    written a token (so they hold rows, not queue places)."""
    started = [threading.Event() for _ in range(rows)]
    seqs = [_seq(tok, "the ", i, 100_000, on_event=lambda kind, v, e=e: e.set()) for i, e in enumerate(started)]
    engine.submit(seqs)
    for e in started:
        assert e.wait(30), "a long sequence did not start"
    return seqs


def _stop(engine: Engine, seqs: list[Sequence]) -> None:
    engine.cancel(seqs)
    engine.close(10)


@pytest.mark.parametrize("max_queue", [0, 1, 3])
def test_with_every_row_busy_the_queue_takes_exactly_max_queue(max_queue):
    model, tok = make_model()
    engine = Engine(model, tok, max_batch=2, max_queue=max_queue)
    waiting: list[Sequence] = []
    try:
        busy = _busy(engine, tok, 2)
        for i in range(max_queue):  # one at a time up to the bound: each taken
            assert engine.room() == max_queue - i  # what submit takes now
            waiting.append(_seq(tok, "a", 10 + i, 5))
            engine.submit(waiting[-1:])
        assert engine.stats()["queued"] == max_queue and engine.room() == 0
        with pytest.raises(QueueFull, match=f"the queue holds {max_queue}"):
            engine.submit([_seq(tok, "a", 99, 5)])
        stats = engine.stats()  # what /healthz shows
        assert stats["queued"] == max_queue and stats["active"] == 2
        assert stats["max_queue"] == max_queue and stats["max_batch"] == 2
    finally:
        _stop(engine, busy + waiting)
    assert all(s.finish_reason == "cancelled" for s in busy + waiting)
    assert all(s.text == "" and s.new_ids == [] for s in waiting)  # never started: no text at all


def test_a_request_of_several_samples_is_queued_all_or_none():
    model, tok = make_model()
    engine = Engine(model, tok, max_batch=1, max_queue=3)
    waiting: list[Sequence] = []
    try:
        busy = _busy(engine, tok, 1)
        waiting = [_seq(tok, "a", 1, 5), _seq(tok, "b", 2, 5)]
        engine.submit(waiting)
        with pytest.raises(QueueFull):  # two more than the one place left: neither is queued
            engine.submit([_seq(tok, "c", 3, 5), _seq(tok, "d", 4, 5)])
        assert engine.stats()["queued"] == 2
        last = _seq(tok, "e", 5, 5)
        engine.submit([last])  # the one place left is still there
        waiting.append(last)
        assert engine.stats()["queued"] == 3
    finally:
        _stop(engine, busy + waiting)


@pytest.mark.parametrize("max_batch, max_queue", [(3, 0), (3, 2), (1, 1)])
def test_free_rows_take_arrivals_beyond_the_queue_bound(max_batch, max_queue):
    """An idle engine takes max_batch + max_queue sequences in one request, and refuses one more."""
    model, tok = make_model()
    engine = Engine(model, tok, max_batch=max_batch, max_queue=max_queue)
    try:
        assert engine.room() == max_batch + max_queue
        with pytest.raises(QueueFull):
            engine.submit([_seq(tok, "a", i, 3) for i in range(max_batch + max_queue + 1)])
        assert engine.stats()["queued"] == 0 and engine.stats()["active"] == 0
        done = threading.Semaphore(0)
        seqs = [_seq(tok, "a", i, 3, on_event=lambda kind, v: kind == "done" and done.release())
                for i in range(max_batch + max_queue)]
        engine.submit(seqs)
        for _ in seqs:
            assert done.acquire(timeout=30)
        assert all(s.finish_reason == "length" and len(s.new_ids) == 3 for s in seqs)
    finally:
        engine.close(10)


def _idle(engine: Engine, timeout: float = 30.0) -> dict[str, int]:
    """The engine's stats once no row is live and nothing waits."""
    deadline = time.monotonic() + timeout
    while (stats := engine.stats())["active"] or stats["queued"]:
        assert time.monotonic() < deadline, f"the engine did not go idle: {stats}"
        time.sleep(0.01)
    return stats


def test_a_failed_batched_decode_step_ends_its_rows_with_error_and_the_engine_goes_on(caplog):
    model, tok = make_model()
    calls = {"decode": 0}
    forward = model.forward

    def failing_forward(idx, *args, **kw):  # the third batched decoding step raises, once
        if idx.shape[1] == 1 and kw.get("input_pos") is not None:
            calls["decode"] += 1
            if calls["decode"] == 3:
                raise RuntimeError("injected failure in a decoding step")
        return forward(idx, *args, **kw)

    model.forward = failing_forward
    engine = Engine(model, tok, max_batch=4)
    try:
        done = threading.Semaphore(0)
        events: dict[int, list] = {0: [], 1: []}
        seqs = [_seq(tok, p, i, 40, on_event=lambda kind, v, i=i: (events[i].append((kind, v)),
                                                                   kind == "done" and done.release()))
                for i, p in enumerate(["the ", "and "])]
        engine.submit(seqs)
        for _ in seqs:
            assert done.acquire(timeout=30)
        tokens = [len(s.new_ids) for s in seqs]
        stats = _idle(engine)
        for i, s in enumerate(seqs):  # ended once, at the failed step: no text or token after it
            assert s.finish_reason == "error" and events[i][-1] == ("done", "error")
            assert [e for e in events[i] if e[0] == "done"] == [("done", "error")]
            assert 1 <= len(s.new_ids) == tokens[i] < 40
        assert stats["finished"] == 2 and stats["cancelled"] == 0 and stats["tokens"] == sum(tokens)
        # the server's log names what failed, once per request, with the traceback
        failed = [r for r in caplog.records if r.name == "gpt_small.serve"]
        assert [r.getMessage() for r in failed] == ["a batched decode step failed; ending that request"] * 2
        assert all("injected failure in a decoding step" in str(r.exc_info[1]) for r in failed)
        # the engine keeps serving, and a new sequence is what it would be alone
        again = _seq(tok, "the ", 7, 30, on_event=lambda kind, v: kind == "done" and done.release())
        engine.submit([again])
        assert done.acquire(timeout=30)
    finally:
        engine.close(10)
        model.forward = forward
    alone = [int(t) for t in generate_tokens(model, tok.encode("the "), max_new_tokens=30, temperature=1.0,
                                             seed=7, banned_ids=[tok.unk_id])]
    assert again.finish_reason == "length" and again.new_ids == alone


class ByteTokenizer:
    """Byte-level ids: one token may be part of a UTF-8 character (as in byte-level BPE)."""

    vocab_size = 256

    def decode(self, ids) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def _feed_all(seq: Sequence, data: bytes) -> tuple[list[str], int]:
    """Feed the bytes of data one token at a time until the sequence ends; (texts sent, tokens fed)."""
    sent: list[str] = []
    seq.on_event = lambda kind, v: kind == "text" and sent.append(v)
    for n, b in enumerate(data, 1):
        if seq.feed(b):
            seq.finish(seq.finish_reason)
            return sent, n
    return sent, len(data)


def _byte_seq(**kw) -> Sequence:
    return Sequence([1], Sampling(temperature=1.0, seed=0), tokenizer=ByteTokenizer(), **kw)


@pytest.mark.parametrize("max_new, reason, text", [
    (6, "stop", "ab\ncd\n"),   # the last line's newline is the last token allowed: the lines end it
    (7, "stop", "ab\ncd\n"),
    (5, "length", "ab\ncd"),   # one token short of the second newline
])
def test_the_line_count_and_the_token_budget_on_the_same_token(max_new, reason, text):
    seq = _byte_seq(max_new_tokens=max_new, lines=2)
    sent, fed = _feed_all(seq, b"ab\ncd\nef\n")
    assert seq.finish_reason == reason and seq.text == text and "".join(sent) == text
    assert fed == min(max_new, 6)


def test_a_character_split_over_tokens_is_sent_whole():
    word = "née\n".encode()  # é is two bytes
    seq = _byte_seq(max_new_tokens=100, lines=1)
    sent, fed = _feed_all(seq, word)
    assert sent and all("\ufffd" not in s for s in sent)
    assert "".join(sent) == "née\n" and seq.finish_reason == "stop" and fed == len(word)


def test_the_token_budget_inside_a_character_ends_the_text_there():
    """Cut by max_tokens between a character's two bytes: finish "length", and what was sent is
    exactly the text (the incomplete character as U+FFFD, as decoding those bytes gives)."""
    seq = _byte_seq(max_new_tokens=2)
    sent, fed = _feed_all(seq, "né".encode())
    assert fed == 2 and seq.finish_reason == "length"
    assert seq.text == "n\ufffd" and "".join(sent) == seq.text


def test_a_stop_string_split_at_a_character_boundary():
    """The stop string starts inside a multi-byte character's bytes' decoding: nothing of it is sent."""
    seq = _byte_seq(max_new_tokens=100, stop=["é!"])
    sent, fed = _feed_all(seq, "aé!zz".encode())
    assert seq.finish_reason == "stop" and seq.text == "a" and "".join(sent) == "a"
    assert fed == len("aé!".encode())


def _run(engine: Engine, seqs: list[Sequence], timeout: float = 30.0) -> None:
    done = threading.Semaphore(0)
    for s in seqs:
        s.on_event = lambda kind, v: kind == "done" and done.release()
    engine.submit(seqs)
    for _ in seqs:
        assert done.acquire(timeout=timeout), "the engine did not finish in time"


def test_forced_tokens_are_taken_and_scored_by_the_models_own_distribution():
    """The verse forms' hooks: forced tokens are taken whatever the sampling options say; `score`
    gives each one's log-probability under the model at temperature 1 (no ban, penalty or
    truncation), `keep_first` the whole first distribution, `logprobs=N` the top N of it."""
    import torch

    model, tok = make_model()
    reference, _ = make_model()  # the same weights, without the engine's cache
    prompt, forced = tok.encode("the "), tok.encode("moon moon\n")
    with torch.no_grad():
        logits = reference(torch.tensor([prompt + forced]))[0]
    want = torch.log_softmax(logits.float(), dim=-1)[len(prompt) - 1:-1]  # the distribution of each forced token
    want_scores = [float(want[i, t]) for i, t in enumerate(forced)]
    odd = Sampling(temperature=0.3, top_k=1, repetition_penalty=1.8, seed=5)  # would sample other tokens
    engine = Engine(model, tok, max_batch=4)
    try:
        seqs = [Sequence(prompt, odd, max_new_tokens=len(forced), tokenizer=tok, forced=forced, score=True,
                         keep_first=True, logprobs=3),
                Sequence(prompt, odd, max_new_tokens=len(forced), tokenizer=tok, forced=forced, logprobs=0),
                Sequence(prompt, odd, max_new_tokens=len(forced), tokenizer=tok),  # sampled: no scores kept
                # each hook alone, as serve/forms.py asks: scores only, the first distribution only
                Sequence(prompt, odd, max_new_tokens=len(forced), tokenizer=tok, forced=forced, score=True),
                Sequence(prompt, odd, max_new_tokens=1, tokenizer=tok, forced=forced[:1], keep_first=True)]
        _run(engine, seqs)
    finally:
        engine.close(10)
    scored, zero, plain, scores_only, first_only = seqs
    assert scores_only.scores == pytest.approx(want_scores, abs=1e-4) and scores_only.token_logprobs == []
    assert torch.allclose(first_only.first_logprobs, want[0], atol=1e-4) and first_only.scores is None
    for s in (scored, zero):
        assert s.new_ids == forced and s.text == "moon moon\n" and s.finish_reason == "length"
    assert scored.scores == pytest.approx(want_scores, abs=1e-4)
    assert torch.allclose(scored.first_logprobs, want[0], atol=1e-4)  # the first distribution, kept once
    assert [lp for lp, _ in scored.token_logprobs] == pytest.approx(want_scores, abs=1e-4)
    for i, (_, top) in enumerate(scored.token_logprobs):
        best = torch.topk(want[i], 3)
        assert [t for t, _ in top] == best.indices.tolist()
        assert [v for _, v in top] == pytest.approx(best.values.tolist(), abs=1e-4)
    assert [top for _, top in zero.token_logprobs] == [[]] * len(forced)
    assert zero.scores is None and zero.first_logprobs is None
    assert plain.scores is None and plain.first_logprobs is None and plain.token_logprobs == []
    assert plain.new_ids != forced and len(plain.new_ids) == len(forced)


def test_close_finishes_what_runs_and_waits_then_takes_nothing_new():
    """A graceful shutdown: every row and every queued sequence is written to its end (the same
    tokens as alone), the worker stops, and a later submit is refused as shutting down."""
    from gpt_small.serve.engine import ShuttingDown

    model, tok = make_model()
    engine = Engine(model, tok, max_batch=2, max_queue=2)
    events: dict[int, list] = {i: [] for i in range(4)}
    seqs = [_seq(tok, p, i, 12, on_event=lambda kind, v, i=i: events[i].append((kind, v)))
            for i, p in enumerate(["the ", "a", "and ", "the "])]
    engine.submit(seqs)  # two rows, two waiting
    engine.close(30)
    assert not engine._thread.is_alive()
    assert [s.finish_reason for s in seqs] == ["length"] * 4
    assert [e[-1] for e in events.values()] == [("done", "length")] * 4
    stats = engine.stats()
    assert stats["finished"] == 4 and stats["tokens"] == 48 and stats["active"] == stats["queued"] == 0
    with pytest.raises(ShuttingDown, match="^the server is shutting down$"):
        engine.submit([_seq(tok, "a", 9, 3)])
    reference, _ = make_model()
    for i, (s, p) in enumerate(zip(seqs, ["the ", "a", "and ", "the "])):
        alone = [int(t) for t in generate_tokens(reference, tok.encode(p), max_new_tokens=12, temperature=1.0,
                                                 seed=i, banned_ids=[tok.unk_id])]
        assert s.new_ids == alone


def test_a_failure_outside_any_row_ends_every_live_and_arriving_sequence_once(caplog):
    """A bug that escapes the round (here: the step raises once, after clearing the model's cache)
    ends the live rows and the arrivals of that round with an error, each exactly once, and the
    engine starts over with a fresh cache: the next sequence is what it would be alone."""
    model, tok = make_model()
    engine = Engine(model, tok, max_batch=4)
    real_step = engine._step
    fail = threading.Event()

    def step():
        if fail.is_set() and not engine._pending:  # the arrivals were taken into this round
            fail.clear()
            model.clear_kv_cache()
            raise RuntimeError("injected failure outside any row")
        return real_step()

    engine._step = step
    events: dict[int, list] = {0: [], 1: [], 2: []}
    try:
        started = threading.Event()
        live = _seq(tok, "the ", 0, 100_000, on_event=lambda kind, v: (events[0].append((kind, v)), started.set()))
        engine.submit([live])
        assert started.wait(30)
        with engine._cond:  # arrivals of the failing round, beside the live row
            fail.set()
            engine.submit([_seq(tok, "a", i, 5, on_event=lambda kind, v, i=i: events[i].append((kind, v)))
                           for i in (1, 2)])
        stats = _idle(engine)
        for i in (0, 1, 2):
            assert [e for e in events[i] if e[0] == "done"] == [("done", "error")] and events[i][-1][0] == "done"
        assert stats["finished"] == 3
        done = threading.Event()
        again = _seq(tok, "the ", 7, 20, on_event=lambda kind, v: kind == "done" and done.set())
        engine.submit([again])
        assert done.wait(30)
    finally:
        engine.close(10)
    reference, _ = make_model()
    alone = [int(t) for t in generate_tokens(reference, tok.encode("the "), max_new_tokens=20, temperature=1.0,
                                             seed=7, banned_ids=[tok.unk_id])]
    assert again.finish_reason == "length" and again.new_ids == alone
    failed = [r for r in caplog.records if r.name == "gpt_small.serve" and r.levelname == "ERROR"]
    assert [r.getMessage() for r in failed] == ["decode step failed; ending the live requests"]
    assert "injected failure outside any row" in str(failed[0].exc_info[1])


class PiecesTokenizer:
    """Each id is a piece of UTF-8 bytes of any length (as byte-level BPE tokens are: several
    characters, several newlines, or a character's first bytes only)."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces

    def decode(self, ids) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def _events_of(pieces: list[bytes], **kw) -> tuple[Sequence, list]:
    """Feed each piece as one token until the sequence ends, as the engine does (finish after)."""
    events: list = []
    seq = Sequence([0], Sampling(seed=0), tokenizer=PiecesTokenizer(pieces),
                   on_event=lambda kind, v: events.append((kind, v)), **kw)
    for i in range(len(pieces)):
        if seq.feed(i):
            break
    seq.finish(seq.finish_reason or "length")
    return seq, events


@pytest.mark.parametrize("pieces, kw, sent", [
    # each token's text goes out with that token, the last one too (not held for the end)
    ([b" the", b" moon", b" ro", b"se"], dict(max_new_tokens=4), [" the", " moon", " ro", "se"]),
    # a character split over two tokens: the complete characters before it go out at once
    ([b"ab\xc3", b"\xa9!"], dict(max_new_tokens=2), ["ab", "\u00e9!"]),
    ([b"ab\xc3", b"\xa9!", b"cd"], dict(max_new_tokens=3, stop=["zz"]), ["ab", "\u00e9!", "cd"]),
])
def test_text_is_sent_with_the_token_that_completes_it(pieces, kw, sent):
    seq, events = _events_of(pieces, **kw)
    assert events == [("text", s) for s in sent] + [("done", "length")]


@pytest.mark.parametrize("pieces, kw, text, fed", [
    ([b"ab\ncd\n", b"ef"], dict(lines=1), "ab\n", 1),  # one token, two newlines: cut after the first
    ([b"a\n\nb", b"c"], dict(lines=2), "a\n\n", 1),  # a blank line's two newlines in one token
    ([b"a\n", b"\nb\n", b"c"], dict(lines=2), "a\n\n", 2),
    ([b"\n", b"a"], dict(lines=1), "\n", 1),  # the very first token is the line's end
    ([b"axbxc", b"d"], dict(stop=["x"]), "a", 1),  # the first of two matches in one token
    ([b"axbxc", b"d"], dict(stop=["x"], keep_stop=True), "ax", 1),
    ([b"ab", b"cx", b"d"], dict(stop=["x"], keep_stop=True), "abcx", 2),  # kept, ending the token's text
    ([b"ab", b"xyx", b"y"], dict(stop=["yx", "bx"]), "a", 2),  # the earliest of two stop strings
])
def test_lines_and_stop_strings_inside_a_token_of_several_characters(pieces, kw, text, fed):
    seq, events = _events_of(pieces, max_new_tokens=10, **kw)
    assert seq.text == text and seq.finish_reason == "stop" and len(seq.new_ids) == fed
    assert "".join(v for kind, v in events if kind == "text") == text and events[-1] == ("done", "stop")


@pytest.mark.parametrize("reason", ["error", "cancelled"])
def test_text_held_back_is_dropped_when_a_sample_ends_without_finishing(reason):
    """A held-back "z" (it may start the stop string "zz") is not sent when the sample fails or is
    cancelled: only a sample that ends by its rule sends what it held."""
    seq, events = _events_of([b"a", b"z"], max_new_tokens=10, stop=["zz"])  # ends "length" by _events_of
    assert events == [("text", "a"), ("text", "z"), ("done", "length")]
    events = []
    seq = Sequence([0], Sampling(seed=0), max_new_tokens=10, tokenizer=PiecesTokenizer([b"a", b"z"]), stop=["zz"],
                   on_event=lambda kind, v: events.append((kind, v)))
    assert not seq.feed(0) and not seq.feed(1)
    seq.finish(reason)
    assert events == [("text", "a"), ("done", reason)] and seq.finish_reason == reason


def test_a_failure_sending_a_samples_last_text_ends_it_with_error(caplog):
    """The client's callback fails on the text of the last token (the sample had just ended by
    length): the sample's end is reported as "error", once, and logged; the other sample, in the
    row after it, finishes."""
    model, tok = make_model()
    engine = Engine(model, tok, max_batch=2)
    events: list = []
    texts = []

    def on_event(kind, v):
        events.append((kind, v))
        if kind == "text":
            texts.append(v)
            if len(texts) == 3:
                raise RuntimeError("injected failure sending the last token's text")

    try:
        done = threading.Semaphore(0)
        failing = _seq(tok, "a", 1, 3,  # the shorter prompt: the first row
                       on_event=lambda kind, v: (on_event(kind, v), kind == "done" and done.release()))
        other = _seq(tok, "the ", 2, 6, on_event=lambda kind, v: kind == "done" and done.release())
        engine.submit([failing, other])
        assert done.acquire(timeout=30) and done.acquire(timeout=30)
        stats = _idle(engine)
    finally:
        engine.close(10)
    assert failing.finish_reason == "error" and [e for e in events if e[0] == "done"] == [("done", "error")]
    assert len(failing.new_ids) == 3 and other.finish_reason == "length" and len(other.new_ids) == 6
    assert stats["finished"] == 2
    logged = [r for r in caplog.records if r.name == "gpt_small.serve"]
    assert [r.getMessage() for r in logged] == ["sampling a row failed; ending that request"]
    assert str(logged[0].exc_info[1]) == "injected failure sending the last token's text"


def test_the_counters_healthz_shows_count_exactly():
    """tokens: every token sampled; steps: batched decoding forwards (a sample of n tokens needs
    n - 1: its first token comes from its prefill); prefills and prefill_rows: prefill forwards and
    the sequences in them (samples of one prompt share one); peak_batch: the most rows at once."""
    model, tok = make_model()
    engine = Engine(model, tok, max_batch=4)
    try:
        _run(engine, [_seq(tok, "the ", 0, 6)])
        s = engine.stats()
        assert (s["tokens"], s["steps"], s["prefills"], s["prefill_rows"], s["peak_batch"], s["finished"]) == \
            (6, 5, 1, 1, 1, 1)
        _run(engine, [_seq(tok, "a", i, 4) for i in range(3)])  # one prompt, three samples: one prefill
        s = engine.stats()
        assert (s["tokens"], s["steps"], s["prefills"], s["prefill_rows"], s["peak_batch"], s["finished"]) == \
            (6 + 12, 5 + 3, 2, 2, 3, 4)
        cancelled = _seq(tok, "b", 0, 5)
        cancelled.cancel()  # before it starts: never a row, counted as cancelled
        _run(engine, [cancelled])
        s = engine.stats()
        assert s["cancelled"] == 1 and s["finished"] == 4 and s["tokens"] == 18 and s["prefills"] == 2
    finally:
        engine.close(10)


def test_rows_after_a_failed_one_go_on():
    """The decoding step fails in the round where a new sample is prefilled: the failed row sits
    before the new one in the cache; the new sample still runs to its end, as it would alone."""
    model, tok = make_model()
    forward = model.forward
    fail = threading.Event()
    engine = None

    def failing_forward(idx, *args, **kw):  # a decoding step of the round that took the arrival
        if fail.is_set() and idx.shape[1] == 1 and kw.get("input_pos") is not None and not engine._pending:
            fail.clear()
            raise RuntimeError("injected failure in a decoding step")
        return forward(idx, *args, **kw)

    model.forward = failing_forward
    engine = Engine(model, tok, max_batch=4)
    try:
        started, done = threading.Event(), threading.Semaphore(0)
        first = _seq(tok, "the ", 1, 100_000,
                     on_event=lambda kind, v: (started.set(), kind == "done" and done.release()))
        engine.submit([first])
        assert started.wait(30)
        late = _seq(tok, "the moon", 2, 20, on_event=lambda kind, v: kind == "done" and done.release())
        with engine._cond:
            fail.set()
            engine.submit([late])
        assert done.acquire(timeout=30) and done.acquire(timeout=30)
    finally:
        engine.close(10)
        model.forward = forward
    assert first.finish_reason == "error"
    reference, _ = make_model()
    alone = [int(t) for t in generate_tokens(reference, tok.encode("the moon"), max_new_tokens=20, temperature=1.0,
                                             seed=2, banned_ids=[tok.unk_id])]
    assert late.finish_reason == "length" and late.new_ids == alone


@pytest.mark.parametrize("options", [dict(temperature=0.7, top_k=5), dict(temperature=1.2, top_p=0.8),
                                     dict(temperature=1.0, repetition_penalty=20.0),
                                     dict(temperature=1.0, repetition_penalty=2.0)])
def test_each_row_samples_with_its_own_options_as_generate_does(options):
    """Rows of other options beside it: each sample equals generate_tokens with its options and seed."""
    model, tok = make_model()
    engine = Engine(model, tok, max_batch=4)
    seqs = [Sequence(tok.encode("the "), Sampling(seed=3, **options), max_new_tokens=30, tokenizer=tok),
            _seq(tok, "the ", 3, 30), _seq(tok, "a", 4, 25)]
    try:
        _run(engine, seqs)
    finally:
        engine.close(10)
    reference, _ = make_model()
    for s, (prompt, seed, n, kw) in zip(seqs, [("the ", 3, 30, options), ("the ", 3, 30, {}), ("a", 4, 25, {})]):
        kw = {"temperature": 1.0, **kw}
        alone = [int(t) for t in generate_tokens(reference, tok.encode(prompt), max_new_tokens=n, seed=seed,
                                                 banned_ids=[tok.unk_id], **kw)]
        assert s.new_ids == alone
    assert seqs[0].new_ids != seqs[1].new_ids  # the options changed the sample


def test_the_engine_runs_the_model_in_eval_mode():
    """A model handed over in training mode (dropout on) is put in eval mode: samples repeat."""
    import torch

    from gpt_small.config import GPTConfig
    from gpt_small.model import GPT

    _, tok = make_model()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32, dropout=0.5))
    model.train()
    engine = Engine(model, tok, max_batch=2)
    try:
        assert not model.training
        seqs = [_seq(tok, "the ", 5, 20), _seq(tok, "the ", 5, 20)]
        _run(engine, seqs)
    finally:
        engine.close(10)
    assert seqs[0].new_ids == seqs[1].new_ids


def test_a_samples_times_for_the_metrics():
    """submitted: when the Sequence was made; first_token_at: when its first token came (kept, not
    moved by later tokens); None while it has none (a sample cancelled in the queue)."""
    model, tok = make_model()
    engine = Engine(model, tok, max_batch=2)
    stamps: list[float] = []
    before = time.perf_counter()
    seq = _seq(tok, "the ", 0, 8)
    queued = _seq(tok, "a", 1, 8)
    queued.cancel()
    after_made = time.perf_counter()
    done = threading.Semaphore(0)
    seq.on_event = lambda kind, v: (stamps.append(time.perf_counter()), kind == "done" and done.release())
    queued.on_event = lambda kind, v: kind == "done" and done.release()
    try:
        engine.submit([seq, queued])
        assert done.acquire(timeout=30) and done.acquire(timeout=30)
    finally:
        engine.close(10)
    assert before <= seq.submitted <= after_made and before <= queued.submitted <= after_made
    assert seq.submitted < seq.first_token_at <= stamps[0]  # its first text came with its first token
    assert queued.first_token_at is None and not queued.new_ids


def test_a_stop_string_ends_the_row_at_the_token_that_completes_it():
    model, tok = make_model()
    reference, _ = make_model()
    alone = [int(t) for t in generate_tokens(reference, tok.encode("the "), max_new_tokens=40, temperature=1.0,
                                             seed=4, banned_ids=[tok.unk_id])]
    text = tok.decode(alone)
    stop = text[5:7]  # two characters of the text: the sample ends at the token that completes them
    j = text.find(stop)
    engine = Engine(model, tok, max_batch=2)
    events: list = []
    seq = _seq(tok, "the ", 4, 40, stop=[stop])
    try:
        done = threading.Event()
        seq.on_event = lambda kind, v: (events.append((kind, v)), kind == "done" and done.set())
        engine.submit([seq])
        assert done.wait(30)
        stats = _idle(engine)
    finally:
        engine.close(10)
    assert seq.finish_reason == "stop" and seq.text == text[:j] and seq.new_ids == alone[:j + 2]
    assert [e for e in events if e[0] == "done"] == [("done", "stop")] and stats["tokens"] == j + 2


def test_close_waits_no_longer_than_its_timeout():
    """A sample of 100,000 tokens is running: close(0.2) stops taking work and returns while the
    worker still writes it; cancelling the sample then lets the worker stop."""
    from gpt_small.serve.engine import ShuttingDown

    model, tok = make_model()
    engine = Engine(model, tok, max_batch=1)
    busy = _busy(engine, tok, 1)
    t0 = time.monotonic()
    engine.close(0.2)
    assert time.monotonic() - t0 < 10 and engine._thread.is_alive()
    with pytest.raises(ShuttingDown):
        engine.submit([_seq(tok, "a", 1, 3)])
    engine.cancel(busy)
    engine.close(30)
    assert not engine._thread.is_alive() and busy[0].finish_reason == "cancelled"


def test_a_fresh_engine_has_the_documented_defaults_and_a_daemon_worker():
    """`Engine(model, tok)`: the queue bound, batch and prefill defaults; every counter at zero before
    any sample (what /healthz shows at start); its decode loop on a daemon thread named for thread
    dumps, so a process that never closes it still exits."""
    from gpt_small.serve.engine import DEFAULT_MAX_BATCH, DEFAULT_PREFILL_BATCH

    model, tok = make_model()
    engine = Engine(model, tok)
    try:
        stats = engine.stats()
        assert (stats["max_queue"], stats["max_batch"], stats["prefill_batch"]) == (
            64, DEFAULT_MAX_BATCH, DEFAULT_PREFILL_BATCH)
        assert stats["window_keep"] == 32  # generate's rule: half the model's 64-token window
        assert {k: stats[k] for k in ("active", "queued", "finished", "cancelled", "tokens", "steps", "peak_batch",
                                      "prefills", "prefill_rows")} == dict.fromkeys(
            ("active", "queued", "finished", "cancelled", "tokens", "steps", "peak_batch", "prefills", "prefill_rows"), 0)
        assert [t.daemon for t in threading.enumerate() if t.name == "gpt-small-decode"] == [True]
    finally:
        engine.close(10)


def test_a_tokenizer_without_an_unknown_id_samples_every_token():
    """A byte-level BPE tokenizer has no unknown token: nothing is banned, and a sample runs to its
    budget (a char tokenizer's unknown id is never sampled: the other test files)."""
    from gpt_small.model import GPT, GPTConfig
    from gpt_small.tokenizer import train_bpe

    tok = train_bpe("the sea and the seas, the shore and the shores; " * 40, vocab_size=300)
    assert getattr(tok, "unk_id", None) is None
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()
    engine = Engine(model, tok, max_batch=2)
    assert engine.banned == []
    done = threading.Event()
    seq = _seq(tok, "the sea", 1, 12, on_event=lambda kind, v: kind == "done" and done.set())
    try:
        engine.submit([seq])
        assert done.wait(30)
    finally:
        engine.close(10)
    assert seq.finish_reason == "length" and len(seq.new_ids) == 12
