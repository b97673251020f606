"""`gpt-small serve` in-process (Starlette's TestClient over the real app, engine and model):
every endpoint, every kind of bad request, and continuous batching's contract, that a seeded
sample is the same text alone (generate_text) and in a batch of eight."""

from __future__ import annotations

import copy
import re
import threading

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from starlette.testclient import TestClient  # noqa: E402

from gpt_small.ops import kernels  # noqa: E402
from gpt_small.generate import generate_text  # noqa: E402
from gpt_small.serve import Engine, Sequence, create_app  # noqa: E402
from gpt_small.serve.app import StanzaBreaks  # noqa: E402
from gpt_small.serve.protocol import Sampling  # noqa: E402
from serve_util import NAME, make_model, sse_events  # noqa: E402

# Rows of a batch equal lone rows exactly where the decoding matmuls are row-independent: the C
# kernel (engine.py's docstring). torch's fallback GEMM rounds differently at other batch sizes.
needs_kernel = pytest.mark.skipif(not kernels.available(), reason=f"exact only with the C kernel; {kernels.describe()}")


def alone(reference, tok, prompt, n_tokens, **kw) -> str:
    return generate_text(reference, tok, prompt, max_new_tokens=n_tokens, **kw)[0][len(prompt):]


# --- endpoints ---


def test_healthz_models_and_page(client, model_tok):
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["model"] == NAME and h["params"] == model_tok[0].num_params()
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [NAME]
    assert client.get(f"/v1/models/{NAME}").json()["id"] == NAME
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset in ("/static/app.js", "/static/style.css"):
        r = client.get(asset)
        assert r.status_code == 200 and len(r.text) > 1000
        assert "http://" not in r.text and "https://" not in r.text  # no CDN: the machine has no network
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text)  # every asset from this server


def test_completion_equals_generate_alone_and_counts_usage(client, model_tok, reference):
    _, tok = model_tok
    r = client.post("/v1/completions", json={"model": NAME, "prompt": "The sea", "max_tokens": 90, "seed": 11,
                                             "temperature": 0.9, "top_k": 20, "top_p": 0.95})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == NAME
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    # 90 tokens past the 64-token window: the sliding re-prefill is exercised too
    assert choice["text"] == alone(reference, tok, "The sea", 90, seed=11, temperature=0.9, top_k=20, top_p=0.95)
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 90, "total_tokens": 97}


@needs_kernel
def test_n_samples_use_seed_plus_index_and_run_as_one_batch_of_eight(client, model_tok, reference):
    """Eight samples of one request enter the engine together; each equals a lone run of seed + j."""
    _, tok = model_tok
    before = client.get("/healthz").json()["steps"]
    r = client.post("/v1/completions", json={"model": NAME, "prompt": "O moon", "max_tokens": 40, "n": 8,
                                             "seed": 100, "temperature": 1.0, "repetition_penalty": 1.3})
    texts = [c["text"] for c in r.json()["choices"]]
    assert client.get("/healthz").json()["peak_batch"] == 8 and client.get("/healthz").json()["steps"] > before
    assert len(set(texts)) == 8
    assert texts == [alone(reference, tok, "O moon", 40, seed=100 + j, temperature=1.0, repetition_penalty=1.3)
                     for j in range(8)]


@needs_kernel
def test_engine_joins_sequences_mid_flight_and_each_equals_alone(model_tok, reference):
    """Continuous batching: four sequences start, four more join while they run (some later past
    the window), with different prompts and sampling options; every one equals generate_text alone."""
    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]
    prompts = ["The sea", "When I", "O", "Night falls,", "Stars", "a", "Under the old tree", "Why"]
    options = [dict(temperature=t, top_k=k, top_p=p, repetition_penalty=rp, seed=s)
               for t, k, p, rp, s in zip([0.7, 1.0, 0.0, 1.2, 0.8, 1.0, 0.5, 1.0], [None, 5, None, 30, None, None, 3, 10],
                                         [None, None, None, 0.9, 0.8, None, None, None],
                                         [1.0, 1.0, 1.2, 1.0, 1.1, 1.0, 1.0, 1.5], range(8))]
    lengths = [80, 30, 50, 70, 20, 90, 40, 60]
    done = [threading.Event() for _ in prompts]
    engine = Engine(model, tok, max_batch=8)
    seqs: list[Sequence] = []
    late = []

    def on_event(i, kind, value):
        if kind == "done":
            done[i].set()
        elif i == 0 and len(seqs[0].new_ids) == 10:  # the first four are 10 tokens in: the rest join
            engine.submit(late)

    for i, (p, o, n) in enumerate(zip(prompts, options, lengths)):
        seqs.append(Sequence(tok.encode(p), Sampling(**o), max_new_tokens=n, tokenizer=tok,
                             on_event=lambda k, v, i=i: on_event(i, k, v)))
    late.extend(seqs[4:])
    try:
        engine.submit(seqs[:4])
        assert all(e.wait(120) for e in done)
        assert engine.stats()["peak_batch"] == 8
    finally:
        engine.close()
    for s, p, o, n in zip(seqs, prompts, options, lengths):
        assert s.finish_reason == "length"
        assert s.text == alone(reference, tok, p, n, **o), p


