"""`gpt-small serve`'s start and stop in this process (serve/server.py's `serve`): each check made
before the checkpoint is read, at its edge (a value that passes reaches the next failure, the
missing checkpoint); the refusal of an address other machines reach without a key (from the flag
or GPT_SMALL_API_KEY); which hosts are loopback; the model's name; and a whole start on port 0:
the printed line, the served model and limits, the Host check of a keyless server, SIGTERM
draining to a normal return with the signal handlers given back."""

from __future__ import annotations

import errno
import io
import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from gpt_small.errors import GPTSmallError  # noqa: E402
from gpt_small.serve.engine import DEFAULT_MAX_BATCH, DEFAULT_PREFILL_BATCH  # noqa: E402
from gpt_small.serve import server  # noqa: E402
from gpt_small.serve.server import is_loopback, model_name_of, serve  # noqa: E402
from serve_util import make_checkpoint  # noqa: E402

MISSING = "/nonexistent/gpt-small-run"
REACHABLE = ("refusing to serve on 0.0.0.0, which other machines can reach, without an API key: pass --api-key "
             "or set GPT_SMALL_API_KEY (or bind 127.0.0.1)")


def refusal(**kw) -> str:
    """serve()'s one-line refusal; 'checkpoint not found: ...' once every check before loading passed."""
    kw.setdefault("threads", torch.get_num_threads())  # this process's threads, left as they are
    with pytest.raises(GPTSmallError) as e:
        serve(MISSING, **kw)
    return str(e.value)


PASSED = f"checkpoint not found: {MISSING}"


@pytest.fixture(autouse=True)
def _process_settings():
    """serve() sets the process's GIL switch interval and torch threads for serving (past its checks);
    other tests keep theirs."""
    interval, threads = sys.getswitchinterval(), torch.get_num_threads()
    yield
    sys.setswitchinterval(interval)
    torch.set_num_threads(threads)


def test_each_number_at_its_edge_before_anything_loads(monkeypatch):
    monkeypatch.delenv("GPT_SMALL_API_KEY", raising=False)
    for arg, flag, lo in (("max_batch", "--max-batch", 1), ("prefill_batch", "--prefill-batch", 1),
                          ("max_queue", "--max-queue", 0), ("max_new_tokens", "--max-new-tokens", 1),
                          ("port", "--port", 0)):
        assert refusal(**{arg: lo - 1}) == f"{flag} must be >= {lo}, got {lo - 1}"
        assert refusal(**{arg: lo}) == PASSED
    assert refusal(port=65535) == PASSED
    assert refusal(port=65536) == "--port must be <= 65535, got 65536"
    assert refusal(weights="int4") == "weights must be one of float32, bfloat16, int8, got 'int4'"
    assert refusal() == PASSED  # the defaults pass


def test_an_address_other_machines_reach_needs_a_key(monkeypatch):
    monkeypatch.delenv("GPT_SMALL_API_KEY", raising=False)
    assert refusal(host="0.0.0.0") == REACHABLE
    assert refusal(host="0.0.0.0", api_key="") == REACHABLE  # an empty key is no key
    assert refusal(host="0.0.0.0", max_batch=0) == REACHABLE  # the first check: nothing else is looked at
    assert refusal(host="0.0.0.0", api_key="k") == PASSED
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert refusal(host=host) == PASSED, host
    monkeypatch.setenv("GPT_SMALL_API_KEY", "k")
    assert refusal(host="0.0.0.0") == PASSED
    monkeypatch.setenv("GPT_SMALL_API_KEY", "")
    assert refusal(host="0.0.0.0") == REACHABLE


