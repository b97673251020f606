"""`GET /openapi.json` against the server it describes: the app serves the schema of its own limits;
a request body the schema allows is one the decoders accept and one it forbids they refuse, at
every documented edge (tests/test_limits_table.py's FIELDS, and the edges of lists and strings),
with limits unlike the defaults; each field's default is the decoder's; the fields refused by
name are refused by name; the error responses are OpenAI's error shape, as the server sends it;
every description is docs/serve.md's words; every GET route is listed. The schema is checked by a
small validator of the JSON Schema keywords it uses (nothing else may appear)."""

from __future__ import annotations

import copy
import json
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from starlette.testclient import TestClient  # noqa: E402

from gpt_small import limits as bounds  # noqa: E402
from gpt_small.serve import create_app  # noqa: E402
from gpt_small.serve.forms import FORMS  # noqa: E402
from gpt_small.serve.openapi import openapi_schema, request_schemas  # noqa: E402
from gpt_small.serve.protocol import (_CHAT_UNSUPPORTED, ApiError, HttpLimits, Limits, decode_chat,  # noqa: E402
                                      decode_completion, decode_poem)
from test_limits_table import FIELDS, TOK, _value  # noqa: E402

NAME = "schema-model"
# limits unlike the defaults, so a bound the schema writes as a constant is caught
HTTP = HttpLimits(max_stop_strings=2, max_stop_chars=7, max_top_logprobs=3, max_messages=5)
LIMITS = Limits(model_name=NAME, max_new_tokens=7, max_prompt_tokens=9, max_n=3, max_poem_lines=6, http=HTTP)
DECODERS = {"/v1/completions": decode_completion, "/v1/chat/completions": decode_chat, "/v1/poem": decode_poem}
BASE = {"/v1/completions": {"model": NAME, "prompt": "a"},
        "/v1/chat/completions": {"model": NAME, "messages": [{"role": "user", "content": "a"}]},
        "/v1/poem": {"prompt": "a"}}
DOCS = " ".join((Path(__file__).resolve().parent.parent / "docs" / "serve.md").read_text().replace("`", "").split())
KEYWORDS = {"type", "properties", "required", "additionalProperties", "items", "enum", "const", "oneOf", "minimum",
            "maximum", "exclusiveMinimum", "minLength", "maxLength", "minItems", "maxItems", "maxProperties",
            "default", "description"}