def test_stop_is_cut_and_not_returned(client, model_tok, reference):
    _, tok = model_tok
    full = alone(reference, tok, "The", 120, seed=5, temperature=1.0)
    stop = full[30:32]  # text that occurs in the sample; the first occurrence ends it
    r = client.post("/v1/completions", json={"model": NAME, "prompt": "The", "max_tokens": 120, "seed": 5,
                                             "stop": [stop, "@@@"]}).json()
    assert r["choices"][0]["text"] == full[:full.index(stop)]
    assert r["choices"][0]["finish_reason"] == "stop"


def test_streamed_completion_in_openai_chunks(client, model_tok, reference):
    _, tok = model_tok
    r = client.post("/v1/completions", json={"model": NAME, "prompt": "Wind", "max_tokens": 30, "seed": 2,
                                             "stream": True, "stream_options": {"include_usage": True}})
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = sse_events(r.text)
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == alone(reference, tok, "Wind", 30, seed=2, temperature=1.0)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 30


def test_echo_and_a_list_of_prompts(client):
    r = client.post("/v1/completions", json={"model": NAME, "prompt": ["Rain", "Snow"], "max_tokens": 5,
                                             "echo": True, "seed": 1}).json()
    assert [c["text"][:4] for c in r["choices"]] == ["Rain", "Snow"]
    assert r["usage"]["prompt_tokens"] == 8 and r["usage"]["completion_tokens"] == 10


def test_poem_lines_stanzas_timing_and_stream(client):
    r = client.post("/v1/poem", json={"prompt": "The sea\n", "lines": 2, "stanzas": 2, "seed": 3,
                                      "temperature": 0.9}).json()
    assert r["finish_reason"] == "stop", r
    assert r["text"].count("\n") == 5 and "\n\n" in r["text"]  # 4 lines, one blank line between stanzas
    assert r["poem"] == "The sea\n" + r["text"]
    assert r["timing"]["tokens"] == r["usage"]["completion_tokens"] > 0 and r["timing"]["tokens_per_s"] > 0
    s = client.post("/v1/poem", json={"prompt": "The sea\n", "lines": 2, "stanzas": 2, "seed": 3,
                                      "temperature": 0.9, "stream": True})
    events = sse_events(s.text)
    assert "".join(e["text"] for e in events if "text" in e and not e.get("done")) == r["text"]
    assert events[-1]["done"] and events[-1]["text"] == r["text"]


def test_stanza_breaks_and_stop_hold_back():
    b = StanzaBreaks(2, 3)
    assert "".join(b.feed(p) for p in ["a\nb", "\nc\n", "d\ne\nf\n"]) == "a\nb\n\nc\nd\n\ne\nf\n"
    pieces = []
    tok = make_model()[1]
    s = Sequence([0], Sampling(), max_new_tokens=50, tokenizer=tok, stop=["END"],
                 on_event=lambda k, v: pieces.append(v) if k == "text" else None)
    for c in "abcEN":
        s.feed(tok.encode(c)[0])
    assert "".join(pieces) == "abc"  # "EN" may start the stop string: held back
    s.feed(tok.encode("D")[0])
    assert s.finish_reason == "stop" and s.text == "abc"


# --- bad requests: 4xx in OpenAI's shape, never a 500, and the server keeps serving ---

