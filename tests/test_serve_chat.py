"""`gpt-small serve` in-process, the parts beyond plain completions: /v1/chat/completions and its
template, logprobs checked against the model's own log-softmax, /metrics counts read back with
prometheus_client's parser, the Bearer scheme, 503 while draining, and /openapi.json."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from gpt_small.serve import create_app  # noqa: E402
from gpt_small.serve.protocol import _CHAT_FIELDS, _COMPLETION_FIELDS, _POEM_FIELDS, chat_prompt  # noqa: E402
from serve_util import NAME, failing_decode_steps, sse_events  # noqa: E402


def complete(client, prompt, **kw):
    r = client.post("/v1/completions", json={"model": NAME, "prompt": prompt, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def chat(client, messages, **kw):
    r = client.post("/v1/chat/completions", json={"model": NAME, "messages": messages, **kw})
    assert r.status_code == 200, r.text
    return r.json()


# --- chat ---


def test_chat_is_the_completion_of_its_template(client):
    """One user message: the reply is the completion of its text; system messages are left out;
    earlier turns come before, one per line."""
    one = chat(client, [{"role": "user", "content": "The sea"}], max_tokens=30, seed=4)
    assert one["object"] == "chat.completion" and one["id"].startswith("chatcmpl-")
    choice = one["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    plain = complete(client, "The sea", max_tokens=30, seed=4)
    assert choice["message"]["content"] == plain["choices"][0]["text"]
    assert one["usage"] == plain["usage"]

    with_system = chat(client, [{"role": "system", "content": "You are a helpful assistant."},
                                {"role": "user", "content": [{"type": "text", "text": "The "},
                                                             {"type": "text", "text": "sea"}]}],
                       max_completion_tokens=30, seed=4)
    assert with_system["choices"][0]["message"]["content"] == choice["message"]["content"]

    turns = [{"role": "user", "content": "Rain on the roof"}, {"role": "assistant", "content": "and on the hill"},
             {"role": "developer", "content": "ignored"}, {"role": "user", "content": "and then"}]
    assert chat_prompt(turns) == "Rain on the roof\nand on the hill\nand then"
    many = chat(client, turns, max_tokens=20, seed=9)
    assert many["choices"][0]["message"]["content"] == complete(client, chat_prompt(turns), max_tokens=20,
                                                                seed=9)["choices"][0]["text"]


def test_chat_stream_n_stop_and_usage(client):
    msgs = [{"role": "user", "content": "Wind"}]
    whole = chat(client, msgs, max_tokens=40, seed=2, n=2)
    texts = [c["message"]["content"] for c in whole["choices"]]
    assert [c["index"] for c in whole["choices"]] == [0, 1] and texts[0] != texts[1]
    r = client.post("/v1/chat/completions", json={"model": NAME, "messages": msgs, "max_tokens": 40, "seed": 2, "n": 2,
                                                  "stream": True, "stream_options": {"include_usage": True}})
    chunks = sse_events(r.text)
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    for i in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in mine) == texts[i]
        assert mine[-1]["finish_reason"] == "length" and mine[-1]["delta"] == {}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]

    stop = texts[0][12:14]
    cut = chat(client, msgs, max_tokens=40, seed=2, stop=stop)["choices"][0]
    assert cut["message"]["content"] == texts[0][:texts[0].index(stop)] and cut["finish_reason"] == "stop"


CHAT_BAD = [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"store": True}, "store"),
    ({"logit_bias": {"5": 1}}, "logit_bias"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ({"logprobs": True, "top_logprobs": 6}, "top_logprobs"),
    ({"max_completion_tokens": 301}, "max_completion_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages[0].role"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "user", "content": "日本"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "a"}] * 257}, "messages"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"model": "gpt-4o"}, "model"),
]


@pytest.mark.parametrize("extra,param", CHAT_BAD, ids=[p for _, p in CHAT_BAD])
def test_chat_refuses_what_it_cannot_honour_by_name(client, extra, param):
    body = {"model": NAME, "messages": [{"role": "user", "content": "a"}], "max_tokens": 2, **extra}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code in (400, 404), r.text
    err = r.json()["error"]
    assert err["param"] == param and param.split(".")[0].split("[")[0] in err["message"]


def test_chat_accepts_neutral_values_of_known_fields(client):
    body = {"model": NAME, "messages": [{"role": "user", "content": "a", "name": "me"}] * 3, "max_tokens": 2,
            "tools": [], "tool_choice": "none", "parallel_tool_calls": False, "metadata": {}, "response_format": {"type": "text"}, "modalities": ["text"],
            "store": False, "logit_bias": {}, "presence_penalty": 0, "user": "u"}
    assert client.post("/v1/chat/completions", json=body).status_code == 200


# --- logprobs ---


def model_logprobs(reference, tok, prompt: str, text: str) -> torch.Tensor:
    """(len(text), V): the model's log-softmax at each position of the continuation."""
    ids = tok.encode(prompt) + tok.encode(text)
    with torch.no_grad():
        logits = reference(torch.tensor([ids]))[0]  # (T, V)
    return torch.log_softmax(logits.float(), -1)[len(tok.encode(prompt)) - 1:len(ids) - 1]


