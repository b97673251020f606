"""The app's own promises beside the routes' bodies (docs/serve.md): one log line per request
(`POST /v1/completions 200 tokens=40 ms=392`), unknown routes and methods answered 404 and 405 in
OpenAI's error shape (405 with the `Allow` header HTTP wants), and a failure injected into the
decode loop reaching a /v1/poem client as a 500 or an error event before [DONE], the server going
on."""

from __future__ import annotations

import copy
import json
import logging
import re
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from starlette.testclient import TestClient  # noqa: E402

from gpt_small.serve import app as app_module  # noqa: E402
from gpt_small.serve import create_app  # noqa: E402
from serve_util import failing_decode_steps, make_model, sse_events  # noqa: E402

NAME = "tiny-poet"


@pytest.fixture(scope="module")
def model_tok():
    return make_model()


@pytest.fixture(scope="module")
def client(model_tok):
    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]
    with TestClient(create_app(model=model, tokenizer=tok, model_name=NAME, max_new_tokens=8)) as c:
        yield c


def test_one_log_line_per_request(client, caplog):
    caplog.set_level(logging.INFO, logger="gpt_small.serve")
    r = client.post("/v1/completions", json={"model": NAME, "prompt": "a", "max_tokens": 3, "n": 2,
                                             "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6
    client.post("/v1/completions", json={"model": NAME, "prompt": "a", "max_tokens": 0})
    client.get("/healthz")
    client.get("/no/such/route")
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "gpt_small.serve"]
    expected = [r"POST /v1/completions 200 tokens=6 ms=\d+", r"POST /v1/completions 400 tokens=0 ms=\d+",
                r"GET /healthz 200 tokens=0 ms=\d+", r"GET /no/such/route 404 tokens=0 ms=\d+"]
    assert len(lines) == len(expected), lines
    for line, pattern in zip(lines, expected):
        assert re.fullmatch(pattern, line), (line, pattern)
    assert all(rec.levelno == logging.INFO for rec in caplog.records if rec.name == "gpt_small.serve")


class SteppingClock:
    """time as the app module sees it, with perf_counter stepping by `step` s per reading."""

    def __init__(self, step: float):
        self.step, self.now = step, 1000.0

    def perf_counter(self) -> float:
        self.now += self.step
        return self.now

    def __getattr__(self, name: str):
        return getattr(time, name)


def test_the_log_line_and_the_metrics_time_a_request_in_its_units(model_tok, caplog, monkeypatch):
    """A request timed by the app's clock (here, 2.5 s between its two readings) logs ms=2500 and
    adds 2.5 s to its route's duration histogram."""
    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]
    with TestClient(create_app(model=model, tokenizer=tok, model_name=NAME)) as c:
        caplog.set_level(logging.INFO, logger="gpt_small.serve")
        monkeypatch.setattr(app_module, "time", SteppingClock(2.5))
        assert c.get("/healthz").status_code == 200
        monkeypatch.setattr(app_module, "time", time)
        assert [rec.getMessage() for rec in caplog.records if rec.name == "gpt_small.serve"] == \
            ["GET /healthz 200 tokens=0 ms=2500"]
        text = c.get("/metrics").text
    assert 'gpt_small_request_duration_seconds_sum{route="/healthz"} 2.5' in text
    assert 'gpt_small_request_duration_seconds_count{route="/healthz"} 1.0' in text


def test_unknown_routes_and_methods_in_openais_shape(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404
    assert r.json() == {"error": {"message": "no route /v1/nothing", "type": "invalid_request_error",
                                  "param": None, "code": None}}
    for method, path, allowed in (("GET", "/v1/completions", "POST"), ("PUT", "/v1/poem", "POST"),
                                  ("DELETE", "/v1/chat/completions", "POST")):
        r = client.request(method, path)
        assert r.status_code == 405
        assert r.json()["error"]["message"] == f"{method} is not allowed on {path}"
        assert r.headers["allow"] == allowed
    r = client.post("/healthz", content=b"{}", headers={"Content-Type": "application/json"})
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "HEAD"}
    r = client.get("/v1/models/other")
    assert r.status_code == 404 and r.json()["error"] == {
        "message": "the model 'other' does not exist", "type": "invalid_request_error", "param": "model",
        "code": "model_not_found"}


