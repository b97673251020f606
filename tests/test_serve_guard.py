"""The checks before any route (serve/guard.py), in the app: the Host names a keyless loopback
server answers to, JSON-only POSTs, the header-size refusal at its exact edge, each refusal in
OpenAI's error shape as JSON; and the `route` label of /metrics, which is the route's path for
every route of the app and `other` for any unknown path (docs/serve.md), so a client cannot make
new labels."""

from __future__ import annotations

import copy
import json
import socket
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from starlette.routing import Mount  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from gpt_small.serve import create_app  # noqa: E402
from gpt_small.serve.app import ROUTES  # noqa: E402
from gpt_small.serve.guard import LOOPBACK_HOSTS, request_head_bytes  # noqa: E402
from gpt_small.serve.protocol import HTTP_LIMITS, HttpLimits  # noqa: E402
from serve_util import make_model, uvicorn_thread  # noqa: E402

NAME = "tiny-poet"
DOCS = " ".join((Path(__file__).resolve().parents[1] / "docs" / "serve.md").read_text().split())
BODY = json.dumps({"model": NAME, "prompt": "a", "max_tokens": 1}).encode()


@pytest.fixture(scope="module")
def model_tok():
    return make_model()


def refused(r, status: int, code: str) -> dict:
    """A refusal in OpenAI's error shape, sent as JSON."""
    assert r.status_code == status, (r.status_code, r.text[:200])
    assert r.headers["content-type"] == "application/json"
    assert int(r.headers["content-length"]) == len(r.content)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code
    assert err["type"] == "invalid_request_error" and err["param"] is None
    assert err["message"] and "\n" not in err["message"]
    return err


HOST_REFUSED = ("the Host header names a host this server does not answer to "
                "(it answers to 127.0.0.1, ::1, localhost only)")


def malformed(name: str) -> list[str]:
    """Host headers that are not `name[:port]` though they hold the name: a bracket left open or
    closed twice, text after the bracket or the port, a port not of digits, two ports."""
    return [f"[{name}", f"[{name}x", f"[{name}]x", f"[{name}]:80]", f"[{name}]]", f"[{name}]:8o", f"{name}]",
            f"{name}:8o", f"{name}:80x", f"{name}:80:", f"{name}:80 x", f"x[{name}]"]


def test_loopback_host_names_with_and_without_ports(model_tok):
    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]
    app = create_app(model=model, tokenizer=tok, model_name=NAME, max_new_tokens=2,
                     allowed_hosts=[h.upper() for h in LOOPBACK_HOSTS])  # names are compared in any case
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        for host in ("localhost", "Localhost:8000", "127.0.0.1:80", "[::1]", "[::1]:8000", "::1", "localhost:",
                     "[::1]:", "[LOCALHOST]:8000"):
            assert c.get("/healthz", headers={"Host": host}).status_code == 200, host
        refused_hosts = ["[::1", "localhost:8000:1", "127.0.0.2", "localhost.evil", "::2", "[::2]:8000",
                         "::1:8000", "", "[]", ":8000"]
        for name in ("localhost", "127.0.0.1", "::1"):
            refused_hosts += malformed(name)
        for host in refused_hosts:
            err = refused(c.get("/healthz", headers={"Host": host}), 400, "invalid_host")
            assert err["message"] == HOST_REFUSED, (host, err["message"])
    assert "`localhost`, `127.0.0.1`, `::1` (or the address bound) is refused (400, `invalid_host`)" in DOCS


def test_a_request_without_a_host_header_is_refused_when_hosts_are_checked(model_tok):
    """HTTP/1.0 lets a request leave the Host out, over a real uvicorn: refused like a wrong Host
    where hosts are checked, answered where they are not."""
    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]
    for allowed, status in ((LOOPBACK_HOSTS, b"400"), (None, b"200")):
        app = create_app(model=model, tokenizer=tok, model_name=NAME, max_new_tokens=2, allowed_hosts=allowed)
        with uvicorn_thread(app, HTTP_LIMITS, drain_seconds=1) as address:
            with socket.create_connection(address, timeout=10) as s:
                s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                got = b""
                while chunk := s.recv(4096):
                    got += chunk
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == status, head
        if allowed is not None:
            assert json.loads(body)["error"] == {"message": HOST_REFUSED, "type": "invalid_request_error",
                                                 "param": None, "code": "invalid_host"}


def test_without_allowed_hosts_any_host_is_answered(model_tok):
    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]
    with TestClient(create_app(model=model, tokenizer=tok, model_name=NAME, max_new_tokens=2)) as c:
        for host in ("gpt.example:8000", "10.0.0.7", ""):
            assert c.get("/healthz", headers={"Host": host}).status_code == 200, host