JSON = {"Content-Type": "application/json"}
LONG = "a" * 201
BAD = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"prompt": "a"}, 400, "model"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "a"}, 404, "model"),
    ("/v1/completions", {"model": NAME, "prompt": 7}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": [[1, 2]]}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "temperature": 2.5}, 400, "temperature"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "top_k": 2.5}, 400, "top_k"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "max_tokens": 301}, 400, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "max_tokens": True}, 400, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "n": 9}, 400, "n"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "stop": ""}, 400, "stop"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "seed": "x"}, 400, "seed"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "logprobs": 6}, 400, "logprobs"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "logprobs": 1, "echo": True}, 400, "logprobs"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "stop": "x" * 101}, 400, "stop"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "suffix": "b"}, 400, "suffix"),
    ("/v1/completions", b'{"model": "tiny-poet", "prompt": "a", "max_tokens": 1e400}', 400, None),
    ("/v1/completions", b'{"model": "tiny-poet", "prompt": "a", "seed": ' + b"9" * 5000 + b"}", 400, None),
    ("/v1/completions", b'{"model": "tiny-poet", "prompt": "a", "temperature": NaN}', 400, None),
    ("/v1/completions", b'{"model": "tiny-poet", "\\ud800": 1}', 400, None),
    ("/v1/completions", b'{"model": "tiny-poet", "prompt": "\\udc00"}', 400, None),
    ("/v1/completions", b"[" * 100000, 400, None),
    ("/v1/completions", {"model": NAME, "prompt": "a", "presence_penalty": 1}, 400, "presence_penalty"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "frobnicate": 1}, 400, "frobnicate"),
    ("/v1/completions", {"model": NAME, "prompt": "日本"}, 400, "prompt"),  # outside the vocabulary
    ("/v1/completions", {"model": NAME, "prompt": LONG}, 400, "prompt"),  # past max_prompt_tokens
    ("/v1/completions", {"model": NAME, "prompt": "a" * 5000}, 400, "prompt"),
    ("/v1/poem", {"lines": 0}, 400, "lines"),
    ("/v1/poem", {"lines": "many"}, 400, "lines"),
    ("/v1/poem", {"prompt": ["a"]}, 400, "prompt"),
    ("/v1/poem", {"prompt": "ü"}, 400, "prompt"),
    ("/v1/poem", {"temperature": -1}, 400, "temperature"),
    ("/v1/poem", {"repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/poem", {"model": "other"}, 404, "model"),
    ("/v1/poem", b"\xff\xfe", 400, None),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_4xx_in_openai_shape(client, path, body, status, param):
    r = (client.post(path, content=body, headers=JSON) if isinstance(body, bytes) else client.post(path, json=body))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and "\n" not in err["message"]
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_unknown_routes_methods_and_big_bodies(client):
    for r, status in [(client.get("/v1/nothing"), 404), (client.get("/v1/completions"), 405),
                      (client.post("/v1/completions", content=b"x" * ((1 << 20) + 1), headers=JSON), 413),
                      (client.get("/v1/models/other"), 404)]:
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert client.post("/v1/completions", json={"model": NAME, "prompt": "ok", "max_tokens": 3}).status_code == 200


def test_api_key_and_full_queue(model_tok):
    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]
    app = create_app(model=model, tokenizer=tok, model_name=NAME, max_batch=1, max_queue=0, api_key="s3cret")
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200  # the page and health check stay open
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = c.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        auth = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=auth).status_code == 200
        # two samples, one row, no queue: refused at once with Retry-After
        r = c.post("/v1/completions", headers=auth, json={"model": NAME, "prompt": "a", "n": 2, "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        r = c.post("/v1/completions", headers=auth, json={"model": NAME, "prompt": "a", "max_tokens": 2})
        assert r.status_code == 200


@needs_kernel
@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal", "rope"])
def test_per_row_positions_equal_lone_decoding(pos_encoding):
    """model.py's hook for the engine: rows prefilled into their own cache rows, then one batched
    token at per-row positions, give exactly the logits of each row decoded alone."""
    from gpt_small.config import GPTConfig
    from gpt_small.kv_cache import rows_of
    from gpt_small.model import GPT

    torch.manual_seed(0)
    extra = dict(ngram=3, ngram_buckets=512, qk_norm=True) if pos_encoding == "rope" else {}
    m = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=64, pos_encoding=pos_encoding,
                      **extra)).eval()
    prompts = [torch.randint(0, 64, (1, t)) for t in (3, 7, 5)]
    nxt = torch.randint(0, 64, (3,))
    with torch.inference_mode():
        lone = []
        for p, t in zip(prompts, nxt):
            m.setup_kv_cache(1, 32)
            m(p, input_pos=torch.arange(p.shape[1]))
            lone.append(m(t.view(1, 1), input_pos=torch.tensor([p.shape[1]]))[:, -1])
        m.setup_kv_cache(4, 32)
        for i, p in enumerate(prompts):
            with rows_of(m, i, i + 1):
                m(p, input_pos=torch.arange(p.shape[1]))
        batched = m(nxt.view(3, 1), input_pos=torch.tensor([[p.shape[1]] for p in prompts]))[:, -1]
        assert torch.equal(batched, torch.cat(lone))
        m.kv_cache.copy_row(2, 0, 6)  # row 2 (5 prompt tokens + 1) copied to row 0: both decode alike
        both = m(torch.tensor([[7], [0], [7]]), input_pos=torch.tensor([[6], [1], [6]]))[:, -1]
        assert torch.equal(both[0], both[2])
    m.clear_kv_cache()
