"""The serve engine on its own (no HTTP): the window rule past block_size, batch-invariant rows,
a failure confined to its row, cancellation, and Sequence.feed's incremental decoding."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from gpt_small.generate import generate_tokens
from gpt_small.serve.engine import Engine, Sequence
from gpt_small.serve.protocol import Sampling
from serve_util import make_model

_REPLACEMENT = "\ufffd"


class ByteTokenizer:
    """Byte-level ids: one token may be part of a UTF-8 character (as in byte-level BPE)."""

    vocab_size = 256

    def decode(self, ids) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def reference_feed(ids: list[int], tok, stop: list[str], keep_stop: bool, lines: int | None, max_new: int):
    """The rule Sequence.feed implements, computed on the whole text at every token: (text, reason)."""
    for n in range(1, len(ids) + 1):
        text = tok.decode(ids[:n])
        end = len(text)
        if lines is not None and text.count("\n") >= lines:
            k = -1
            for _ in range(lines):
                k = text.find("\n", k + 1)
            end = k + 1
        stopped = False
        for s in stop:
            k = text.find(s)
            if k >= 0:
                end, stopped = min(end, k + len(s) if keep_stop else k), True
        if stopped or end < len(text) or (lines is not None and text.count("\n") >= lines):
            return text[:end], "stop"
        if n >= max_new:
            return text[:end], "length"
    return text[:end], None


@pytest.mark.parametrize("trial", range(40))
def test_feed_incremental_equals_decoding_the_whole_text(trial):
    rnd = random.Random(trial)
    pieces = ["a", "b", " ", "\n", "é", "€", "😀", "ab", "\ufffd"]
    text = "".join(rnd.choice(pieces) for _ in range(60))
    ids = list(text.encode("utf-8"))
    stop = rnd.choice([[], ["€"], ["b\n", "😀"], ["ab a"]])
    keep_stop, lines = rnd.random() < 0.5, rnd.choice([None, 1, 3])
    max_new = rnd.randint(1, len(ids))
    events = []
    seq = Sequence([0], Sampling(), max_new_tokens=max_new, tokenizer=ByteTokenizer(), stop=stop,
                   keep_stop=keep_stop, lines=lines, on_event=lambda kind, v: events.append((kind, v)))
    for token in ids:
        if seq.feed(token) or len(seq.new_ids) >= max_new:
            break
    seq.finish("length")
    want_text, want_reason = reference_feed(ids, ByteTokenizer(), stop, keep_stop, lines, max_new)
    assert seq.text == want_text
    assert seq.finish_reason == (want_reason or "length")
    streamed = "".join(v for kind, v in events if kind == "text")
    assert streamed == want_text  # the pieces concatenate to the text
    assert events[-1] == ("done", seq.finish_reason)


def _run(engine: Engine, seqs: list[Sequence], timeout: float = 30.0) -> None:
    done = threading.Semaphore(0)
    for s in seqs:
        inner = s.on_event

        def on_event(kind, value, inner=inner):
            inner(kind, value)
            if kind == "done":
                done.release()
        s.on_event = on_event
    engine.submit(seqs)
    for _ in seqs:
        assert done.acquire(timeout=timeout), "the engine did not finish in time"


def _seq(tok, prompt: str, seed: int, n: int, **kw) -> Sequence:
    return Sequence(tok.encode(prompt), Sampling(temperature=1.0, seed=seed), max_new_tokens=n, tokenizer=tok, **kw)


@pytest.mark.parametrize("keep", [None, "slide", 5])
def test_rows_past_the_window_equal_generate_alone(keep):
    """Sequences of 150 tokens on a 64-token window, at different points of their lives in one
    batch: each equals generate_tokens alone with the same seed and window rule."""
    model, tok = make_model()
    engine = Engine(model, tok, max_batch=4, keep=keep)
    try:
        # the third shares the first's prompt: copied from its row, not prefilled again; the last
        # is cropped to the window
        prompts = ["the ", "a", "the ", "x" * 70]
        seqs = [_seq(tok, p, 10 + i, 150 - 20 * i) for i, p in enumerate(prompts)]
        _run(engine, seqs)
    finally:
        engine.close(10)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        alone = [int(t) for t in generate_tokens(model, tok.encode(p), max_new_tokens=150 - 20 * i,
                                                 temperature=1.0, seed=10 + i, keep=keep, banned_ids=[tok.unk_id])]
        assert s.new_ids == alone, f"sequence {i} differs from generate alone"
        assert s.finish_reason == "length"


class FailingTokenizer:
    """The char tokenizer, except that its `after`-th decode fails (one sequence's 5th token)."""

    def __init__(self, tok, after: int):
        self.tok, self.after, self.calls = tok, after, 0

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def decode(self, ids):
        self.calls += 1
        if self.calls == self.after:
            raise RuntimeError("injected failure")
        return self.tok.decode(ids)


def test_a_failure_in_one_row_ends_that_row_with_an_error_and_the_others_go_on():
    model, tok = make_model()
    engine = Engine(model, tok, max_batch=4)
    try:
        good = [_seq(tok, "the ", 1, 90), _seq(tok, "a", 2, 90)]
        bad = Sequence(tok.encode("and "), Sampling(temperature=1.0, seed=3), max_new_tokens=90,
                       tokenizer=FailingTokenizer(tok, 5))
        bad_events = []
        bad.on_event = lambda kind, v: bad_events.append((kind, v))
        _run(engine, [good[0], bad, good[1]])
        assert bad.finish_reason == "error" and bad_events[-1] == ("done", "error")
        assert len(bad.new_ids) == 5
        reference, _ = make_model()  # the same weights; the engine's model keeps the engine's cache
        for s, (p, seed) in zip(good, (("the ", 1), ("a", 2))):
            alone = [int(t) for t in generate_tokens(reference, tok.encode(p), max_new_tokens=90, temperature=1.0,
                                                     seed=seed, banned_ids=[tok.unk_id])]
            assert s.finish_reason == "length" and s.new_ids == alone
        # and the engine keeps serving
        again = _seq(tok, "the ", 1, 20)
        _run(engine, [again])
        assert again.finish_reason == "length" and again.new_ids == good[0].new_ids[:20]
    finally:
        engine.close(10)


def test_cancel_frees_the_row_at_the_next_step():
    model, tok = make_model()
    engine = Engine(model, tok, max_batch=2)
    try:
        first_token = threading.Event()
        long = _seq(tok, "the ", 1, 100_000, on_event=lambda kind, v: first_token.set())
        done = threading.Event()
        inner = long.on_event
        long.on_event = lambda kind, v: (inner(kind, v), kind == "done" and done.set())
        engine.submit([long])
        assert first_token.wait(30)
        engine.cancel([long])
        assert done.wait(30) and long.finish_reason == "cancelled"
        assert len(long.new_ids) < 100_000
        assert engine.stats()["active"] == 0
    finally:
        engine.close(10)


def test_the_default_max_batch_is_the_measured_32():
    from gpt_small.serve.engine import DEFAULT_MAX_BATCH

    model, tok = make_model()
    engine = Engine(model, tok)
    try:
        assert DEFAULT_MAX_BATCH == 32 and engine.stats()["max_batch"] == 32
        assert model.kv_cache.layers[0].k.shape[0] == 32  # one cache row per batch row
    finally:
        engine.close(10)


def test_a_failed_stream_ends_with_an_openai_error_event_and_the_server_goes_on():
    """Through the real app: the failing sample's stream ends with an error event (OpenAI's shape)
    before [DONE], not with a finish_reason that would read as a finished text."""
    import json

    pytest.importorskip("httpx")
    from starlette.testclient import TestClient

    from gpt_small.serve import create_app

    model, tok = make_model()
    failing = FailingTokenizer(tok, 5)
    app = create_app(model=model, tokenizer=failing, model_name="tiny", max_batch=4, max_new_tokens=50)
    with TestClient(app) as client:
        failing.calls = 0  # the 5th decode from here: the sample's 5th token
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "the ", "max_tokens": 20,
                                                 "stream": True, "seed": 1})
        events = [e[6:] for e in r.text.split("\n\n") if e]
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert set(last) == {"error"} and last["error"]["type"] == "server_error"
        assert {"message", "type", "param", "code"} <= set(last["error"])
        assert all(c["finish_reason"] is None for e in events[:-2] for c in json.loads(e)["choices"])
        ok = client.post("/v1/completions", json={"model": "tiny", "prompt": "the ", "max_tokens": 20, "seed": 1})
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"