def test_a_failed_decode_step_reaches_a_poem_client_and_the_server_goes_on(model_tok, caplog):
    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]
    app = create_app(model=model, tokenizer=tok, model_name=NAME)
    with TestClient(app, raise_server_exceptions=False) as c:
        with failing_decode_steps(app):
            r = c.post("/v1/poem", json={"prompt": "a", "max_tokens": 5, "stream": True})
            assert r.status_code == 200
            events = sse_events(r.text)
            assert events[-1] == {"error": {"message": "internal error while generating (logged by the server)",
                                            "type": "server_error", "param": None, "code": None}}
            assert not any(e.get("done") for e in events)
            caplog.clear()
            caplog.set_level(logging.INFO, logger="gpt_small.serve")
            r = c.post("/v1/poem", json={"prompt": "a", "max_tokens": 5})
            assert r.status_code == 500
            logged = [rec.getMessage() for rec in caplog.records
                      if rec.name == "gpt_small.serve" and rec.levelno == logging.INFO]
            assert len(logged) == 1 and re.fullmatch(r"POST /v1/poem 500 tokens=0 ms=\d+", logged[0]), logged
            assert r.json() == {"error": {"message": "internal error (logged by the server)", "type": "server_error",
                                          "param": None, "code": None}}
            # what the server's log shows for it (uvicorn logs the exception the app raised)
            with pytest.raises(RuntimeError, match=r"^the decode loop failed \(logged\)$"):
                TestClient(app).post("/v1/poem", json={"prompt": "a", "max_tokens": 5})
        # counted as they were answered: the stream began 200, the two others are 500s
        metrics = c.get("/metrics").text
        assert 'gpt_small_requests_total{route="/v1/poem",status="500"} 2.0' in metrics
        assert 'gpt_small_requests_total{route="/v1/poem",status="200"} 1.0' in metrics
        r = c.post("/v1/poem", json={"prompt": "a", "max_tokens": 3, "stream": True})
        events = sse_events(r.text)
        assert events[-1]["done"] is True and events[-1]["finish_reason"] == "length"


def test_busy_and_draining_answers_in_openais_shape(model_tok):
    """A full queue is 429 (rate_limit_exceeded, retry in a second); a server going away is 503
    (service_unavailable, retry elsewhere), each with Retry-After as docs/serve.md says."""
    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]
    app = create_app(model=model, tokenizer=tok, model_name=NAME, max_batch=1, max_queue=0)
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"model": NAME, "prompt": "a", "n": 2, "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        err = r.json()["error"]
        assert (err["type"], err["param"], err["code"]) == ("requests", None, "rate_limit_exceeded")
        # the middle is the engine's account of its queue: how many wait, and its bound
        assert err["message"] == "the server is busy: 0 samples are waiting (the queue holds 0); retry shortly"
        app.state.draining = True
        r = c.post("/v1/poem", json={"prompt": "a", "max_tokens": 2})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert r.json()["error"] == {
            "message": "the server is shutting down; retry on another server or once it is back",
            "type": "server_error", "param": None, "code": "service_unavailable"}
        app.state.draining = False
        assert c.post("/v1/poem", json={"prompt": "a", "max_tokens": 2}).status_code == 200


def test_the_drain_time_is_the_documented_one():
    import inspect
    from pathlib import Path

    from gpt_small.serve.server import serve

    docs = " ".join((Path(__file__).resolve().parents[1] / "docs" / "serve.md").read_text().split())
    default = inspect.signature(serve).parameters["drain_seconds"].default  # make_server is always given one
    assert f"lets open requests (streams included) finish for up to {default:g} s" in docs


