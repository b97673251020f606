"""What one client may send, at each limit of protocol.HTTP_LIMITS (the table docs/serve.md shows):
requests at the limit pass and one past it get a 4xx; the Host and content-type guard; and, over
a real uvicorn on a loopback socket, sockets that stay idle or trickle their headers are closed
while /healthz keeps answering."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import socket
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
from starlette.testclient import TestClient  # noqa: E402

from gpt_small import limits as bounds  # noqa: E402
from gpt_small.serve import create_app  # noqa: E402
from gpt_small.serve.guard import LOOPBACK_HOSTS  # noqa: E402
from gpt_small.serve.protocol import HTTP_LIMITS, HttpLimits, Limits  # noqa: E402
from serve_util import closed_within, uvicorn_thread  # noqa: E402
from tests.test_fuzz import assert_one_line, run  # noqa: E402

NAME = "tiny-poet"
H = HTTP_LIMITS
DOCS = Path(__file__).resolve().parents[1] / "docs" / "serve.md"
CONNECTION_LIMITS = {"header_seconds", "body_seconds", "keep_alive_seconds", "max_header_bytes", "max_connections"}


@pytest.fixture(scope="module")
def client(model_tok):
    model, tok = model_tok
    with TestClient(create_app(model=model, tokenizer=tok, model_name=NAME, max_new_tokens=4)) as c:
        yield c


def post(client, path: str, body: dict | bytes):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(path, content=data, headers={"Content-Type": "application/json"})


def completion(**kw) -> dict:
    return {"model": NAME, "prompt": "a", "max_tokens": 1, **kw}


def padded(n: int) -> bytes:
    """A valid completion request of exactly n bytes (spaces pad it)."""
    core = json.dumps(completion()).encode()
    return core[:-1] + b" " * (n - len(core)) + b"}"


def with_temperature(number: bytes) -> bytes:
    return json.dumps(completion()).encode()[:-1] + b', "temperature": ' + number + b"}"


def chat_of(n_messages: int) -> dict:
    """A chat request of n messages (system ones, left out of the prompt, and one user message)."""
    return {"model": NAME, "max_tokens": 1,
            "messages": [{"role": "system", "content": "x"}] * (n_messages - 1) + [{"role": "user", "content": "a"}]}


# Each request-level limit: (route, a body at the limit, a body one past it).
BOUNDARY = {
    "max_body_bytes": ("/v1/completions", padded(H.max_body_bytes), padded(H.max_body_bytes + 1)),
    "max_number_chars": ("/v1/completions", with_temperature(b"0." + b"5" * (H.max_number_chars - 2)),
                         with_temperature(b"0." + b"5" * (H.max_number_chars - 1))),
    "max_stop_strings": ("/v1/completions", completion(stop=["x"] * H.max_stop_strings),
                         completion(stop=["x"] * (H.max_stop_strings + 1))),
    "max_stop_chars": ("/v1/completions", completion(stop="x" * H.max_stop_chars),
                       completion(stop="x" * (H.max_stop_chars + 1))),
    "max_top_logprobs": ("/v1/completions", completion(logprobs=H.max_top_logprobs),
                         completion(logprobs=H.max_top_logprobs + 1)),
    "max_messages": ("/v1/chat/completions", chat_of(H.max_messages), chat_of(H.max_messages + 1)),
}


def test_every_limit_is_in_the_docs_table_and_tested():
    docs = DOCS.read_text()
    for f in dataclasses.fields(HttpLimits):
        value = getattr(H, f.name)
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        assert f"| `{f.name}` | {shown} |" in docs, f"docs/serve.md's limits table lacks {f.name} = {shown}"
    assert {f.name for f in dataclasses.fields(HttpLimits)} == set(BOUNDARY) | CONNECTION_LIMITS


@pytest.mark.parametrize("name", sorted(BOUNDARY))
def test_request_limits_at_the_boundary(client, name):
    path, ok, bad = BOUNDARY[name]
    r = post(client, path, ok)
    assert r.status_code == 200, (name, r.text[:300])
    r = post(client, path, bad)
    assert r.status_code in (400, 413), (name, r.status_code)
    err = r.json()["error"]
    assert err["message"] and "\n" not in err["message"]


# --- the bounds the server shares with the command line (gpt_small/limits.py) ---

def above(x: float) -> float:
    return math.nextafter(x, math.inf)


def below(x: float) -> float:
    return math.nextafter(x, -math.inf)


# (field, `generate` flag, last accepted, first refused, other /v1/poem fields, other flags): each
# bound is read from limits.py by both sides, so one row tests both at its edge. The other fields
# make a request at the edge cheap and valid (`--lines` is verse lines in all, the body's per stanza).
SHARED = [
    ("seed", "--seed", bounds.MAX_SEED, bounds.MAX_SEED + 1, {}, []),
    ("seed", "--seed", 0, -1, {}, []),
    ("top_k", "--top-k", bounds.MAX_TOP_K, bounds.MAX_TOP_K + 1, {}, []),
    ("repetition_penalty", "--repetition-penalty", bounds.MIN_REPETITION_PENALTY,
     below(bounds.MIN_REPETITION_PENALTY), {}, []),
    ("repetition_penalty", "--repetition-penalty", bounds.MAX_REPETITION_PENALTY,
     above(bounds.MAX_REPETITION_PENALTY), {}, []),
    ("temperature", "--temperature", 0.0, below(0.0), {}, []),
    ("stop", "--stop", "x" * bounds.MAX_STOP_CHARS, "x" * (bounds.MAX_STOP_CHARS + 1), {}, []),
    ("stanzas", "--stanzas", bounds.MAX_STANZAS, bounds.MAX_STANZAS + 1, {"lines": 1},
     ["--lines", str(bounds.MAX_STANZAS)]),
    ("syllables", "--syllables", bounds.MAX_SYLLABLES, bounds.MAX_SYLLABLES + 1, {"lines": 1}, ["--lines", "1"]),
]
SHARED_IDS = [f"{field}={ok if not isinstance(ok, str) else len(ok)}" for field, _, ok, *_ in SHARED]


def http_body(field: str, value, extra: dict) -> tuple[str, dict]:
    if field == "stop":  # /v1/poem has no stop strings
        return "/v1/completions", completion(**{field: value})
    body = {"prompt": "a", **extra, field: value}
    if field != "syllables":  # a form poem refuses max_tokens
        body["max_tokens"] = 1
    return "/v1/poem", body


@pytest.mark.parametrize("field, flag, ok, bad, extra, args", SHARED, ids=SHARED_IDS)
def test_shared_bounds_at_the_edge_over_http(client, field, flag, ok, bad, extra, args):
    path, body = http_body(field, ok, extra)
    r = post(client, path, body)
    assert r.status_code == 200, (field, r.text[:300])
    path, body = http_body(field, bad, extra)
    r = post(client, path, body)
    assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text[:300])


@pytest.mark.parametrize("field, flag, ok, bad, extra, args", SHARED, ids=SHARED_IDS)
def test_shared_bounds_at_the_edge_on_the_command_line(field, flag, ok, bad, extra, args):
    """Bounds are checked before the checkpoint is read: at the edge the one error is the missing
    checkpoint; one past it, the flag."""
    missing = "/nonexistent/gpt-small-edge"
    for value, refused in ((ok, False), (bad, True)):
        argv = ["generate", "--checkpoint", missing, *args, f"{flag}={value}"]  # a float's str round-trips
        code, out, err = run(argv)
        line = assert_one_line(code, err, argv)
        names_flag = any(name in line for name in (flag, flag[2:].replace("-", "_"), flag[2:].replace("-", " ")))
        assert names_flag == refused, (argv, line)
        assert refused or missing in line, (argv, line)


def test_a_temperature_below_the_floor_is_greedy_over_http(client):
    """1e-300 is inside the range: the engine's `sample` takes the argmax, as generate does."""
    for path in ("/v1/completions", "/v1/poem"):
        body = completion(max_tokens=4) if path == "/v1/completions" else {"prompt": "a", "max_tokens": 4}
        texts = []
        for t in (0.0, 1e-300, below(bounds.TEMPERATURE_FLOOR)):
            r = post(client, path, {**body, "temperature": t, "seed": 1})
            assert r.status_code == 200, r.text[:300]
            texts.append(r.json()["choices"][0]["text"] if path == "/v1/completions" else r.json()["text"])
        assert texts[1] == texts[2] == texts[0], (path, texts)


