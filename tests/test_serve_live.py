"""`gpt-small serve` as a real process on a free loopback port: the official `openai` client
against it (completions, logprobs, chat), /metrics read with prometheus_client's parser, a client
that leaves mid-stream (its row is freed), SIGTERM draining an open stream, one log line per
request, the loopback Host check, and the refusal to listen on a public address without an API key."""

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
    assert wait_for(lambda: len([x for x in err if x.startswith("POST /v1/completions 200 tokens=40 ms=")]) == 3)
    assert [line for line in err if line.startswith("POST /v1/completions 200 tokens=80 ms=")]
    assert [line for line in err if line.startswith("POST /v1/completions 404 tokens=0 ms=")]


def test_openai_client_logprobs(server):
    url, _, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    r = client.completions.create(model="tiny-poet", prompt="The sea", max_tokens=20, seed=7, logprobs=3)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.token_logprobs) == 20
    assert all(len(top) == 3 and max(top.values()) >= p - 1e-6 for top, p in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset[0] == 0 and all(p <= 0 for p in lp.token_logprobs)
    pieces = list(client.completions.create(model="tiny-poet", prompt="The sea", max_tokens=20, seed=7, logprobs=3,
                                            stream=True))
    assert sum((c.choices[0].logprobs.tokens for c in pieces if c.choices[0].logprobs), []) == lp.tokens
    assert sum((c.choices[0].logprobs.token_logprobs for c in pieces if c.choices[0].logprobs), []) == lp.token_logprobs


def test_openai_client_chat(server):
    url, _, err = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    msgs = [{"role": "system", "content": "You are a poet."}, {"role": "user", "content": "The sea"}]
    r = client.chat.completions.create(model="tiny-poet", messages=msgs, max_tokens=40, seed=7, temperature=0.8)
    text = r.choices[0].message.content
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 40
    # the template: one user message continues like the same prompt on /v1/completions
    same = client.completions.create(model="tiny-poet", prompt="The sea", max_tokens=40, seed=7, temperature=0.8)
    assert same.choices[0].text == text
    again = client.chat.completions.create(model="tiny-poet", messages=msgs, max_completion_tokens=40, seed=7,
                                           temperature=0.8)
    assert again.choices[0].message.content == text  # seeded: reproducible

    stream = client.chat.completions.create(model="tiny-poet", messages=msgs, max_tokens=40, seed=7, temperature=0.8,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 40

    two = client.chat.completions.create(model="tiny-poet", messages=msgs, max_tokens=40, seed=7, temperature=0.8, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].message.content == text and two.choices[1].message.content != text

    stop = text[10:12]
    cut = client.chat.completions.create(model="tiny-poet", messages=msgs, max_tokens=40, seed=7, temperature=0.8,
                                         stop=[stop])
    assert cut.choices[0].message.content == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"

    scored = client.chat.completions.create(model="tiny-poet", messages=msgs, max_tokens=10, seed=7, logprobs=True,
                                            top_logprobs=2)
    content = scored.choices[0].logprobs.content
    assert "".join(t.token for t in content) == scored.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)

    for bad in ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
                {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}):
        with pytest.raises(openai.BadRequestError, match=next(iter(bad))):
            client.chat.completions.create(model="tiny-poet", messages=msgs, max_tokens=2, **bad)
    assert wait_for(lambda: [line for line in err if line.startswith("POST /v1/chat/completions 200 tokens=80 ms=")])


def test_metrics_after_requests(server):
    from prometheus_client.parser import text_string_to_metric_families

    url, _, _ = server

    def scrape() -> dict:
        text = httpx.get(f"{url}/metrics", timeout=30).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    before = scrape()
    client.completions.create(model="tiny-poet", prompt="a", max_tokens=6, n=2)
    list(client.chat.completions.create(model="tiny-poet", messages=[{"role": "user", "content": "b"}], max_tokens=5,
                                        stream=True))
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-poet", prompt="a", max_tokens=2, temperature=9)
    ended = lambda: scrape()  # noqa: E731  (a stream is counted once its response has ended)
    after = wait_for(lambda: (a := ended()).get(("gpt_small_requests_total", (("route", "/v1/chat/completions"),
                                                                               ("status", "200"))), 0) >= 1 and a)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("gpt_small_requests_total", route="/v1/completions", status="200") == 1
    assert delta("gpt_small_requests_total", route="/v1/completions", status="400") == 1
    assert delta("gpt_small_requests_total", route="/v1/chat/completions", status="200") == 1
    assert delta("gpt_small_generated_tokens_total") == 12 + 5
    assert delta("gpt_small_time_to_first_token_seconds_count") == 3
    assert delta("gpt_small_request_duration_seconds_count", route="/v1/completions") == 2


def test_loopback_server_answers_loopback_host_names_only(server):
    url, _, _ = server
    port = url.rsplit(":", 1)[1]
    assert httpx.get(f"{url}/healthz", headers={"Host": f"localhost:{port}"}).status_code == 200
    r = httpx.get(f"{url}/healthz", headers={"Host": f"attacker.example:{port}"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"
    r = httpx.post(f"{url}/v1/completions", content='{"model": "tiny-poet", "prompt": "a"}',
                   headers={"Content-Type": "text/plain"})
    assert r.status_code == 415


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


def test_a_non_streamed_client_that_leaves_frees_its_rows(server):
    url, _, _ = server
    health = lambda: httpx.get(f"{url}/healthz").json()  # noqa: E731
    before = health()
    with pytest.raises(httpx.ReadTimeout):  # four rows of 2000 tokens; the client gives up after 1 s
        httpx.post(f"{url}/v1/completions", timeout=httpx.Timeout(30, read=1.0),
                   json={"model": "tiny-poet", "prompt": "The sea", "max_tokens": 2000, "n": 4})
    t0 = time.monotonic()
    after = wait_for(lambda: (h := health())["active"] == 0 and h["cancelled"] == before["cancelled"] + 4 and h)
    assert time.monotonic() - t0 < 10 and after["tokens"] - before["tokens"] < 4 * 2000


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
        # with a key the key is the check: any Host name is answered
        port = url.rsplit(":", 1)[1]
        assert httpx.get(f"{url}/healthz", headers={"Host": f"example.org:{port}"}).status_code == 200
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "bearer s3cret"}).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert ok.completions.create(model="tiny-poet", prompt="a", max_tokens=3).usage.completion_tokens == 3