@pytest.mark.parametrize("weights", ["float32", "int8"])
def test_the_model_objects_name_the_weights_served_and_the_servers_start(model_tok, weights):
    """`/v1/models` lists the one model object `/v1/models/{id}` returns: its `created` is when the
    app was made (Unix seconds, as OpenAI's), its `weights` those being served, as `/healthz` says,
    which counts the float32 model's parameters in int8 too."""
    from gpt_small.ops.quantize import convert_weights

    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]
    params = model.num_params()
    convert_weights(model, weights)
    before = int(time.time())
    app = create_app(model=model, tokenizer=tok, model_name=NAME)
    after = int(time.time())
    with TestClient(app) as c:
        listed = c.get("/v1/models").json()
        card = c.get(f"/v1/models/{NAME}").json()
        health = c.get("/healthz").json()
    assert listed == {"object": "list", "data": [card]}
    assert card["id"] == NAME and card["weights"] == weights == health["weights"]
    assert health["params"] == params  # the model's parameters, however its weights are stored
    assert type(card["created"]) is int and before <= card["created"] <= after


def test_any_other_http_error_keeps_its_status_and_reason_in_openais_shape():
    """Starlette raises more than 404 and 405 (a static file it may not read is a 401): the handler
    answers each in OpenAI's shape with the status, its standard reason and the exception's headers."""
    import asyncio
    from http import HTTPStatus

    from starlette.exceptions import HTTPException
    from starlette.requests import Request

    request = Request({"type": "http", "method": "GET", "path": "/static/x", "headers": [], "query_string": b""})
    for status, headers in ((401, None), (400, {"X-Why": "a"}), (416, {"Content-Range": "bytes */10"})):
        r = asyncio.run(app_module.http_error(request, HTTPException(status, headers=headers)))
        assert r.status_code == status
        assert json.loads(r.body) == {"error": {"message": HTTPStatus(status).phrase,
                                                "type": "invalid_request_error", "param": None, "code": None}}
        assert {k: v for k, v in r.headers.items() if k not in ("content-length", "content-type")} == \
            {k.lower(): v for k, v in (headers or {}).items()}


SSE_HEADERS = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache",
               "x-accel-buffering": "no"}


def streamed(client, path: str, body: dict) -> list[dict]:
    """The events of a streamed request, after checking the headers every stream carries (no cache,
    no proxy buffering)."""
    r = client.post(path, json={**body, "stream": True})
    assert r.status_code == 200, r.text
    assert {k: r.headers.get(k) for k in SSE_HEADERS} == SSE_HEADERS
    return sse_events(r.text)


def one_header(chunks: list[dict], prefix: str, obj: str) -> None:
    """Every chunk of a stream has the stream's one id (`prefix-`...), created time, model and object."""
    assert len({(c["id"], c["created"]) for c in chunks}) == 1, chunks
    assert chunks[0]["id"].startswith(prefix) and type(chunks[0]["created"]) is int
    assert abs(chunks[0]["created"] - time.time()) < 60
    assert {(c["model"], c["object"]) for c in chunks} == {(NAME, obj)}


def joined(parts: list[dict | None], keys: tuple[str, ...]) -> dict:
    """Per-chunk logprobs joined key by key (a key that is null in every chunk stays null)."""
    parts = [p for p in parts if p is not None]
    return {k: None if all(p[k] is None for p in parts) else [x for p in parts for x in p[k]] for k in keys}