def test_json_only_for_posts_naming_the_type_received(model_tok):
    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]
    with TestClient(create_app(model=model, tokenizer=tok, model_name=NAME, max_new_tokens=2)) as c:
        for kind in ("application/json", "application/json; charset=utf-8", "APPLICATION/json ;charset=utf-8"):
            r = c.post("/v1/completions", content=BODY, headers={"Content-Type": kind})
            assert r.status_code == 200, kind
        for kind, named in (("text/plain; charset=utf-8", "'text/plain'"), ("application/jsonx", "'application/jsonx'"),
                            ("", "'none'"), (None, "'none'")):
            headers = {} if kind is None else {"Content-Type": kind}
            err = refused(c.post("/v1/completions", content=BODY, headers=headers), 415, "unsupported_media_type")
            assert err["message"].endswith(f"got {named}"), err["message"]
        # a GET carries no body: it needs no type
        assert c.get("/v1/models", headers={"Content-Type": "text/plain"}).status_code == 200


def head(method: str, target: str, headers: list[tuple[str, str]]) -> bytes:
    """A request's line and header lines as a client writes them (the blank line after them not counted)."""
    return f"{method} {target} HTTP/1.1\r\n".encode() + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers)


@pytest.mark.parametrize("scope, wire", [
    ({"method": "GET", "path": "/healthz", "raw_path": b"/healthz", "query_string": b"", "http_version": "1.1",
      "headers": [(b"host", b"127.0.0.1:8000")]}, head("GET", "/healthz", [("host", "127.0.0.1:8000")])),
    ({"method": "POST", "path": "/v1/poem", "raw_path": b"/v1/poem", "query_string": b"a=1&b=22",
      "http_version": "1.1", "headers": [(b"host", b"x"), (b"content-type", b"application/json")]},
     head("POST", "/v1/poem?a=1&b=22", [("host", "x"), ("content-type", "application/json")])),
    # the target as sent (raw_path), not as decoded (path)
    ({"method": "GET", "path": "/v1/models/a/b", "raw_path": b"/v1/models/a%2Fb", "http_version": "1.0",
      "headers": [(b"host", b"x")]}, head("GET", "/v1/models/a%2Fb", [("host", "x")])),
    # ASGI makes raw_path and http_version optional: the path and HTTP/1.1 stand in
    ({"method": "GET", "path": "/v1/models/é", "query_string": b"", "headers": []},
     head("GET", "/v1/models/%C3%A9", [])),
    ({"method": "GET", "path": "/", "raw_path": None, "headers": [(b"x-a", b"")]}, head("GET", "/", [("x-a", "")])),
])
def test_request_head_bytes_is_the_size_on_the_wire(scope, wire):
    assert request_head_bytes(scope) == len(wire)


def test_header_bytes_at_the_limit_pass_and_one_more_is_refused(model_tok):
    """TestClient hands the app its request whole, as a client sending it in one packet does: this
    is the check the guard makes itself (h11 bounds only a head still arriving)."""
    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]
    http = HttpLimits(max_header_bytes=600)
    with TestClient(create_app(model=model, tokenizer=tok, model_name=NAME, http=http)) as c:
        base = c.build_request("GET", "/healthz?x=1", headers={"X-Pad": ""})
        sent = len(head("GET", "/healthz?x=1", [(k.decode(), v.decode()) for k, v in base.headers.raw]))
        pad = http.max_header_bytes - sent
        assert pad > 0
        assert c.get("/healthz?x=1", headers={"X-Pad": "p" * pad}).status_code == 200
        err = refused(c.get("/healthz?x=1", headers={"X-Pad": "p" * (pad + 1)}), 431, "headers_too_large")
        assert err["message"] == f"the request's line and headers are larger than {http.max_header_bytes} bytes"
    assert "| `max_header_bytes` | 16384 | 431 (request line and headers) |" in DOCS


def scrape(client) -> dict:
    r = client.get("/metrics")
    assert r.status_code == 200
    return {tuple(sorted(s.labels.items())): s.value for fam in text_string_to_metric_families(r.text)
            for s in fam.samples if s.name == "gpt_small_requests_total"}


def test_metrics_route_label_is_the_routes_path_or_other(model_tok):
    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]
    requests = {"/": "/", "/healthz": "/healthz", "/metrics": "/metrics", "/openapi.json": "/openapi.json",
                "/v1/models": "/v1/models", "/v1/models/{model}": f"/v1/models/{NAME}",
                "/v1/completions": "/v1/completions", "/v1/chat/completions": "/v1/chat/completions",
                "/v1/poem": "/v1/poem", "/static": "/static/index.html"}
    # every route of the app is here, its path parameter written as OpenAPI writes it
    assert {r.path.replace("{model:path}", "{model}") for r in ROUTES} == set(requests)
    assert {r.path for r in ROUTES if isinstance(r, Mount)} == {"/static"}
    with TestClient(create_app(model=model, tokenizer=tok, model_name=NAME)) as c:
        before = scrape(c)
        for label, path in requests.items():
            c.get(path)  # GET everywhere: a POST route answers 405, counted under its own route
        for path in ("/v2/models", "/v1/modelsx", "/healthzx", "/metricsx", "/v1/completions/x", "/staticx",
                     "/v1/poems", "/favicon.ico"):
            assert c.get(path).status_code == 404, path
        after = scrape(c)
    grew = {dict(k)["route"]: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    expected = {label: 1 for label in requests}
    expected["/metrics"] = 2  # the scrape before and the GET above; the last is counted after it rendered
    expected["other"] = 8
    assert grew == expected, grew
    assert "`route` is the route's path (`other` for unknown paths)" in DOCS
