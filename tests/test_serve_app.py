"""The app's own promises beside the routes' bodies (docs/serve.md): one log line per request
(`POST /v1/completions 200 tokens=40 ms=392`), unknown routes and methods answered 404 and 405 in
OpenAI's error shape (405 with the `Allow` header HTTP wants), and a failure injected into the
decode loop reaching a /v1/poem client as a 500 or an error event before [DONE], the server going
on."""

from __future__ import annotations

import copy
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
    """A request timed by the app's clock (here, 0.25 s between its two readings) logs ms=250 and
    adds 0.25 s to its route's duration histogram."""
    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]
    with TestClient(create_app(model=model, tokenizer=tok, model_name=NAME)) as c:
        caplog.set_level(logging.INFO, logger="gpt_small.serve")
        monkeypatch.setattr(app_module, "time", SteppingClock(0.25))
        assert c.get("/healthz").status_code == 200
        monkeypatch.setattr(app_module, "time", time)
        assert [rec.getMessage() for rec in caplog.records if rec.name == "gpt_small.serve"] == \
            ["GET /healthz 200 tokens=0 ms=250"]
        text = c.get("/metrics").text
    assert 'gpt_small_request_duration_seconds_sum{route="/healthz"} 0.25' in text
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
        # the middle is the engine's account of its queue
        assert err["message"].startswith("the server is busy: ") and err["message"].endswith("; retry shortly")
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

    from gpt_small.serve.server import make_server, serve

    docs = " ".join((Path(__file__).resolve().parents[1] / "docs" / "serve.md").read_text().split())
    default = inspect.signature(serve).parameters["drain_seconds"].default
    assert default == inspect.signature(make_server).parameters["drain_seconds"].default
    assert f"lets open requests (streams included) finish for up to {default:g} s" in docs