def test_loopback_is_every_address_the_host_resolves_to():
    for host in ("127.0.0.1", "127.8.9.10", "::1", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.1.2.3", "192.168.0.1", "::ffff:10.0.0.1"):
        assert not is_loopback(host), host
    with pytest.raises(socket.gaierror) as why:
        socket.getaddrinfo("no-such-host.invalid", None)
    with pytest.raises(GPTSmallError) as e:
        is_loopback("no-such-host.invalid")
    assert str(e.value) == f"--host 'no-such-host.invalid' does not resolve: {why.value.strerror}"


def test_the_model_name_is_the_run_folders(tmp_path):
    run = tmp_path / "poem-cpu"
    (run / "checkpoints" / "step-10").mkdir(parents=True)
    assert model_name_of(run) == "poem-cpu"
    assert model_name_of(str(run)) == "poem-cpu"
    assert model_name_of(run / "checkpoints" / "step-10") == "poem-cpu"  # a checkpoint folder: its run's
    assert model_name_of(run / "checkpoints" / "step-10" / ".." / "step-10") == "poem-cpu"
    (tmp_path / "saved" / "step-10").mkdir(parents=True)
    assert model_name_of(tmp_path / "saved" / "step-10") == "step-10"  # not under checkpoints/: its own


class Pipe:
    """Standard output as a script that starts the server reads it: a buffered pipe, so what the
    server prints reaches the reader only once flushed. getvalue(): what has arrived so far."""

    def __init__(self) -> None:
        self.r, w = os.pipe()
        os.set_blocking(self.r, False)
        self.stream = io.TextIOWrapper(io.BufferedWriter(io.FileIO(w, "w")), encoding="utf-8")
        self.seen = b""

    def getvalue(self) -> str:
        try:
            while chunk := os.read(self.r, 1 << 16):
                self.seen += chunk
        except BlockingIOError:
            pass
        return self.seen.decode()

    def close(self) -> None:
        self.stream.close()
        os.close(self.r)


def start_and_stop(run, out, seen: dict, requests, stop=None, **kw) -> None:
    """serve(run, **kw) in this (the main) thread; a client thread reads the printed address, makes
    `requests(url)` into `seen`, then stops the server: `stop()`, or SIGTERM to this process as `kill`
    would, once uvicorn answers (its handler in place). SIGTERM is caught by a handler of the test's
    meanwhile, so it never ends the process, and serve() must give that handler back untouched."""
    caught: list[int] = []

    def handler(sig, frame) -> None:
        caught.append(sig)

    def client() -> None:
        deadline = time.monotonic() + 30
        m = None
        while time.monotonic() < deadline and not (m := re.search(r"on (http://\S+?)/ ", out.getvalue())):
            time.sleep(0.02)
        try:
            if m:  # (no address printed: the server is stopped all the same, and the test fails on it)
                seen["switch interval"], seen["threads"] = sys.getswitchinterval(), torch.get_num_threads()
                httpx.get(f"{m.group(1)}/openapi.json", timeout=30)  # uvicorn answers: its handler is in place
                seen.update(requests(m.group(1)))
        finally:
            with lock:
                if serving:
                    stop() if stop else os.kill(os.getpid(), signal.SIGTERM)

    lock, serving = threading.Lock(), [True]
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        try:
            serve(run, **kw)
        finally:
            with lock:
                serving.clear()
        thread.join(30)
        assert signal.getsignal(signal.SIGTERM) is handler  # given back
        assert caught == []  # serve() took the signal: it never reached the handler it found
    finally:
        signal.signal(signal.SIGTERM, previous)


DRAIN = float(re.search(r"finish for up to (\d+) s", " ".join(
    (Path(__file__).resolve().parent.parent / "docs" / "serve.md").read_text().split()))[1])
DEFAULTS = {"max_batch": DEFAULT_MAX_BATCH, "max_queue": 64, "max_new_tokens": 1000, "drain_seconds": DRAIN,
            "threads": len(os.sched_getaffinity(0)), "prefill_batch": DEFAULT_PREFILL_BATCH,
            "window_keep": 32}  # serve()'s; the window keeps half the model's 64 tokens


NAME = socket.gethostname().upper()  # a name for this machine, in upper case: many hosts files map it to loopback


@pytest.mark.parametrize("host,key,given", [
    ("127.0.0.2", None, {}), (NAME, None, {"threads": 1, "drain_seconds": 2.0}),
    ("::1", "k", {"max_batch": 3, "max_queue": 5, "max_new_tokens": 50, "threads": 1, "drain_seconds": 2.0,
                  "prefill_batch": 2, "window_keep": 10})])
def test_a_whole_start_serves_and_sigterm_drains_to_a_normal_return(tmp_path, monkeypatch, host, key, given):
    """With serve()'s defaults (those of `gpt-small serve`, which passes no drain time: the documented
    30 s, every core) and with other values; bound by a name, that name in any case is a Host the
    keyless server answers."""
    monkeypatch.delenv("GPT_SMALL_API_KEY", raising=False)
    if host == NAME and not is_loopback(host):
        pytest.skip(f"this machine's name {host.lower()} is not a loopback address here")
    drains, servers = [], []
    real = server.make_server

    def make_server(app, drain_seconds, *args):  # the real server, its drain time noted
        drains.append(drain_seconds)
        servers.append(real(app, drain_seconds, *args))
        return servers[-1]

    monkeypatch.setattr(server, "make_server", make_server)
    run = make_checkpoint(tmp_path / "tiny-run")
    out, err = Pipe(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out.stream)
    monkeypatch.setattr(sys, "stderr", err)  # uvicorn's log goes where sys.stderr is when it starts
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def requests(url: str) -> dict:
        auth = {"Authorization": f"Bearer {key}"} if key else {}
        return {"completion": httpx.post(f"{url}/v1/completions", headers=auth, timeout=60, json={
                    "model": "tiny-run", "prompt": "The sea", "max_tokens": 3, "seed": 1}),
                "health": httpx.get(f"{url}/healthz", timeout=30).json(),
                "schema": httpx.get(f"{url}/openapi.json", timeout=30).json(),
                "foreign host": httpx.get(f"{url}/healthz", headers={"Host": "evil.example"}, timeout=30).status_code,
                "models": httpx.get(f"{url}/v1/models", headers=auth, timeout=30).status_code,
                "models without the key": httpx.get(f"{url}/v1/models", timeout=30).status_code}

    seen: dict = {}
    # stopped by SIGTERM, or (with a key) from inside, as uvicorn stops when it must: then no signal is named
    stop = (lambda: setattr(servers[0], "should_exit", True)) if key else None
    try:
        start_and_stop(run, out, seen, requests, stop=stop, host=host, api_key=key, port=0, **given)
        lines = out.getvalue().splitlines()  # what was flushed: both lines, without a flush of ours
    finally:
        out.close()
    want = {**DEFAULTS, **given}
    assert err.getvalue() == ""  # uvicorn logs warnings only: a clean start and stop print nothing there
    assert drains == [want["drain_seconds"]]
    assert seen["threads"] == want["threads"]
    shown = f"[{host}]" if ":" in host else host
    m = re.fullmatch(rf"serving tiny-run \(([\d,]+) parameters, float32 weights\) on http://{re.escape(shown)}:(\d+)/  "
                     r"\(max batch (\d+); Ctrl-C drains and stops\)", lines[0])
    assert m, lines[0]
    assert int(m[2]) > 0 and int(m[3]) == want["max_batch"]
    assert lines[-1] == ("stopped; open requests drained" if key else "stopped by SIGTERM; open requests drained")
    completion = seen["completion"]
    assert completion.status_code == 200 and completion.json()["usage"] == {
        "prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}  # the checkpoint's tokenizer: a char each
    health = seen["health"]
    assert (health["status"], health["model"], health["weights"]) == ("ok", "tiny-run", "float32")
    assert f"{health['params']:,}" == m[1]
    assert {k: health[k] for k in ("max_batch", "max_queue", "prefill_batch", "window_keep")} == {
        k: want[k] for k in ("max_batch", "max_queue", "prefill_batch", "window_keep")}
    assert seen["schema"]["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"][
        "schema"]["properties"]["max_tokens"]["maximum"] == want["max_new_tokens"]
    # without a key: loopback Host names and the bound address only; with one, the key is the check
    assert seen["foreign host"] == (200 if key else 400)
    assert (seen["models"], seen["models without the key"]) == (200, 401 if key else 200)
    # the decode thread and the event loop share the GIL: serving switches more often than Python's 5 ms
    assert seen["switch interval"] < 0.005
    assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_a_port_in_use_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("GPT_SMALL_API_KEY", raising=False)
    run = make_checkpoint(tmp_path / "tiny-run")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(GPTSmallError) as e:
            serve(run, port=port, threads=torch.get_num_threads())
        assert str(e.value) == f"cannot listen on 127.0.0.1:{port}: Address already in use"
        # a window the model cannot keep is refused first, against the checkpoint's own block size (64)
        with pytest.raises(GPTSmallError) as e:
            serve(run, port=port, threads=torch.get_num_threads(), window_keep=64)
        assert str(e.value) == ("window keep must be half, slide or a number of tokens from 0 to 63 (the window "
                                "is 64), got 64")


def test_the_default_port_is_8000(tmp_path, monkeypatch):
    """Shown without serving on it: with port 8000 held (here, or by whatever holds it already),
    serve() without a port is refused at 8000."""
    monkeypatch.delenv("GPT_SMALL_API_KEY", raising=False)
    run = make_checkpoint(tmp_path / "tiny-run")
    with socket.socket() as held:
        try:
            held.bind(("127.0.0.1", 8000))
            held.listen(1)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                pytest.skip(f"cannot hold port 8000: {e}")
        out = io.StringIO()
        monkeypatch.setattr(sys, "stdout", out)
        with pytest.raises(GPTSmallError) as e:  # (were it to serve on another port, it is stopped)
            start_and_stop(run, out, {}, lambda url: {}, threads=torch.get_num_threads())
    assert str(e.value) == "cannot listen on 127.0.0.1:8000: Address already in use"


def test_the_server_make_server_builds_keeps_its_limits_and_drains_from_the_first_signal():
    """The uvicorn server that `serve` runs, built here (not in a shared fixture) with limits other
    than uvicorn's defaults: a header block past h11's own 16 KiB default and within max_header_bytes
    is served, an idle keep-alive connection is closed after keep_alive_seconds (uvicorn's default
    is 5 s), uvicorn is told the drain time, and from the first signal on the app answers new work
    with 503."""
    from starlette.testclient import TestClient

    from gpt_small.serve import create_app
    from gpt_small.serve.protocol import HttpLimits
    from serve_util import closed_within, make_model, serving

    model, tok = make_model()
    limits = HttpLimits(max_header_bytes=24 * 1024, keep_alive_seconds=1)
    app = create_app(model=model, tokenizer=tok, model_name="tiny-poet", http=limits)
    srv = server.make_server(app, drain_seconds=0.75, limits=limits)
    assert srv.config.timeout_graceful_shutdown == 0.75

    with serving(srv) as (host, port):
        with socket.create_connection((host, port), timeout=10) as c:
            filler = "x" * (20 * 1024)  # past h11's default, within this server's limit
            # in two writes: h11 bounds the headers it holds while they are incomplete
            c.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Filler: {filler}".encode())
            time.sleep(0.2)
            c.sendall(b"\r\n\r\n")
            head = c.recv(65536)
            assert head.startswith(b"HTTP/1.1 200"), head[:80]
            start = time.monotonic()
            assert closed_within(c, 4.0) is not None  # closed after keep_alive_seconds = 1, before uvicorn's 5
            assert time.monotonic() - start >= 0.5

    fresh = create_app(model=model, tokenizer=tok, model_name="tiny-poet")  # an app's engine runs once
    body = {"model": "tiny-poet", "prompt": "a", "max_tokens": 1}
    with TestClient(fresh) as client:
        assert client.post("/v1/completions", json=body).status_code == 200
        server.make_server(fresh, drain_seconds=1).handle_exit(signal.SIGTERM, None)
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 503
        assert r.json()["error"]["message"] == "the server is shutting down; retry on another server or once it is back"


def test_a_start_whose_engine_fails_is_refused_not_served(tmp_path, monkeypatch):
    """The app's startup builds the decode engine: when that fails (here, a failure injected into the
    engine's construction), serve() stops with uvicorn's start-failure status after logging why, not
    a server answering every request with a 500, nor a "stopped ... drained" line for a start that
    never happened."""
    from gpt_small.serve import app as app_module

    monkeypatch.delenv("GPT_SMALL_API_KEY", raising=False)

    def no_engine(*args, **kw):
        raise RuntimeError("cannot allocate the cache rows")

    monkeypatch.setattr(app_module, "Engine", no_engine)
    servers, real = [], server.make_server

    def make_server(app, drain_seconds, *args):
        servers.append(real(app, drain_seconds, *args))
        # a server that started all the same is stopped, so the test fails rather than waits
        threading.Timer(60, lambda: setattr(servers[0], "should_exit", True)).start()
        return servers[-1]

    monkeypatch.setattr(server, "make_server", make_server)
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    with pytest.raises(SystemExit) as e:
        serve(make_checkpoint(tmp_path / "tiny-run"), port=0, threads=1)
    assert e.value.code == 3  # uvicorn's status for a failed start
    assert "cannot allocate the cache rows" in err.getvalue() and "Application startup failed" in err.getvalue()
    assert servers[0].started is False and "stopped" not in out.getvalue()
