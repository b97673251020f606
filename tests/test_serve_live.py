"""`gpt-small serve` as a real process on a free loopback port: the official `openai` client
against it, a client that leaves mid-stream (its row is freed), SIGTERM draining an open stream,
one log line per request, and the refusal to listen on a public address without an API key."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from serve_util import live_server, make_checkpoint  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-poet")


@pytest.fixture(scope="module")
def server(run_dir):
    with live_server(run_dir, "--max-new-tokens", "2000") as (url, proc, err):
        yield url, proc, err


def wait_for(check, seconds: float = 60.0):
    """Poll check() until it returns a truthy value (bounded: a hung server fails the test)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.05)
    raise AssertionError(f"not true within {seconds} s")


def test_openai_client(server):
    url, _, err = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == ["tiny-poet"]

    r = client.completions.create(model="tiny-poet", prompt="The sea", max_tokens=40, seed=7, temperature=0.8)
    text = r.choices[0].text
    assert len(text) > 0 and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 7 and r.usage.completion_tokens == 40

    again = client.completions.create(model="tiny-poet", prompt="The sea", max_tokens=40, seed=7, temperature=0.8)
    assert again.choices[0].text == text  # seeded: reproducible

    stream = client.completions.create(model="tiny-poet", prompt="The sea", max_tokens=40, seed=7, temperature=0.8,
                                       stream=True)
    pieces = [(c.choices[0].text, c.choices[0].finish_reason) for c in stream]
    assert "".join(p for p, _ in pieces) == text and pieces[-1][1] == "length" and len(pieces) > 5

    two = client.completions.create(model="tiny-poet", prompt="The sea", max_tokens=40, seed=7, temperature=0.8, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].text == text and two.choices[1].text != text  # sample j draws from seed + j

    stop = text[10:12]
    cut = client.completions.create(model="tiny-poet", prompt="The sea", max_tokens=40, seed=7, temperature=0.8,
                                    stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny-poet", prompt="x", max_tokens=2, temperature=5)
    # one line per request: the plain, repeated and streamed ones wrote 40 tokens, n=2 80
    assert wait_for(lambda: len([line for line in err if line.startswith("POST /v1/completions 200 tokens=40 ms=")]) == 3)
    assert [line for line in err if line.startswith("POST /v1/completions 200 tokens=80 ms=")]
    assert [line for line in err if line.startswith("POST /v1/completions 404 tokens=0 ms=")]


def test_disconnect_frees_the_row(server):
    url, _, err = server
    health = lambda: httpx.get(f"{url}/healthz").json()  # noqa: E731
    before = health()
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                      json={"model": "tiny-poet", "prompt": "The sea", "max_tokens": 2000, "stream": True}) as r:
        chunks = r.iter_lines()
        got = [next(chunks) for _ in range(10)]  # the stream runs: a row is busy
        assert all(g.startswith("data: ") or g == "" for g in got)
        assert health()["active"] == 1
    # the client has gone: the row is freed at the next step, long before 2000 tokens
    after = wait_for(lambda: (h := health())["active"] == 0 and h["cancelled"] == before["cancelled"] + 1 and h)
    assert after["tokens"] - before["tokens"] < 2000
    assert wait_for(lambda: [line for line in err if "(client left)" in line])


def test_sigterm_drains_an_open_stream(run_dir):
    with live_server(run_dir) as (url, proc, err):
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                          json={"model": "tiny-poet", "prompt": "a", "max_tokens": 300, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            rest = list(lines)  # the stream still ends properly
        assert rest[-2:] == ["data: [DONE]", ""] or rest[-1] == "data: [DONE]"
        assert proc.wait(timeout=60) == 0
        assert wait_for(lambda: [line for line in err if line.startswith("POST /v1/completions 200 tokens=300 ")])


def test_public_address_needs_an_api_key(run_dir):
    done = subprocess.run([sys.executable, "-m", "gpt_small", "serve", "--checkpoint", str(run_dir),
                           "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "without an API key" in lines[0] and "GPT_SMALL_API_KEY" in lines[0]


def test_api_key_with_the_openai_client(run_dir):
    with live_server(run_dir, "--api-key", "s3cret") as (url, _, _):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert ok.completions.create(model="tiny-poet", prompt="a", max_tokens=3).usage.completion_tokens == 3
