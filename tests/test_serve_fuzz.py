"""Property-based fuzzing of the HTTP API, driven by the server's own /openapi.json: request bodies
built from each route's published fields, with values of every JSON kind, boundary numbers, huge
and tiny ones, lone surrogates and unknown fields; and raw bytes as bodies. Whatever arrives, the
answer is a 200 or a 4xx in OpenAI's error shape with a one-line message, never a 500.

Bounded for `make test` (GPT_SMALL_FUZZ_EXAMPLES per property, default 60); raise it for a longer
hunt, e.g. `GPT_SMALL_FUZZ_EXAMPLES=2000 pytest tests/test_serve_fuzz.py`."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from gpt_small.serve import create_app  # noqa: E402
from serve_util import make_model  # noqa: E402

NAME = "tiny-poet"
EXAMPLES = int(os.environ.get("GPT_SMALL_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def client():
    model, tok = make_model()
    # max_new_tokens 3: accepted requests finish at once, so the examples go to the decoding
    app = create_app(model=model, tokenizer=tok, model_name=NAME, max_new_tokens=3, max_prompt_tokens=50)
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def schemas(client):
    paths = client.get("/openapi.json").json()["paths"]
    return {p: v["post"]["requestBody"]["content"]["application/json"]["schema"]
            for p, v in paths.items() if "post" in v}


text = st.one_of(st.text(max_size=12), st.text(st.characters(codec=None), max_size=4),  # surrogates included
                 st.sampled_from(["", "a", "The sea", "\n", NAME, "text", "user", "assistant", "system", "none",
                                  "tool", "function", "json_object", "\x00", "\ud800", "日本"]))
numbers = st.one_of(st.integers(-3, 12), st.sampled_from([2**63 - 1, 2**63, -(2**63) - 1, 10**40, 0.0, -0.0, 0.5,
                                                          1e-300, 1e300, 2.0000001, 300, 301, 4, 5, 6, 8, 9]),
                    st.floats(allow_nan=False, allow_infinity=False), st.integers())
leaf = st.one_of(st.none(), st.booleans(), numbers, text)
anything = st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(text, inner, max_size=4)), max_leaves=12)


def shaped(schema: dict) -> st.SearchStrategy:
    """Values near what the schema asks for, often just outside it."""
    kind = schema.get("type")
    if "enum" in schema or "const" in schema:
        return st.one_of(st.sampled_from(schema.get("enum", [schema.get("const")])), anything)
    if "oneOf" in schema:
        return st.one_of(*[shaped(s) for s in schema["oneOf"]])
    if kind == "object" and "properties" in schema:
        return st.fixed_dictionaries({}, optional={k: shaped(v) for k, v in schema["properties"].items()})
    if kind == "array":
        return st.lists(shaped(schema.get("items", {})), max_size=min(schema.get("maxItems", 4) + 1, 6))
    return anything


def body_for(schema: dict) -> st.SearchStrategy:
    props = {k: shaped(v) for k, v in schema["properties"].items()}
    required = {k: props[k] for k in schema.get("required", [])}
    known = st.fixed_dictionaries({k: st.one_of(st.just(NAME), v) if k == "model" else v for k, v in required.items()},
                                  optional={k: v for k, v in props.items() if k not in required})
    return st.one_of(known, st.builds(lambda d, extra: {**d, **extra}, known, st.dictionaries(text, leaf, max_size=2)))


def check(r) -> None:
    assert r.status_code != 500, r.text[:300]
    if r.status_code == 200:
        if r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.endswith("data: [DONE]\n\n")
        else:
            r.json()
        return
    assert 400 <= r.status_code < 500, r.status_code
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"] and "\n" not in err["message"]


def send(client, path: str, body) -> None:
    # json.dumps escapes what UTF-8 cannot carry (lone surrogates) as \uXXXX, as a client would
    data = json.dumps(body).encode()
    check(client.post(path, content=data, headers={"Content-Type": "application/json"}))


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/poem"])
def test_fuzzed_bodies_get_200_or_a_4xx(client, schemas, path):
    @FUZZ
    @given(body=body_for(schemas[path]))
    def run(body):
        send(client, path, body)

    run()


def test_fuzzed_bytes_and_any_json_get_a_4xx(client):
    @FUZZ
    @given(raw=st.one_of(st.binary(max_size=64), anything.map(lambda v: json.dumps(v).encode()),
                         st.builds(lambda d, n: b'{"model": "tiny-poet", "prompt": "a", "max_tokens": %s}' % n,
                                   st.none(), st.sampled_from([b"1e400", b"-1e400", b"9" * 40, b"1" * 4301, b"1.5e3",
                                                               b"-0", b"0.1e1", b"Infinity", b"1" + b"0" * 31]))),
           path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/poem"]))
    def run(raw, path):
        check(client.post(path, content=raw, headers={"Content-Type": "application/json"}))

    run()