def test_completion_logprobs_equal_the_models_log_softmax(client, model_tok, reference):
    _, tok = model_tok
    r = complete(client, "The sea", max_tokens=40, seed=3, logprobs=5, temperature=0.7)
    choice = choice0 = r["choices"][0]
    lp = choice["logprobs"]
    text = choice["text"]
    assert "".join(lp["tokens"]) == text and len(lp["tokens"]) == 40
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:k]) for k in range(40)]
    want = model_logprobs(reference, tok, "The sea", text)
    ids = tok.encode(text)
    assert torch.allclose(torch.tensor(lp["token_logprobs"]), want[torch.arange(40), ids], atol=1e-4)
    for k, top in enumerate(lp["top_logprobs"]):
        assert len(top) == 5
        values, indices = torch.topk(want[k], 5)
        assert {tok.decode([i]) for i in indices.tolist()} == set(top)
        assert torch.allclose(torch.tensor(sorted(top.values(), reverse=True)), values, atol=1e-4)

    # streamed: the same tokens and numbers, spread over the chunks
    s = client.post("/v1/completions", json={"model": NAME, "prompt": "The sea", "max_tokens": 40, "seed": 3,
                                             "logprobs": 5, "temperature": 0.7, "stream": True})
    parts = [c["choices"][0]["logprobs"] for c in sse_events(s.text) if c["choices"][0]["logprobs"]]
    assert len(parts) > 5
    assert sum((p["tokens"] for p in parts), []) == lp["tokens"]
    assert sum((p["token_logprobs"] for p in parts), []) == lp["token_logprobs"]
    assert sum((p["text_offset"] for p in parts), []) == lp["text_offset"]

    # logprobs: 0 gives the sampled token's only; a stop string drops the tokens it cut
    zero = complete(client, "The sea", max_tokens=40, seed=3, logprobs=0, temperature=0.7)["choices"][0]["logprobs"]
    assert zero["top_logprobs"] is None and zero["token_logprobs"] == lp["token_logprobs"]
    stop = text[20:22]
    cut = complete(client, "The sea", max_tokens=40, seed=3, logprobs=1, temperature=0.7, stop=stop)["choices"][0]
    assert "".join(cut["logprobs"]["tokens"]) == cut["text"] == text[:text.index(stop)]
    assert choice0["logprobs"]["token_logprobs"][:len(cut["text"])] == cut["logprobs"]["token_logprobs"]