@pytest.mark.parametrize("body", [
    {"prompt": "The sea", "max_tokens": 8, "n": 2, "seed": 3, "echo": True},
    {"prompt": "The sea", "max_tokens": 8, "n": 2, "seed": 3, "logprobs": 2, "stop": ["e", "\n"]},
    {"prompt": ["Rain", "a"], "max_tokens": 6, "seed": 9, "logprobs": 0, "stream_options": {"include_usage": True}},
])
def test_a_streamed_completion_is_the_completion_in_pieces(client, body):
    """Each choice's chunks join into the non-streamed choice: its text (the echo once, first), its
    finish_reason on its last chunk, its logprobs token by token with the same offsets; one id,
    created and model for every chunk; usage last when asked for."""
    body = {"model": NAME, **body}
    whole = client.post("/v1/completions", json=body).json()
    one_header([whole], "cmpl-", "text_completion")
    chunks = streamed(client, "/v1/completions", body)
    one_header(chunks, "cmpl-", "text_completion")
    if "stream_options" in body:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
        chunks = chunks[:-1]
    assert all(len(c["choices"]) == 1 for c in chunks)
    assert {c["choices"][0]["index"] for c in chunks} == {w["index"] for w in whole["choices"]}
    for want in whole["choices"]:
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == want["index"]]
        assert "".join(c["text"] for c in mine) == want["text"]
        assert [c["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + [want["finish_reason"]]
        keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
        got = None if "logprobs" not in body else joined([c["logprobs"] for c in mine], keys)
        assert got == want["logprobs"]
        # a chunk's logprobs are those of its own text (one character per token here)
        assert all("".join(c["logprobs"]["tokens"]) == c["text"] for c in mine if c["logprobs"] is not None)
        assert "logprobs" not in body or all(c["logprobs"] is not None for c in mine if c["text"])
        assert mine[-1]["text"] or mine[-1]["logprobs"] is None  # an ending with no text has no tokens left


def test_a_choice_that_stops_before_any_text_streams_its_echo_and_its_end(client):
    body = {"model": NAME, "prompt": "The sea", "max_tokens": 8, "seed": 4, "temperature": 0}
    first = client.post("/v1/completions", json=body).json()["choices"][0]["text"][0]
    body = {**body, "n": 2, "echo": True, "stop": [first]}  # the first character it writes ends it
    whole = client.post("/v1/completions", json=body).json()
    assert [(c["text"], c["finish_reason"]) for c in whole["choices"]] == [("The sea", "stop")] * 2
    chunks = streamed(client, "/v1/completions", body)
    assert sorted((c["choices"][0]["index"], c["choices"][0]["text"], c["choices"][0]["finish_reason"])
                  for c in chunks) == [(0, "The sea", "stop"), (1, "The sea", "stop")]


@pytest.mark.parametrize("body", [
    {"max_tokens": 8, "n": 2, "seed": 3, "logprobs": True, "top_logprobs": 2, "stop": ["e", "\n"]},
    {"max_tokens": 6, "seed": 9, "stream_options": {"include_usage": True}},
])
def test_a_streamed_chat_completion_is_the_chat_completion_in_pieces(client, body):
    """Each choice opens with the assistant's role and empty content, its deltas join into the
    message, its finish_reason comes on its last chunk (an empty delta), its logprobs token by token;
    one id, created and model for every chunk; usage last when asked for."""
    body = {"model": NAME, "messages": [{"role": "user", "content": "The sea"}], **body}
    whole = client.post("/v1/chat/completions", json=body).json()
    one_header([whole], "chatcmpl-", "chat.completion")
    chunks = streamed(client, "/v1/chat/completions", body)
    one_header(chunks, "chatcmpl-", "chat.completion.chunk")
    if "stream_options" in body:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
        chunks = chunks[:-1]
    assert {c["choices"][0]["index"] for c in chunks} == {w["index"] for w in whole["choices"]}
    for want in whole["choices"]:
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == want["index"]]
        assert mine[0] == {"index": want["index"], "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None}
        middle, last = mine[1:-1], mine[-1]
        assert "".join(c["delta"]["content"] for c in middle) == want["message"]["content"]
        assert all(c["finish_reason"] is None and set(c["delta"]) == {"content"} for c in middle)
        assert last["delta"] == {} and last["finish_reason"] == want["finish_reason"]
        assert last["logprobs"] is None  # every token came with its text (one character each here)
        if want["logprobs"] is None:
            assert all(c["logprobs"] is None for c in mine)
        else:
            parts = [c["logprobs"] for c in mine if c["logprobs"] is not None]
            assert all(p["refusal"] is None for p in parts)
            assert [t for p in parts for t in p["content"]] == want["logprobs"]["content"]
            assert all("".join(t["token"] for t in c["logprobs"]["content"]) == c["delta"]["content"]
                       for c in middle if c["logprobs"] is not None)


@pytest.mark.parametrize("form", [{}, {"syllables": 4}])
def test_a_poem_names_itself_its_model_and_its_timing_streamed_or_not(client, form):
    """A free-verse poem and one in a form: a fresh `poem-` id, the model served, the time to its
    first token within its whole time; streamed with the same ending object."""
    body = {"prompt": "The sea\n", "lines": 1, "seed": 1, "max_tokens": 8, **form}
    if form:
        body.pop("max_tokens")
    a = client.post("/v1/poem", json=body).json()
    assert re.fullmatch(r"poem-[0-9a-f]{24}", a["id"])
    assert a["object"] == "poem" and a["model"] == NAME and a["poem"] == "The sea\n" + a["text"]
    assert ("form" in a) == bool(form)
    t = a["timing"]
    assert 0 <= t["ttft_ms"] <= t["ms"] and t["tokens"] == a["usage"]["completion_tokens"] > 0
    events = streamed(client, "/v1/poem", body)
    done = events[-1]
    assert done["done"] is True and re.fullmatch(r"poem-[0-9a-f]{24}", done["id"]) and done["id"] != a["id"]
    assert done["model"] == NAME
    assert done["text"] == a["text"] == "".join(e["text"] for e in events[:-1])


@pytest.fixture(scope="module")
def bpe_client():
    """The app over a tiny model whose tokens are byte-level BPE pieces of several characters."""
    import torch

    from gpt_small.model import GPT, GPTConfig
    from gpt_small.tokenizer import train_bpe

    tok = train_bpe("the sea and the seas, the shore and the shores; " * 40, vocab_size=300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()
    with TestClient(create_app(model=model, tokenizer=tok, model_name=NAME, max_new_tokens=40)) as c:
        yield c


def scored(route: str, choice: dict) -> tuple[str, list]:
    """(text, [(token, logprob)]) of a completion's or a chat's choice."""
    if route == "/v1/completions":
        lp = choice["logprobs"]
        return choice["text"], list(zip(lp["tokens"], lp["token_logprobs"]))
    return choice["message"]["content"], [(t["token"], t["logprob"]) for t in choice["logprobs"]["content"]]


def streamed_scored(route: str, chunks: list[dict]) -> tuple[str, list, str]:
    """(text, [(token, logprob)], finish_reason) of a one-choice stream, after checking that no
    chunk but the last hands out a token whose text has not all been sent yet."""
    choices = [c["choices"][0] for c in chunks]
    pieces, toks = [], []
    for c in choices:
        if route == "/v1/completions":
            pieces.append(c["text"])
            lp = c["logprobs"] or {"tokens": [], "token_logprobs": []}
            toks += zip(lp["tokens"], lp["token_logprobs"])
        else:
            pieces.append(c["delta"].get("content", ""))
            toks += [(t["token"], t["logprob"]) for t in (c["logprobs"] or {"content": []})["content"]]
        if c is not choices[-1]:
            assert len("".join(t for t, _ in toks)) <= len("".join(pieces)), (pieces, toks)
    return "".join(pieces), toks, choices[-1]["finish_reason"]


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_token_cut_by_a_stop_string_keeps_its_logprob(bpe_client, route, stream):
    """A stop string that begins inside a token ends the text there, and that token, whose text
    starts before the end, keeps its logprob (the whole answer's and the stream's alike)."""
    body = {"model": NAME, "max_tokens": 30, "seed": 1, "logprobs": True if "chat" in route else 1,
            **({"messages": [{"role": "user", "content": "the"}]} if "chat" in route else {"prompt": "the"})}
    text, tokens = scored(route, bpe_client.post(route, json=body).json()["choices"][0])
    starts = [sum(len(t) for t, _ in tokens[:i]) for i in range(len(tokens))]
    cut = next((o + 1 for (t, _), o in zip(tokens, starts) if len(t) > 1 and text.find(text[o + 1:o + 4]) == o + 1),
               None)
    assert cut is not None, tokens
    body["stop"] = [text[cut:cut + 3]]
    if not stream:
        choice = bpe_client.post(route, json=body).json()["choices"][0]
        got, reason = scored(route, choice), choice["finish_reason"]
    else:
        *got, reason = streamed_scored(route, streamed(bpe_client, route, body))
    assert tuple(got) == (text[:cut], [tok for tok, o in zip(tokens, starts) if o < cut]) and reason == "stop"


def test_the_body_is_bounded_in_size_at_its_edge_and_in_time(model_tok):
    """`max_body_bytes` bytes of body are read, one more is a 413; a body still arriving after
    `body_seconds` is a 408 (over a real uvicorn, the body sent in part); each message names the limit."""
    import socket

    from gpt_small.serve.protocol import HttpLimits
    from serve_util import uvicorn_thread

    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]
    http = HttpLimits(max_body_bytes=100, body_seconds=0.5)
    app = create_app(model=model, tokenizer=tok, model_name=NAME, http=http)
    core = json.dumps({"model": NAME, "prompt": "a", "max_tokens": 1}).encode()
    with TestClient(app) as c:
        for size, status in ((http.max_body_bytes, 200), (http.max_body_bytes + 1, 413)):
            body = core[:-1] + b" " * (size - len(core)) + b"}"
            r = c.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == status, (size, r.text)
        assert r.json()["error"] == {"message": "the request body is larger than 100 bytes",
                                     "type": "invalid_request_error", "param": None, "code": None}
    with uvicorn_thread(app, http, drain_seconds=1) as address:
        s = socket.create_connection(address)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(core) + core[:5])
        s.settimeout(10)
        got = b""
        while b"\r\n\r\n" not in got or len(got.partition(b"\r\n\r\n")[2]) < int(
                re.search(rb"(?im)^content-length: *(\d+)", got)[1]):
            got += s.recv(4096) or pytest.fail(f"closed before the whole answer: {got[:200]!r}")
        s.close()
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), got[:200]
    assert json.loads(body)["error"]["message"] == "the request body did not arrive within 0.5 s"