KINDS = {"object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
         "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
         "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
         "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "null": lambda v: v is None}


def same(a: Any, b: Any) -> bool:
    """JSON equality: false is not 0."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def valid(v: Any, s: dict[str, Any]) -> bool:
    """Whether JSON value v meets schema s (the keywords of KEYWORDS; a schema using another fails)."""
    assert set(s) <= KEYWORDS, set(s) - KEYWORDS
    if "oneOf" in s:
        return sum(valid(v, x) for x in s["oneOf"]) == 1
    if "const" in s and not same(v, s["const"]) or "enum" in s and not any(same(v, e) for e in s["enum"]):
        return False
    if "type" in s and not any(KINDS[k](v) for k in ([s["type"]] if isinstance(s["type"], str) else s["type"])):
        return False
    if KINDS["number"](v) and (v < s.get("minimum", v) or v > s.get("maximum", v)
                               or "exclusiveMinimum" in s and v <= s["exclusiveMinimum"]):
        return False
    if isinstance(v, (str, list)):
        least, most = ("minLength", "maxLength") if isinstance(v, str) else ("minItems", "maxItems")
        if not s.get(least, 0) <= len(v) <= s.get(most, len(v)):
            return False
    if isinstance(v, list) and "items" in s and not all(valid(x, s["items"]) for x in v):
        return False
    if isinstance(v, dict):
        props = s.get("properties", {})
        if len(v) > s.get("maxProperties", len(v)) or any(k not in v for k in s.get("required", [])):
            return False
        if s.get("additionalProperties") is False and set(v) - set(props):
            return False
        return all(valid(x, props[k]) for k, x in v.items() if k in props)
    return True


def accepted(route: str, body: dict[str, Any], limits: Limits = LIMITS) -> bool:
    try:
        DECODERS[route](body, TOK, limits)
    except ApiError as e:
        assert e.status in (400, 404), (route, body, e.status)
        return False
    return True


def agree(route: str, body: dict[str, Any], limits: Limits = LIMITS) -> None:
    schema = request_schemas(limits)[route]
    assert valid(body, schema) == accepted(route, body, limits), (route, body)


def test_the_app_serves_the_schema_of_its_own_limits(model_tok):
    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]
    app = create_app(model=model, tokenizer=tok, model_name=NAME, max_new_tokens=7, max_prompt_tokens=9, http=HTTP)
    with TestClient(app) as c:
        r = c.get("/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == json.loads(json.dumps(openapi_schema(app.state.limits)))
    # the API's version is its paths' (/v1/)
    assert r.json()["openapi"] == "3.1.0" and r.json()["info"] == {"title": "gpt-small serve", "version": "1"}


@pytest.mark.parametrize("f", FIELDS, ids=lambda f: f"{f.route}:{f.name}")
def test_schema_and_decoder_agree_on_each_fields_edges_and_default(f):
    for limits in (LIMITS, Limits(model_name=NAME)):
        base = BASE[f.route]
        for v in (f.lo, f.hi, f.below, f.above):
            if v is not None:
                agree(f.route, {**base, **f.body(_value(v, limits))}, limits)
        prop = request_schemas(limits)[f.route]["properties"][f.name]
        assert same(prop.get("default"), _value(f.default, limits)), (f.name, prop)


def test_schema_and_decoder_agree_on_lists_strings_and_choices():
    h, n = HTTP, LIMITS.max_n
    cases = {
        "/v1/completions": [
            {"stop": "x"}, {"prompt": ["a"]}, {"stop": "x" * h.max_stop_chars}, {"stop": "x" * (h.max_stop_chars + 1)}, {"stop": ""},
            {"stop": ["x"] * h.max_stop_strings}, {"stop": ["x"] * (h.max_stop_strings + 1)},
            {"stop": ["x" * (h.max_stop_chars + 1)]}, {"stop": [""]}, {"stop": 3},
            {"prompt": ["a"] * n}, {"prompt": ["a"] * (n + 1)}, {"prompt": []}, {"prompt": 3},
            {"model": "other"}, {"model": None}, {"unknown": 1}, {"logit_bias": {}}, {"logit_bias": {"1": 1}},
            {"stream": True}, {"stream": 1}, {"echo": True}, {"echo": "yes"}, {"user": "u"}, {"user": 1},
            {"stream_options": {"include_usage": True}}, {"stream_options": {"other": True}},
            {"stream_options": {"include_usage": 1}}, {"logprobs": None}, {"prompt": ["a", 3]},
            {"top_k": -1}, {"top_k": 0}, {"top_k": -2}, {"best_of": 1}, {"best_of": "1"},
        ],
        "/v1/chat/completions": [
            {"messages": [{"role": "user", "content": "a"}] * h.max_messages},
            {"messages": [{"role": "user", "content": "a"}] * (h.max_messages + 1)}, {"messages": []},
            *({"messages": [{"role": role, "content": "a"}]} for role in ("system", "developer", "user", "assistant",
                                                                           "tool", "robot")),
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]},
            {"messages": [{"role": "user", "content": [{"type": "image_url", "text": "a"}]}]},
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]},
            {"messages": [{"role": "user", "content": 3}]}, {"messages": [{"role": "user", "content": "a", "name": "b"}]},
            {"response_format": {"type": "text"}}, {"response_format": {"type": "json_object"}},
            {"response_format": {}}, {"response_format": {"type": "text", "strict": True}},
            {"messages": [{"role": "user"}]}, {"messages": [{"content": "a"}]}, {"messages": ["a"]},
            {"messages": [{"role": "user", "content": "a", "name": 3}]},
            {"messages": [{"role": "user", "content": "a", "name": None}]},
            # OpenAI's fields of a reply sent back: null accepted, anything else refused
            *({"messages": [{"role": "assistant", "content": "a", name: value}]}
              for name in ("tool_calls", "function_call", "audio", "refusal") for value in (None, "x")),
            {"messages": [{"role": "user", "content": "a", "other": None}]},
            {"modalities": ["text"]}, {"modalities": ["audio"]}, {"store": False}, {"store": True},
            {"logprobs": True}, {"logprobs": 1}, {"stop": ["x"] * (h.max_stop_strings + 1)}, {"unknown": 1},
        ],
        "/v1/poem": [
            *({"form": name} for name in FORMS), {"form": "villanelle-ish"}, {"model": NAME}, {"model": "other"},
            {"prompt": 3}, {"stream": True}, {"unknown": 1}, {"rhyme": 3}, {"rhyme": "ABAB", "lines": 4},
            *({"form": "couplets", "syllables": k} for k in (0, 1, bounds.MAX_SYLLABLES, bounds.MAX_SYLLABLES + 1)),
        ],
    }
    messageless = {k: v for k, v in BASE["/v1/chat/completions"].items() if k != "messages"}
    cases["/v1/chat/completions"].append(messageless)
    for route, bodies in cases.items():
        for body in bodies:
            agree(route, {**BASE[route], **body} if body is not messageless else body)
    assert not accepted("/v1/completions", {"prompt": "a"}) and not valid({"prompt": "a"},
                                                                          request_schemas(LIMITS)["/v1/completions"])


@pytest.mark.parametrize("route,name,attr", [("/v1/completions", "stream", "stream"), ("/v1/completions", "echo", "echo"),
                                             ("/v1/chat/completions", "stream", "stream"), ("/v1/poem", "stream", "stream")])
def test_flags_default_as_the_schema_states(route, name, attr):
    default = request_schemas(LIMITS)[route]["properties"][name]["default"]
    assert same(getattr(DECODERS[route](BASE[route], TOK, LIMITS), attr), default)


def test_chat_logprobs_default_off_as_the_schema_states():
    prop = request_schemas(LIMITS)["/v1/chat/completions"]["properties"]["logprobs"]
    assert prop["type"] == "boolean" and prop["default"] is False
    assert decode_chat(BASE["/v1/chat/completions"], TOK, LIMITS).logprobs is None  # off: no logprobs sent


def test_fields_known_to_openai_and_refused_are_refused_by_name():
    for route, refused in (("/v1/completions", ["suffix"]), ("/v1/chat/completions", list(_CHAT_UNSUPPORTED))):
        props = request_schemas(LIMITS)[route]["properties"]
        described = {k for k, p in props.items() if p.get("description") == "refused by name (400, param names the field)"}
        assert described == set(refused)
        for name in refused:
            with pytest.raises(ApiError) as e:
                DECODERS[route]({**BASE[route], name: "x"}, TOK, LIMITS)
            assert (e.value.status, e.value.param) == (400, name)


def walk(node: Any, path: tuple = ()):
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, (*path, i))


def test_every_description_is_the_docs_words_or_the_status_phrase():
    schema = openapi_schema(LIMITS)
    seen = 0
    for path, node in walk(schema):
        if path and path[-1] == "description" and isinstance(node, str):
            seen += 1
            status = path[-2] if len(path) > 1 and path[-3:-2] == ("responses",) else None
            assert node in DOCS or status is not None and node == HTTPStatus(int(status)).phrase, (path, node)
    assert seen > 20
    # OpenAPI requires a description of every response, and a response holds nothing else but its content
    for path, node in walk(schema["paths"]):
        if path[-2:-1] == ("responses",):
            assert "description" in node and set(node) <= {"description", "content"}, (path, node)
    assert f"temperature below {bounds.TEMPERATURE_FLOOR:g} (0 included) is greedy" in DOCS


def test_every_schema_uses_json_schemas_keywords_and_types():
    schema = openapi_schema(LIMITS)
    for path, body in request_schemas(LIMITS).items():
        assert schema["paths"][path]["post"]["requestBody"] == {
            "required": True, "content": {"application/json": {"schema": body}}}
        assert body["type"] == "object" and body["additionalProperties"] is False
    for path, node in walk(schema["paths"]):
        if isinstance(node, dict) and "schema" in node:
            for p, s in walk(node["schema"]):
                if isinstance(s, dict) and p[-1:] != ("properties",):
                    assert set(s) <= KEYWORDS, (path, p, s)
                    kind = s.get("type")
                    if kind is not None:
                        assert set([kind] if isinstance(kind, str) else kind) <= set(KINDS), (path, p, kind)
    assert schema["components"] == {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}


def test_error_responses_are_the_shape_the_server_sends(model_tok):
    schema = openapi_schema(LIMITS)
    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]
    with TestClient(create_app(model=model, tokenizer=tok, model_name=NAME, api_key="k")) as c:
        auth = {"Authorization": "Bearer k"}
        sent = {400: c.post("/v1/completions", json={"model": NAME, "prompt": "a", "n": 0}, headers=auth),
                401: c.post("/v1/completions", json={"model": NAME, "prompt": "a"}),
                404: c.post("/v1/completions", json={"model": "other", "prompt": "a"}, headers=auth),
                413: c.post("/v1/poem", content=b" " * ((1 << 20) + 1), headers={**auth,
                                                                                 "Content-Type": "application/json"}),
                415: c.post("/v1/poem", content=b"{}", headers={**auth, "Content-Type": "text/plain"})}
    for route in ("/v1/completions", "/v1/chat/completions", "/v1/poem"):
        responses = schema["paths"][route]["post"]["responses"]
        assert set(responses) == {"200", "400", "401", "404", "408", "413", "415", "429", "503"}
        ok = responses["200"]["content"]
        assert set(ok) == {"application/json", "text/event-stream"}
        assert ok["application/json"]["schema"]["type"] == "object" and ok["text/event-stream"]["schema"]["type"] == "string"
        for status, r in sent.items():
            assert r.status_code == status
            error_schema = responses[str(status)]["content"]["application/json"]["schema"]
            assert valid(r.json(), error_schema), (status, r.json())
            assert not valid({"error": {"message": "m"}}, error_schema)  # every field of the shape is required
            assert not valid({"error": {"message": 1, "type": "t", "param": None, "code": None}}, error_schema)
            assert not valid({"error": {"message": "m", "type": None, "param": None, "code": None}}, error_schema)
            assert not valid({"error": {"message": "m", "type": "t", "param": 1, "code": None}}, error_schema)
            assert not valid({"error": {"message": "m", "type": "t", "param": None, "code": 1}}, error_schema)
            assert not valid({}, error_schema) and not valid({"error": "m"}, error_schema)


def test_every_get_route_is_listed():
    paths = openapi_schema(LIMITS)["paths"]
    assert set(paths) == {"/v1/completions", "/v1/chat/completions", "/v1/poem", "/healthz", "/v1/models",
                          "/v1/models/{model}", "/openapi.json", "/metrics"}
    for path in ("/healthz", "/v1/models", "/v1/models/{model}", "/openapi.json"):
        assert paths[path]["get"]["responses"]["200"] == {
            "description": HTTPStatus.OK.phrase, "content": {"application/json": {"schema": {"type": "object"}}}}
    assert paths["/v1/models/{model}"]["get"]["parameters"] == [
        {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]
    assert "parameters" not in paths["/v1/models"]["get"]
    assert paths["/metrics"]["get"]["responses"]["200"]["content"] == {"text/plain": {"schema": {"type": "string"}}}
    assert all(paths[p]["post"]["responses"]["200"]["description"] in DOCS for p in DECODERS)