def test_chat_logprobs_in_chats_shape(client, model_tok, reference):
    _, tok = model_tok
    r = chat(client, [{"role": "user", "content": "Night"}], max_tokens=20, seed=8, logprobs=True, top_logprobs=3)
    choice = r["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(c["token"] for c in content) == choice["message"]["content"]
    want = model_logprobs(reference, tok, "Night", choice["message"]["content"])
    for k, c in enumerate(content):
        assert c["bytes"] == list(c["token"].encode()) and len(c["top_logprobs"]) == 3
        assert abs(c["logprob"] - float(want[k, tok.encode(c["token"])[0]])) < 1e-4
        assert abs(c["top_logprobs"][0]["logprob"] - float(want[k].max())) < 1e-4
    plain = chat(client, [{"role": "user", "content": "Night"}], max_tokens=20, seed=8)
    assert plain["choices"][0]["logprobs"] is None
    assert plain["choices"][0]["message"]["content"] == choice["message"]["content"]  # scoring changes nothing


# --- operators ---


def scrape(client) -> dict:
    """{(name, labels as a sorted tuple): value} of every sample."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def test_prompt_tokens_and_request_times_are_counted_per_sample_and_per_request(client):
    before = scrape(client)
    one = complete(client, "The sea", max_tokens=3, seed=1)
    three = complete(client, "The sea", max_tokens=3, seed=1, n=3)
    after = scrape(client)
    delta = lambda key: after.get(key, 0) - before.get(key, 0)  # noqa: E731
    # each finished sample counts its prompt: a request for 3 samples counts it three times
    assert delta(("gpt_small_prompt_tokens_total", ())) == one["usage"]["prompt_tokens"] * 4
    assert three["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
    route = (("route", "/v1/completions"),)
    assert delta(("gpt_small_request_duration_seconds_count", route)) == 2
    assert delta(("gpt_small_request_duration_seconds_sum", route)) > 0
    assert delta(("gpt_small_time_to_first_token_seconds_sum", ())) > 0


def test_metrics_count_requests_tokens_and_latencies(client):
    before = scrape(client)
    ok = ("gpt_small_requests_total", (("route", "/v1/completions"), ("status", "200")))
    bad = ("gpt_small_requests_total", (("route", "/v1/completions"), ("status", "400")))
    chat_ok = ("gpt_small_requests_total", (("route", "/v1/chat/completions"), ("status", "200")))
    complete(client, "a", max_tokens=7, seed=1)
    complete(client, "a", max_tokens=5, seed=1, n=3)
    chat(client, [{"role": "user", "content": "b"}], max_tokens=4)
    client.post("/v1/completions", json={"model": NAME, "prompt": "a", "max_tokens": 0})
    client.get("/no/such/route")
    after = scrape(client)
    delta = lambda key: after.get(key, 0) - before.get(key, 0)  # noqa: E731
    assert delta(ok) == 2 and delta(bad) == 1 and delta(chat_ok) == 1
    assert delta(("gpt_small_requests_total", (("route", "other"), ("status", "404")))) == 1
    assert delta(("gpt_small_generated_tokens_total", ())) == 7 + 15 + 4
    assert delta(("gpt_small_time_to_first_token_seconds_count", ())) == 5
    assert delta(("gpt_small_time_per_output_token_seconds_count", ())) == 5
    assert delta(("gpt_small_samples_total", (("finish_reason", "length"),))) == 5
    assert after[("gpt_small_queue_depth", ())] == 0 and after[("gpt_small_running_rows", ())] == 0


def test_bearer_scheme_any_case_and_metrics_behind_the_key(model_tok):
    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]
    with TestClient(create_app(model=model, tokenizer=tok, model_name=NAME, api_key="s3cret")) as c:
        for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
            assert c.get("/v1/models", headers={"Authorization": f"{scheme} s3cret"}).status_code == 200
        for given in ("Basic s3cret", "Bearer", "Bearers3cret", "Bearer s3cret2"):
            assert c.get("/v1/models", headers={"Authorization": given}).status_code == 401
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"Authorization": "bearer s3cret"}).status_code == 200


def test_draining_answers_503_with_retry_after(model_tok):
    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]
    app = create_app(model=model, tokenizer=tok, model_name=NAME)
    with TestClient(app) as c:
        app.state.draining = True
        r = c.post("/v1/completions", json={"model": NAME, "prompt": "a", "max_tokens": 2})
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
        assert r.json()["error"]["code"] == "service_unavailable"
        app.state.draining = False
        app.state.engine.close()  # the engine itself refusing: 503 too, not 429
        r = c.post("/v1/chat/completions", json={"model": NAME, "messages": [{"role": "user", "content": "a"}]})
        assert r.status_code == 503 and r.headers["retry-after"]
        assert r.json()["error"]["message"] == "the server is shutting down; retry on another server or once it is back"


def test_openapi_lists_every_route_and_every_accepted_field(client):
    schema = client.get("/openapi.json").json()
    assert schema["openapi"].startswith("3.")
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/poem", "/v1/models", "/v1/models/{model}",
                 "/healthz", "/metrics"):
        assert path in schema["paths"], path
    bodies = {p: schema["paths"][p]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
              for p in ("/v1/completions", "/v1/chat/completions", "/v1/poem")}
    assert set(bodies["/v1/completions"]) == _COMPLETION_FIELDS
    assert set(bodies["/v1/chat/completions"]) == _CHAT_FIELDS
    assert set(bodies["/v1/poem"]) == _POEM_FIELDS
    assert bodies["/v1/completions"]["max_tokens"]["maximum"] == 300


def test_a_failed_decode_step_ends_streams_with_an_error_event(model_tok):
    """A failure inside the decode loop (injected: the step raises) reaches each client as an
    error in OpenAI's shape, a 500 or an error event before [DONE], never a bare end."""
    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]
    app = create_app(model=model, tokenizer=tok, model_name=NAME)
    with TestClient(app, raise_server_exceptions=False) as c:
        with failing_decode_steps(app):
            for path, body in (("/v1/completions", {"prompt": "a"}),
                               ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]})):
                r = c.post(path, json={"model": NAME, "max_tokens": 5, "stream": True, **body})
                events = sse_events(r.text)
                assert events[-1]["error"]["type"] == "server_error", events
                r = c.post(path, json={"model": NAME, "max_tokens": 5, **body})
                assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert c.post("/v1/completions", json={"model": NAME, "prompt": "a", "max_tokens": 3}).status_code == 200


def test_max_completion_tokens_wins_over_max_tokens(client):
    # OpenAI deprecated max_tokens for max_completion_tokens; a client sending both means the newer
    for newer, older in ((3, 5), (5, 3)):
        body = chat(client, [{"role": "user", "content": "The sea"}], max_completion_tokens=newer,
                    max_tokens=older, temperature=0)
        assert body["usage"]["completion_tokens"] == newer
        assert body["choices"][0]["finish_reason"] == "length"