def test_a_client_that_leaves_frees_its_rows_and_is_logged_so(model_tok, caplog, monkeypatch):
    """Over a real uvicorn: a stream and a non-streamed request of two samples whose client closes
    the socket each free their rows long before their 2,000 tokens, count as cancelled, and log
    their line with `(client left)`. The app's periodic check for a client that left is put off
    (a minute), so what frees them is the disconnect itself, at once."""
    import socket

    from gpt_small.serve.protocol import HTTP_LIMITS
    from serve_util import uvicorn_thread

    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]
    app = create_app(model=model, tokenizer=tok, model_name=NAME, max_new_tokens=2000)
    caplog.set_level(logging.INFO, logger="gpt_small.serve")
    monkeypatch.setattr(app_module, "_POLL", 60.0)

    def health() -> dict:
        return app.state.engine.stats()

    def until(check, seconds: float = 10):
        deadline = time.monotonic() + seconds
        while not check():
            assert time.monotonic() < deadline, health()
            time.sleep(0.02)

    with uvicorn_thread(app, HTTP_LIMITS, drain_seconds=1) as address:
        for done, (body, rows) in enumerate((({"stream": True}, 1), ({"n": 2}, 2)), start=1):
            before = health()
            payload = json.dumps({"model": NAME, "prompt": "The sea", "max_tokens": 2000, **body}).encode()
            s = socket.create_connection(address)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
            until(lambda: health()["active"] == rows)
            s.close()
            until(lambda: health()["active"] == 0 and health()["cancelled"] == before["cancelled"] + rows)
            assert health()["tokens"] - before["tokens"] < rows * 2000
            until(lambda: len([r for r in caplog.records if r.name == "gpt_small.serve"]) == done)
    lines = [r.getMessage() for r in caplog.records if r.name == "gpt_small.serve"]
    assert len(lines) == 2 and all(re.fullmatch(r"POST /v1/completions 200 tokens=\d+ ms=\d+ \(client left\)", line)
                                   for line in lines), lines


