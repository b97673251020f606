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

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from starlette.testclient import TestClient  # noqa: E402

from gpt_small.serve import create_app  # noqa: E402
from serve_util import make_model  # noqa: E402

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


def sse_events(text: str) -> list:
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    return [json.loads(e[6:]) for e in [e for e in text.split("\n\n") if e][:-1]]


def test_a_failed_decode_step_reaches_a_poem_client_and_the_server_goes_on(model_tok):
    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]
    app = create_app(model=model, tokenizer=tok, model_name=NAME)
    with TestClient(app, raise_server_exceptions=False) as c:
        engine = app.state.engine
        real = engine._step

        def boom():
            raise RuntimeError("injected")

        engine._step = boom
        try:
            r = c.post("/v1/poem", json={"prompt": "a", "max_tokens": 5, "stream": True})
            assert r.status_code == 200
            events = sse_events(r.text)
            assert events[-1] == {"error": {"message": "internal error while generating (logged by the server)",
                                            "type": "server_error", "param": None, "code": None}}
            assert not any(e.get("done") for e in events)
            r = c.post("/v1/poem", json={"prompt": "a", "max_tokens": 5})
            assert r.status_code == 500
            assert r.json() == {"error": {"message": "internal error (logged by the server)", "type": "server_error",
                                          "param": None, "code": None}}
        finally:
            engine._step = real
        r = c.post("/v1/poem", json={"prompt": "a", "max_tokens": 3, "stream": True})
        events = sse_events(r.text)
        assert events[-1]["done"] is True and events[-1]["finish_reason"] == "length"