def test_a_non_streamed_request_whose_client_left_frees_its_row_at_once(tmp_path):
    """A real server and a real socket: the client sends a long non-streamed request and closes
    the connection; the row is freed within a few steps, not after the 50,000 tokens."""
    import json
    import socket
    import time
    import urllib.request

    from serve_util import live_server, make_checkpoint

    run = make_checkpoint(tmp_path / "run")
    with live_server(run, "--max-new-tokens", "50000") as (url, _, err):
        host, port = url.removeprefix("http://").split(":")

        def health() -> dict:
            return json.load(urllib.request.urlopen(f"{url}/healthz", timeout=10))

        deadline = time.monotonic() + 60
        while True:  # the address is printed before uvicorn listens
            try:
                health()
                break
            except OSError:
                assert time.monotonic() < deadline, "".join(err)
                time.sleep(0.1)
        body = json.dumps({"model": "run", "prompt": "the ", "max_tokens": 50000, "seed": 1}).encode()
        sock = socket.create_connection((host, int(port)))
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 30
        while health()["active"] == 0:  # wait until it decodes
            assert time.monotonic() < deadline, "".join(err)
            time.sleep(0.05)
        sock.close()
        left = time.monotonic()
        while (h := health())["active"] != 0:
            assert time.monotonic() - left < 5, f"the row was not freed: {h}"
            time.sleep(0.05)
        assert h["cancelled"] == 1 and h["tokens"] < 50000