def test_an_app_made_with_the_defaults_has_the_servers_documented_limits(model_tok):
    """`create_app` left to its defaults is `gpt-small serve` left to its own: a queue of 64
    (`/healthz` reports it), at most 1000 new tokens and 4096 prompt tokens (each refused one past,
    naming the field)."""
    from pathlib import Path

    docs = " ".join((Path(__file__).resolve().parents[1] / "docs" / "serve.md").read_text().split())
    assert "[--max-queue 64] [--max-new-tokens 1000]" in docs and "a prompt past 4,096 tokens (400)" in docs
    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]
    with TestClient(create_app(model=model, tokenizer=tok, model_name=NAME)) as c:
        assert c.get("/healthz").json()["max_queue"] == 64
        r = c.post("/v1/completions", json={"model": NAME, "prompt": "a", "max_tokens": 1001})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens" and "1000" in r.text
        r = c.post("/v1/completions", json={"model": NAME, "prompt": "a" * 4097, "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "4096" in r.text


@pytest.mark.parametrize("stream", [False, True])
def test_the_check_for_a_client_that_left_does_not_disturb_a_request_that_stays(model_tok, monkeypatch, stream):
    """With the app's periodic check for a client that left run every millisecond (many times per
    request, and while nothing is ready), a client that stays gets its whole answer, equal to the one
    it gets when the check never runs."""
    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]
    body = {"model": NAME, "prompt": "The sea", "max_tokens": 60, "n": 3, "seed": 2, "stream": stream}
    answers = []
    for poll in (60.0, 0.001):
        monkeypatch.setattr(app_module, "_POLL", poll)
        with TestClient(create_app(model=copy.deepcopy(model), tokenizer=tok, model_name=NAME)) as c:
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            if stream:
                chunks = sse_events(r.text)
                answers.append(sorted((ch["choices"][0]["index"], ch["choices"][0]["text"]) for ch in chunks))
            else:
                answers.append([(ch["text"], ch["finish_reason"]) for ch in r.json()["choices"]])
            assert c.get("/healthz").json()["cancelled"] == 0
    assert answers[0] == answers[1]


def test_an_asgi_server_without_lifespan_state_is_served_and_logged(model_tok, caplog):
    """ASGI makes the scope's "state" optional (a server without lifespan state sends none): the
    app answers and logs such a request as any other."""
    import asyncio

    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]
    app = create_app(model=model, tokenizer=tok, model_name=NAME)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": "/v1/models", "raw_path": b"/v1/models", "root_path": "", "query_string": b"",
             "headers": [(b"host", b"localhost")], "client": ("127.0.0.1", 5000), "server": ("localhost", 80)}
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    with TestClient(app):  # the engine's lifespan runs; the request itself goes straight to the app
        caplog.set_level(logging.INFO, logger="gpt_small.serve")
        asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    body = b"".join(m.get("body", b"") for m in sent[1:])
    assert json.loads(body)["data"][0]["id"] == NAME
    assert [rec.getMessage() for rec in caplog.records if rec.name == "gpt_small.serve"][-1].startswith(
        "GET /v1/models 200 tokens=0 ms=")