def test_a_tiny_repetition_penalty_over_http_samples_or_is_refused_by_name(client):
    r = post(client, "/v1/completions", completion(max_tokens=4, seed=0, prompt="aaaa",
                                                   repetition_penalty=bounds.MIN_REPETITION_PENALTY))
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text[:300]
    r = post(client, "/v1/completions", completion(repetition_penalty=1e-300))
    assert r.status_code == 400 and r.json()["error"]["param"] == "repetition_penalty"


def test_the_docs_show_the_shared_bounds_and_the_servers_own():
    docs, own = " ".join(DOCS.read_text().split()), Limits(model_name=NAME)
    power = lambda n: f"2^{n.bit_length() - 1}"  # noqa: E731
    for phrase in (f"`seed` 0 to {power(bounds.MAX_SEED + 1)}-1", f"`top_k` up to {power(bounds.MAX_TOP_K)}",
                   f"`repetition_penalty` {bounds.MIN_REPETITION_PENALTY:g} to {bounds.MAX_REPETITION_PENALTY:g}",
                   f"`stop` string of up to {bounds.MAX_STOP_CHARS} characters",
                   f"`stanzas` up to {bounds.MAX_STANZAS}", f"`syllables` 1 to {bounds.MAX_SYLLABLES}",
                   f"below {bounds.TEMPERATURE_FLOOR:g} (0 included) is greedy",
                   f"`temperature` at most {own.max_temperature:g}", f"`n` at most {own.max_n}",
                   f"at most {own.max_poem_lines} `lines`"):
        assert phrase in docs, f"docs/serve.md lacks {phrase!r}"


