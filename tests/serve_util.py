"""Shared by the serve tests: a small random model and its checkpoint, and a live `gpt-small serve`
subprocess on a free port (the server binds port 0 and prints the address it got)."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from gpt_small.checkpoint import save_checkpoint
from gpt_small.config import GPTConfig
from gpt_small.model import GPT
from gpt_small.tokenizer import CharTokenizer

ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ,.;!'\n"
NAME = "tiny-poet"  # the model name the in-process apps serve (conftest.py's `client`)


def make_model(seed: int = 0) -> tuple[GPT, CharTokenizer]:
    """RoPE, qk-norm and n-grams (poem-cpu's features) at a test size. n_embd 64 puts every matmul of
    a decoding step in the CPU decoding kernel, whose rows do not depend on each other."""
    tok = CharTokenizer.train(ALPHABET)
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=64, pos_encoding="rope",
                    qk_norm=True, bias=False, tie_embeddings=False, ngram=3, ngram_buckets=1024, activation="relu2")
    return GPT(cfg).eval(), tok


def sse_events(text: str) -> list:
    """The JSON events of a streamed response (server-sent events ending with `data: [DONE]`)."""
    assert text.endswith("data: [DONE]\n\n")
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [json.loads(e[6:]) for e in events[:-1]]


def make_checkpoint(run_dir: Path) -> Path:
    model, tok = make_model()
    save_checkpoint(run_dir, step=1, model=model, tokenizer=tok, config={"model": model.config.to_dict()},
                    links=("last", "best"))
    return run_dir


@contextmanager
def live_server(checkpoint: Path, *args: str, timeout: float = 60.0, banner: list[str] | None = None):
    """Start `gpt-small serve --port 0` and yield (base_url, process, stderr lines so far); the
    startup line is appended to `banner` if given."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("GPT_SMALL_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "gpt_small", "serve", "--checkpoint", str(checkpoint),
                             "--port", "0", "--threads", "1", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    err: list[str] = []
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    threading.Thread(target=lambda: [err.append(x) for x in proc.stderr], daemon=True).start()
    try:
        try:
            first = lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the server did not start within {timeout} s: {''.join(err)}") from None
        m = re.search(r"on (http://\S+?)/ ", first)
        assert m, f"unexpected first line {first!r}; stderr: {''.join(err)}"
        if banner is not None:
            banner.append(first)
        yield m.group(1), proc, err
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def closed_within(s: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before closing s, or None if s is still open after `seconds`."""
    s.settimeout(seconds)
    got = b""
    try:
        while chunk := s.recv(4096):
            got += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return got


@contextmanager
def uvicorn_thread(app, limits, drain_seconds: float, daemon: bool = True):
    """uvicorn serving `app` with these HttpLimits on a free loopback port, in a thread of this
    process (the server's own connection handling, no subprocess); yields (host, port).
    daemon=False: a thread like `gpt-small serve`'s main thread, whose daemon flag new threads inherit."""
    from gpt_small.serve.server import make_server

    with serving(make_server(app, drain_seconds=drain_seconds, limits=limits), daemon=daemon) as address:
        yield address


@contextmanager
def serving(server, daemon: bool = True):
    """A uvicorn server (as make_server builds it) on a free loopback port, in a thread of this
    process; yields (host, port) once it has started, and stops it afterwards."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=daemon)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield sock.getsockname()
    finally:
        server.should_exit = True
        thread.join(30)


@contextmanager
def failing_decode_steps(app):
    """Within the block, every decoding step of the app's engine raises (a failure injected into
    the decode loop, as a bug would raise there); the real step is back afterwards."""
    engine = app.state.engine
    real = engine._step

    def boom():
        raise RuntimeError("injected")

    engine._step = boom
    try:
        yield
    finally:
        engine._step = real
