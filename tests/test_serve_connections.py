"""Connections that cannot pile up (serve/connections.py), over a real uvicorn on a loopback socket,
at the edges docs/serve.md states: `max_connections` open connections are all kept and the next
one closes the oldest idle one (none idle: the new one is closed); the header deadline runs from a
connection's opening and again from the end of each response, and never cuts a request whose
headers have arrived."""

from __future__ import annotations

import copy
import gc
import json
import re
import socket
import time
import weakref
from contextlib import contextmanager

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
from uvicorn.protocols.http.h11_impl import H11Protocol  # noqa: E402

from gpt_small.serve import create_app  # noqa: E402
from gpt_small.serve.protocol import HttpLimits  # noqa: E402
from serve_util import closed_within, make_model, uvicorn_thread  # noqa: E402

NAME = "tiny-poet"
BODY = json.dumps({"model": NAME, "prompt": "a", "max_tokens": 1}).encode()
HEAD = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(BODY))


@pytest.fixture(scope="module")
def model_tok():
    return make_model()


@contextmanager
def serving(model_tok, http: HttpLimits):
    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]
    app = create_app(model=model, tokenizer=tok, model_name=NAME, max_new_tokens=2, http=http)
    opened: list[socket.socket] = []
    with uvicorn_thread(app, http, drain_seconds=2) as address:
        def connect() -> socket.socket:
            s = socket.create_connection(address)
            opened.append(s)
            time.sleep(0.05)  # accepted and timestamped in this order
            return s

        try:
            yield connect
        finally:
            for s in opened:
                s.close()


def answered(s: socket.socket) -> bytes:
    """The status line of the response to one request on s (the connection stays open)."""
    s.settimeout(10)
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = s.recv(4096)
        assert chunk, f"the server closed the connection before answering: {got[:100]!r}"
        got += chunk
    return got.split(b"\r\n", 1)[0]


def test_max_connections_are_kept_and_the_next_closes_the_oldest_idle_one(model_tok):
    http = HttpLimits(max_connections=4, header_seconds=20.0)
    with serving(model_tok, http) as connect:
        idle = [connect() for _ in range(http.max_connections)]
        assert all(closed_within(s, 0.2) is None for s in idle)  # at the limit: all kept
        newest = connect()
        assert closed_within(idle[0], 2) == b""  # one past it: the oldest idle one goes
        assert all(closed_within(s, 0.2) is None for s in idle[1:] + [newest])
        newest.sendall(HEAD + BODY)
        assert answered(newest) == b"HTTP/1.1 200 OK"
        later = connect()  # newest is idle again (its response ended): the oldest idle now is idle[1]
        assert closed_within(idle[1], 2) == b""
        assert all(closed_within(s, 0.2) is None for s in idle[2:] + [newest, later])


def test_with_every_connection_busy_a_new_one_is_closed_at_once(model_tok):
    http = HttpLimits(max_connections=3, header_seconds=20.0, body_seconds=20.0)
    with serving(model_tok, http) as connect:
        busy = [connect() for _ in range(http.max_connections)]
        for s in busy:
            s.sendall(HEAD + BODY[:5])  # a request in progress: its body is still coming
        time.sleep(0.2)
        assert closed_within(connect(), 2) == b""
        for s in busy:  # the busy ones are kept and answered once their bodies end
            s.sendall(BODY[5:])
            assert answered(s) == b"HTTP/1.1 200 OK"


def test_the_header_deadline_runs_again_after_each_response(model_tok):
    http = HttpLimits(header_seconds=1.0, keep_alive_seconds=30)
    with serving(model_tok, http) as connect:
        s = connect()
        s.sendall(HEAD + BODY)
        assert answered(s) == b"HTTP/1.1 200 OK"
        t0 = time.monotonic()
        s.settimeout(0.2)
        try:  # the next request's headers, a byte every 0.1 s: they never end in time
            for c in b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 60:
                s.sendall(bytes([c]))
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert closed_within(s, 1) is not None
        assert time.monotonic() - t0 < http.header_seconds + 3


def test_a_request_whose_headers_arrived_is_not_cut_by_the_header_deadline(model_tok):
    http = HttpLimits(header_seconds=0.5, body_seconds=10.0)
    with serving(model_tok, http) as connect:
        s = connect()
        s.sendall(HEAD + BODY[:5])
        time.sleep(3 * http.header_seconds)  # the body is slow, but within body_seconds
        s.sendall(BODY[5:])
        assert answered(s) == b"HTTP/1.1 200 OK"


def server_side(sockets: list[socket.socket]) -> list[weakref.ref]:
    """Weak references to the server's connection objects of these client sockets."""
    ports = {s.getsockname()[1] for s in sockets}
    return [weakref.ref(o) for o in gc.get_objects()
            if H11Protocol in type(o).__mro__ and o.client is not None and o.client[1] in ports]


def test_a_closed_connection_leaves_nothing_behind_until_its_header_deadline(model_tok):
    """A connection that the client closes (one that never sent a request, one after reading its
    response) is freed at once: its header deadline is cancelled, not left to run out holding the connection, so a crowd
    of short connections cannot pile up in memory for `header_seconds`."""
    http = HttpLimits(header_seconds=60.0)
    with serving(model_tok, http) as connect:
        silent, served = connect(), connect()
        served.sendall(HEAD + BODY)
        served.settimeout(10)
        got = b""
        while b"\r\n\r\n" not in got:
            got += served.recv(4096) or pytest.fail(f"closed before answering: {got[:100]!r}")
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        size = int(re.search(rb"(?im)^content-length: *(\d+)", head)[1])
        while len(body) < size:  # read to the end: a close with bytes unread is a reset, not a close
            body += served.recv(4096) or pytest.fail("closed mid-body")
        kept = server_side([silent, served])
        assert len(kept) == 2
        silent.close()
        served.close()
        deadline = time.monotonic() + 5
        while any(r() is not None for r in kept):
            assert time.monotonic() < deadline, "a closed connection is still held"
            time.sleep(0.05)
            gc.collect()