def test_the_openapi_schema_shows_the_shared_bounds(client):
    props = client.get("/openapi.json").json()["paths"]["/v1/poem"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]["properties"]
    assert props["seed"]["maximum"] == bounds.MAX_SEED and props["seed"]["minimum"] == 0
    assert props["top_k"]["maximum"] == bounds.MAX_TOP_K
    assert props["repetition_penalty"]["minimum"] == bounds.MIN_REPETITION_PENALTY
    assert props["repetition_penalty"]["maximum"] == bounds.MAX_REPETITION_PENALTY
    assert props["stanzas"]["maximum"] == bounds.MAX_STANZAS
    assert props["syllables"]["maximum"] == bounds.MAX_SYLLABLES
    assert props["temperature"]["maximum"] == 2.0  # OpenAI's range: the server's own


# --- the guard: Host names on the keyless loopback server, JSON bodies only ---


def test_host_check_and_json_only(model_tok):
    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]
    app = create_app(model=model, tokenizer=tok, model_name=NAME, max_new_tokens=4, allowed_hosts=LOOPBACK_HOSTS)
    body = json.dumps(completion()).encode()
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        for host in ("127.0.0.1:8000", "localhost", "LOCALHOST:1", "[::1]:8000", "127.0.0.1"):
            r = c.post("/v1/completions", content=body, headers={"Host": host, "Content-Type": "application/json"})
            assert r.status_code == 200, host
        for host in ("evil.example:8000", "127.0.0.1.evil.example", "", "localhost.:8000", "[::2]"):
            r = c.get("/healthz", headers={"Host": host})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", host
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
            headers = {"Content-Type": kind} if kind else {}
            r = c.post("/v1/completions", content=body, headers=headers)
            assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", kind
        r = c.post("/v1/completions", content=body, headers={"Content-Type": "Application/JSON; charset=utf-8"})
        assert r.status_code == 200


# --- connections, over a real uvicorn ---

SMALL = HttpLimits(header_seconds=1.0, body_seconds=1.0, keep_alive_seconds=1, max_connections=32,
                   max_header_bytes=4096)


@pytest.fixture(scope="module")
def live(model_tok):
    """uvicorn on a free loopback port, with SMALL's connection limits; yields (host, port)."""
    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]
    app = create_app(model=model, tokenizer=tok, model_name=NAME, max_new_tokens=4, http=SMALL)
    with uvicorn_thread(app, SMALL, drain_seconds=5) as address:
        yield address


def test_idle_sockets_cannot_lock_out_a_client(live):
    host, port = live
    idle = [socket.create_connection((host, port)) for _ in range(4 * SMALL.max_connections)]
    try:
        t0 = time.monotonic()
        r = httpx.get(f"http://{host}:{port}/healthz", timeout=10)
        assert r.status_code == 200 and time.monotonic() - t0 < 5
        # the oldest idle ones were closed to make room; all of them go once the header deadline passes
        assert closed_within(idle[0], 0.5) == b""
        assert all(closed_within(s, SMALL.header_seconds + 2) is not None for s in idle[-SMALL.max_connections:])
    finally:
        for s in idle:
            s.close()


def test_trickled_headers_and_bodies_are_cut_off(live):
    host, port = live
    s = socket.create_connection((host, port))
    t0 = time.monotonic()
    try:
        s.settimeout(0.2)
        for c in b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 40:
            s.sendall(bytes([c]))  # a byte every 0.1 s: the headers never end in time
            time.sleep(0.1)
            if time.monotonic() - t0 > SMALL.header_seconds + 3:
                break
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert time.monotonic() - t0 < SMALL.header_seconds + 3
    assert closed_within(s, 2) is not None
    s.close()

    body = json.dumps(completion()).encode()
    s = socket.create_connection((host, port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])  # and the rest never comes
    got = closed_within(s, SMALL.body_seconds + 5)
    s.close()
    assert got is not None and got.startswith(b"HTTP/1.1 408"), got[:100]


def test_oversized_headers_and_idle_keep_alive(live):
    host, port = live
    s = socket.create_connection((host, port))
    big = b"a" * (SMALL.max_header_bytes + 1)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + big + b"\r\n\r\n")
    got = closed_within(s, 5)
    s.close()
    assert got is not None and got.startswith(b"HTTP/1.1 431"), got[:100]

    s = socket.create_connection((host, port))
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    got = closed_within(s, SMALL.keep_alive_seconds + 3)  # answered, then closed once idle
    s.close()
    assert got is not None and got.startswith(b"HTTP/1.1 200")
