"""Every documented limit and default of the HTTP API and the CLI, tested at its edge from a table.

HTTP API (docs/serve.md, protocol.py): for each row of FIELDS, the default when the field is
absent, the last accepted value at each end accepted, and the first refused value refused with a
400 naming the field. Server-wide limits live in `protocol.Limits` (what the code reads): every
field of it must have a probe in LIMIT_PROBES (a new limit fails here until it has one), each is
tested at its edge with a value other than its default (so the code cannot use a constant), and
its default must equal the one docs/serve.md, `create_app` and `gpt-small serve --help` state.

CLI: every option whose --help states a literal default states the value the parser (or, for the
config flags, GPTConfig/TrainConfig) really uses, and every `[--flag VALUE]` of a synopsis in the
README or docs/ names the parser's default.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from starlette.testclient import TestClient  # noqa: E402

from gpt_small import limits as bounds  # noqa: E402
from gpt_small.cli import build_parser  # noqa: E402
from gpt_small.config import GPTConfig, TrainConfig  # noqa: E402
from gpt_small.config_sources import config_flags  # noqa: E402
from gpt_small.serve import create_app  # noqa: E402
from gpt_small.serve import protocol  # noqa: E402
from gpt_small.serve.protocol import (ApiError, HttpLimits, Limits, decode_chat, decode_completion,  # noqa: E402
                                      decode_poem, parse_json)
from gpt_small.tokenizer import CharTokenizer  # noqa: E402
from serve_util import ALPHABET, make_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NAME = "edge-model"
TOK = CharTokenizer.train(ALPHABET)
DOCS = " ".join((ROOT / "docs" / "serve.md").read_text().split())  # whitespace-normalised

ROUTES = {"/v1/completions": (decode_completion, {"model": NAME, "prompt": "a"}),
          "/v1/poem": (decode_poem, {"prompt": "a"}),
          "/v1/chat/completions": (decode_chat, {"model": NAME, "messages": [{"role": "user", "content": "a"}]})}


@dataclass(frozen=True)
class Field:
    """One request field: where it is read back, its default, its accepted range [lo, hi]
    (a callable of Limits where a server flag sets it), and the first refused value past each end.
    Edges are read from where the code reads them (limits.py, protocol.Limits, protocol's request
    defaults), so a bound changed there is tested at its new edge here."""

    route: str
    name: str
    attr: str | None  # attribute path on the decoded request (None: not kept)
    default: Any
    lo: Any
    below: Any  # the first refused value under lo (None: no lower edge to test)
    hi: Any
    above: Any  # the first refused value over hi
    doc: str | None = None  # how docs/serve.md states it, formatted with l=Limits(), p=protocol, b=limits.py
    also: dict[str, Any] | None = None  # fields the request needs beside this one (top_logprobs: logprobs)

    def body(self, value: Any) -> dict[str, Any]:
        return {**(self.also or {}), self.name: value}


def L(name: str, plus: int = 0) -> Callable[[Limits], Any]:
    return lambda limits: getattr(limits, name) + plus


def up(v: Any) -> Any:
    """The first value past v upwards: the next int, or the next float (nothing between them)."""
    if callable(v):
        return lambda limits: up(v(limits))
    return v + 1 if isinstance(v, int) else math.nextafter(v, math.inf)


def down(v: Any) -> Any:
    if callable(v):
        return lambda limits: down(v(limits))
    return v - 1 if isinstance(v, int) else math.nextafter(v, -math.inf)


TINY = math.nextafter(0.0, 1.0)  # the smallest positive float: the edge of an interval open at 0
TOP = lambda limits: limits.http.max_top_logprobs  # noqa: E731


def _sampling_fields(route: str, temperature: float, doc: str | None) -> list[Field]:
    """The sampling fields both routes decode with protocol._sampling."""
    return [
        Field(route, "temperature", "sampling.temperature", temperature, 0.0, down(0.0),
              L("max_temperature"), up(L("max_temperature")), doc),
        Field(route, "top_p", "sampling.top_p", None, TINY, 0.0, 1.0, up(1.0)),
        Field(route, "repetition_penalty", "sampling.repetition_penalty", 1.0,
              bounds.MIN_REPETITION_PENALTY, down(bounds.MIN_REPETITION_PENALTY),
              bounds.MAX_REPETITION_PENALTY, up(bounds.MAX_REPETITION_PENALTY)),
        Field(route, "top_k", "sampling.top_k", None, 1, None, bounds.MAX_TOP_K, up(bounds.MAX_TOP_K)),  # 0, -1: off
        Field(route, "seed", "sampling.seed", None, 0, -1, bounds.MAX_SEED, up(bounds.MAX_SEED)),
    ]


FIELDS = [
    Field("/v1/completions", "max_tokens", "max_tokens", protocol.OPENAI_MAX_TOKENS, 1, 0, L("max_new_tokens"),
          L("max_new_tokens", 1), "`max_tokens` (default {p.OPENAI_MAX_TOKENS}, at most `--max-new-tokens`)"),
    *_sampling_fields("/v1/completions", protocol.OPENAI_TEMPERATURE,
                      "`temperature` (0-{l.max_temperature:g}, default {p.OPENAI_TEMPERATURE:g})"),
    Field("/v1/completions", "n", "n", 1, 1, 0, L("max_n"), L("max_n", 1), "`n` (up to {l.max_n} samples per request)"),
    # OpenAI's range is -2..2, of which only 0 (off) is implemented
    Field("/v1/completions", "presence_penalty", None, 0.0, 0.0, down(-2.0), 0.0, up(2.0)),
    Field("/v1/completions", "frequency_penalty", None, 0.0, 0.0, down(-2.0), 0.0, up(2.0)),
    Field("/v1/poem", "lines", "lines", protocol.POEM_LINES, 1, 0, L("max_poem_lines"), L("max_poem_lines", 1),
          "at most {l.max_poem_lines} `lines` per stanza of `/v1/poem`"),
    Field("/v1/poem", "stanzas", "stanzas", 1, 1, 0, bounds.MAX_STANZAS, up(bounds.MAX_STANZAS),
          "`stanzas` up to {b.MAX_STANZAS}"),
    Field("/v1/poem", "max_tokens", "max_tokens", L("max_new_tokens"), 1, 0, L("max_new_tokens"),
          L("max_new_tokens", 1)),
    *_sampling_fields("/v1/poem", bounds.DEFAULT_TEMPERATURE,
                      "`temperature` defaults to {p.OPENAI_TEMPERATURE:g} on `/v1/completions`, as OpenAI's, "
                      "and {b.DEFAULT_TEMPERATURE:g} on `/v1/poem`"),
    Field("/v1/completions", "logprobs", "logprobs", None, 0, -1, TOP, up(TOP),
          "`logprobs: N` (0 to {l.http.max_top_logprobs})"),
    # chat: OpenAI's defaults, its newer max_completion_tokens beside the older max_tokens
    Field("/v1/chat/completions", "max_completion_tokens", "max_tokens", L("max_new_tokens"), 1, 0, L("max_new_tokens"),
          L("max_new_tokens", 1), "`max_completion_tokens` (or the older `max_tokens`; default and maximum "
                                  "`--max-new-tokens`)"),
    Field("/v1/chat/completions", "max_tokens", "max_tokens", L("max_new_tokens"), 1, 0, L("max_new_tokens"),
          L("max_new_tokens", 1)),
    Field("/v1/chat/completions", "n", "n", 1, 1, 0, L("max_n"), L("max_n", 1)),
    *_sampling_fields("/v1/chat/completions", protocol.OPENAI_TEMPERATURE, None),
    Field("/v1/chat/completions", "presence_penalty", None, 0.0, 0.0, down(-2.0), 0.0, up(2.0)),
    Field("/v1/chat/completions", "frequency_penalty", None, 0.0, 0.0, down(-2.0), 0.0, up(2.0)),
    Field("/v1/chat/completions", "top_logprobs", "logprobs", 0, 0, -1, TOP, up(TOP),
          "`logprobs: true` with `top_logprobs` (0 to {l.http.max_top_logprobs}", also={"logprobs": True}),
]


def _doc(template: str) -> str:
    return template.format(l=Limits(model_name=NAME), p=protocol, b=bounds)


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _value(v: Any, limits: Limits) -> Any:
    return v(limits) if callable(v) else v


def _decode(route: str, extra: dict | bytes, limits: Limits):
    """Decode a request as the app does; `extra` as bytes is a whole raw body (parsed first)."""
    decode, base = ROUTES[route]
    return decode(parse_json(extra, limits.http) if isinstance(extra, bytes) else {**base, **extra}, TOK, limits)


def _refused(route: str, extra: dict, limits: Limits, param: str) -> ApiError:
    with pytest.raises(ApiError) as e:
        _decode(route, extra, limits)
    assert e.value.status == 400 and e.value.param == param, (e.value.status, e.value.param, e.value.message)
    assert param in e.value.message
    return e.value


# small limits, unlike the defaults: a limit read as a constant fails
SMALL = Limits(model_name=NAME, max_new_tokens=7, max_prompt_tokens=9, max_n=3)


@pytest.mark.parametrize("f", FIELDS, ids=lambda f: f"{f.route}:{f.name}")
def test_request_field_default_and_edges(f):
    for limits in (SMALL, Limits(model_name=NAME)):
        if f.attr is not None:
            assert _get(_decode(f.route, f.also or {}, limits), f.attr) == _value(f.default, limits)
            assert _get(_decode(f.route, f.body(None), limits), f.attr) == _value(f.default, limits)
        lo, hi = _value(f.lo, limits), _value(f.hi, limits)
        for v in (lo, hi):
            req = _decode(f.route, f.body(v), limits)
            if f.attr is not None:
                assert _get(req, f.attr) == v
        for v in (f.below, f.above):
            if v is not None:
                _refused(f.route, f.body(_value(v, limits)), limits, f.name)
        if isinstance(lo, int) and not isinstance(lo, bool):
            _refused(f.route, f.body("1"), limits, f.name)  # a string is not a number
            _refused(f.route, f.body(True), limits, f.name)  # nor is a bool
    if f.doc:
        assert _doc(f.doc) in DOCS, f"docs/serve.md no longer says {_doc(f.doc)!r}"


def test_top_k_off_values_and_stop_counts():
    assert _decode("/v1/completions", {"top_k": -1}, SMALL).sampling.top_k is None  # vLLM's "off"
    assert _decode("/v1/completions", {"top_k": 0}, SMALL).sampling.top_k is None
    _refused("/v1/completions", {"top_k": -2}, SMALL, "top_k")
    # stop: a string or up to max_stop_strings non-empty strings (OpenAI's limit; its edges: LIMIT_PROBES)
    k = SMALL.http.max_stop_strings
    assert _decode("/v1/completions", {}, SMALL).stop == []
    assert _decode("/v1/completions", {"stop": "x"}, SMALL).stop == ["x"]
    assert _decode("/v1/completions", {"stop": list("abcdefgh"[:k])}, SMALL).stop == list("abcdefgh"[:k])
    for bad in ("", [""], ["a", 1], {"a": 1}):
        _refused("/v1/completions", {"stop": bad}, SMALL, "stop")
    assert f"a string or up to {k}" in DOCS


def test_flags_of_completions_default_off():
    req = _decode("/v1/completions", {}, SMALL)
    assert (req.stream, req.echo, req.include_usage) == (False, False, False)
    req = _decode("/v1/completions", {"stream": True, "stream_options": {"include_usage": True}}, SMALL)
    assert req.include_usage
    assert not _decode("/v1/completions", {"stream_options": {"include_usage": True}}, SMALL).include_usage
    assert _decode("/v1/completions", {"best_of": 2, "n": 2}, SMALL).n == 2
    _refused("/v1/completions", {"best_of": 2}, SMALL, "best_of")
    assert not _decode("/v1/poem", {}, SMALL).stream


# ---------------------------------------------------------------- protocol.Limits, the server's table

def _probe_max_new_tokens(limits: Limits, k: int) -> tuple[list, list]:
    return ([("/v1/completions", {"max_tokens": k}), ("/v1/poem", {"max_tokens": k})],
            [("/v1/completions", {"max_tokens": k + 1}, "max_tokens"), ("/v1/poem", {"max_tokens": k + 1}, "max_tokens")])


def _probe_max_prompt_tokens(limits: Limits, k: int) -> tuple[list, list]:
    at, over = "a" * k, "a" * (k + 1)  # one token per character (a char tokenizer)
    return ([("/v1/completions", {"prompt": at}), ("/v1/poem", {"prompt": at}),
             ("/v1/completions", {"prompt": [at, at]})],
            [("/v1/completions", {"prompt": over}, "prompt"), ("/v1/poem", {"prompt": over}, "prompt"),
             ("/v1/completions", {"prompt": [at, over]}, "prompt"),
             ("/v1/completions", {"prompt": "a" * (8 * k + 1)}, "prompt")])


def _probe_max_n(limits: Limits, k: int) -> tuple[list, list]:
    # prompts x n: the count OpenAI's clients rely on
    return ([("/v1/completions", {"n": k}), ("/v1/completions", {"prompt": ["a"] * k}),
             ("/v1/completions", {"prompt": ["a"] * (k // 2), "n": 2} if k % 2 == 0 else {"n": k})],
            [("/v1/completions", {"n": k + 1}, "n"), ("/v1/completions", {"prompt": ["a"] * (k + 1)}, "n"),
             ("/v1/completions", {"prompt": ["a"] * k, "n": 2}, "n")])


def _probe_max_temperature(limits: Limits, k: float) -> tuple[list, list]:
    return ([(route, {"temperature": k}) for route in ("/v1/completions", "/v1/poem", "/v1/chat/completions")],
            [(route, {"temperature": up(k)}, "temperature")
             for route in ("/v1/completions", "/v1/poem", "/v1/chat/completions")])


def _probe_max_poem_lines(limits: Limits, k: int) -> tuple[list, list]:
    return [("/v1/poem", {"lines": k}), ("/v1/poem", {"lines": k, "stanzas": 2})], [("/v1/poem", {"lines": k + 1}, "lines")]


# HttpLimits: the fields the request decoders read (the rest bound sockets and bodies: see HTTP_ONLY)

def _probe_max_stop_strings(limits: Limits, k: int) -> tuple[list, list]:
    return [("/v1/completions", {"stop": ["x"] * k}), ("/v1/chat/completions", {"stop": ["x"] * k})], \
        [("/v1/completions", {"stop": ["x"] * (k + 1)}, "stop"), ("/v1/chat/completions", {"stop": ["x"] * (k + 1)}, "stop")]


def _probe_max_stop_chars(limits: Limits, k: int) -> tuple[list, list]:
    return [("/v1/completions", {"stop": "x" * k}), ("/v1/completions", {"stop": ["y", "x" * k]})], \
        [("/v1/completions", {"stop": "x" * (k + 1)}, "stop"), ("/v1/completions", {"stop": ["y", "x" * (k + 1)]}, "stop")]


def _probe_max_top_logprobs(limits: Limits, k: int) -> tuple[list, list]:
    return ([("/v1/completions", {"logprobs": k}), ("/v1/chat/completions", {"logprobs": True, "top_logprobs": k})],
            [("/v1/completions", {"logprobs": k + 1}, "logprobs"),
             ("/v1/chat/completions", {"logprobs": True, "top_logprobs": k + 1}, "top_logprobs")])


def _messages(n: int) -> list[dict]:
    return [{"role": "system", "content": "x"}] * (n - 1) + [{"role": "user", "content": "a"}]


def _probe_max_messages(limits: Limits, k: int) -> tuple[list, list]:
    return [("/v1/chat/completions", {"messages": _messages(k)})], \
        [("/v1/chat/completions", {"messages": _messages(k + 1)}, "messages")]


def _body_with_temperature(digits: int) -> bytes:
    """A completion request whose temperature is a JSON number of `digits` characters (0.5555...)."""
    return json.dumps({"model": NAME, "prompt": "a"}).encode()[:-1] + b', "temperature": 0.' + b"5" * (digits - 2) + b"}"


def _probe_max_number_chars(limits: Limits, k: int) -> tuple[list, list]:
    # refused while parsing, before any field is read: the error names no field (param None)
    return [("/v1/completions", _body_with_temperature(k))], [("/v1/completions", _body_with_temperature(k + 1), None)]


# Each probe: (limits, k) -> (requests accepted with the limit at k, requests refused with the param named).
# A field of HttpLimits is named "http.<field>".
LIMIT_PROBES: dict[str, Callable[[Limits, Any], tuple[list, list]]] = {
    "max_new_tokens": _probe_max_new_tokens,
    "max_prompt_tokens": _probe_max_prompt_tokens,
    "max_n": _probe_max_n,
    "max_temperature": _probe_max_temperature,
    "max_poem_lines": _probe_max_poem_lines,
    "http.max_stop_strings": _probe_max_stop_strings,
    "http.max_stop_chars": _probe_max_stop_chars,
    "http.max_top_logprobs": _probe_max_top_logprobs,
    "http.max_messages": _probe_max_messages,
    "http.max_number_chars": _probe_max_number_chars,
}
# HttpLimits fields that bound the socket or the raw body, not a decoded request: the protocol
# layer never sees them. tests/test_serve_limits.py sends each at its edge over a real server.
HTTP_ONLY = {"http.max_body_bytes", "http.max_header_bytes", "http.header_seconds", "http.body_seconds",
             "http.keep_alive_seconds", "http.max_connections"}
# how docs/serve.md states each default ({} is the default, formatted as shown); HttpLimits fields
# are rows of its limits table
LIMIT_DOCS = {"max_new_tokens": "[--max-new-tokens {}]", "max_prompt_tokens": "a prompt past {:,} tokens",
              "max_n": "`n` (up to {} samples per request)", "max_temperature": "`temperature` (0-{:g}, default",
              "max_poem_lines": "at most {} `lines` per stanza of `/v1/poem`",
              **{f"http.{f.name}": f"| `{f.name}` | {{{':g' if isinstance(f.default, float) else ''}}} |"
                 for f in dataclasses.fields(HttpLimits)}}


def _leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Every limit of a Limits, nested dataclasses (http) flattened to "http.<field>": default."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_leaves(value, f"{prefix}{f.name}."))
        elif f.name != "model_name":
            out[prefix + f.name] = value
    return out


DEFAULTS = _leaves(Limits(model_name=NAME))


def _with(limits: Limits, name: str, k: Any) -> Limits:
    if name.startswith("http."):
        return dataclasses.replace(limits, http=dataclasses.replace(limits.http, **{name[5:]: k}))
    return dataclasses.replace(limits, **{name: k})


def _limit(limits: Limits, name: str) -> Any:
    return _leaves(limits)[name]


def test_every_limit_has_a_probe_and_a_documented_default():
    missing = [n for n in DEFAULTS if (n not in LIMIT_PROBES and n not in HTTP_ONLY) or n not in LIMIT_DOCS]
    assert not missing, f"protocol.Limits fields with no edge probe or doc phrase in this file: {missing}"
    assert not set(LIMIT_PROBES) & HTTP_ONLY and set(LIMIT_PROBES) | HTTP_ONLY <= set(DEFAULTS)
    # the socket-level ones are tested at their edges over a real server there (imported lazily: it needs uvicorn)
    serve_limits = pytest.importorskip("tests.test_serve_limits")
    over_http = {f"http.{n}" for n in set(serve_limits.BOUNDARY) | serve_limits.CONNECTION_LIMITS}
    assert HTTP_ONLY <= over_http, HTTP_ONLY - over_http


@pytest.mark.parametrize("name", sorted(LIMIT_PROBES))
@pytest.mark.parametrize("k", [3, 6])
def test_each_limit_at_its_edge(name, k):
    """k differs from every default, so a limit read as a constant (or another limit) fails."""
    limits = _with(Limits(model_name=NAME), name, float(k) if isinstance(DEFAULTS[name], float) else k)
    assert _limit(limits, name) != DEFAULTS[name]
    accepted, refused = LIMIT_PROBES[name](limits, _limit(limits, name))
    for route, extra in accepted:
        _decode(route, extra, limits)
    for route, extra, param in refused:
        _refused_any(route, extra, limits, param)


def _refused_any(route: str, extra: dict | bytes, limits: Limits, param: str | None) -> ApiError:
    if param is not None:
        return _refused(route, extra, limits, param)
    with pytest.raises(ApiError) as e:  # refused before any field is read
        _decode(route, extra, limits)
    assert e.value.status == 400 and e.value.param is None, (e.value.status, e.value.param, e.value.message)
    return e.value


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_each_limits_default_is_the_documented_one(name):
    default = DEFAULTS[name]
    phrase = LIMIT_DOCS[name].format(default)
    assert phrase in DOCS, f"docs/serve.md should say {phrase!r}"
    params = inspect.signature(create_app).parameters
    if name in params:  # the app's keyword, where it has one, defaults to the same value
        assert params[name].default == default
    serve = _subparsers()["serve"]
    flag = "--" + name.replace("_", "-")
    action = next((a for a in serve._actions if flag in a.option_strings), None)
    if action is not None:
        assert action.default == default and f"(default: {default})" in action.help


def test_http_refuses_at_the_edges_with_the_field_named():
    """The same edges through the real app: status, OpenAI's error shape, param. The app is given
    limits unlike the defaults, and the edges are read from the limits it holds."""
    model, tok = make_model()
    http = HttpLimits(max_stop_strings=2, max_stop_chars=7, max_top_logprobs=3, max_messages=5, max_number_chars=20)
    app = create_app(model=model, tokenizer=tok, model_name=NAME, max_new_tokens=5, max_prompt_tokens=12, http=http)
    limits = app.state.limits
    assert limits == Limits(model_name=NAME, max_new_tokens=5, max_prompt_tokens=12, http=http)
    with TestClient(app) as c:
        def post(route: str, extra: dict | bytes):
            if isinstance(extra, bytes):
                return c.post(route, content=extra, headers={"Content-Type": "application/json"})
            return c.post(route, json={**ROUTES[route][1], **extra})

        for name in LIMIT_PROBES:
            accepted, refused = LIMIT_PROBES[name](limits, _limit(limits, name))
            for route, extra, param in refused:
                r = post(route, extra)
                assert r.status_code == 400 and r.json()["error"]["param"] == param, (route, extra, r.text)
        for f in FIELDS:
            for v in (f.below, f.above):
                if v is not None:
                    r = post(f.route, f.body(_value(v, limits)))
                    assert r.status_code == 400 and r.json()["error"]["param"] == f.name, (f, r.text)
        # the last accepted values of the server's limits, generated for real
        r = post("/v1/completions", {"prompt": "a" * limits.max_prompt_tokens, "max_tokens": limits.max_new_tokens,
                                     "n": 2, "seed": bounds.MAX_SEED, "temperature": limits.max_temperature,
                                     "logprobs": http.max_top_logprobs,
                                     "stop": ["x" * http.max_stop_chars] * http.max_stop_strings})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2, r.text
        assert r.json()["usage"]["completion_tokens"] <= 2 * limits.max_new_tokens
        r = post("/v1/chat/completions", {"messages": _messages(http.max_messages), "max_tokens": 1})
        assert r.status_code == 200, r.text
        r = post("/v1/completions", _body_with_temperature(http.max_number_chars))
        assert r.status_code == 200, r.text
        body = b'{"prompt": "' + b"a" * http.max_body_bytes + b'"}'
        assert post("/v1/poem", body).status_code == 413
        assert "a body over 1 MiB (413)" in DOCS and http.max_body_bytes == 1 << 20


# ---------------------------------------------------------------- CLI defaults vs --help vs docs

def _subparsers() -> dict[str, argparse.ArgumentParser]:
    p = build_parser()
    return next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices


_STATED = re.compile(r"\(default:? ([^;)]+?)(?:;[^)]*)?\)")
_LITERAL = re.compile(r"^(-?\d[\d.e+-]*|True|False|[a-z][a-z0-9_.-]*)$")
_CONFIG_FIELDS = {f"{section}__{f.name}": f for _, (section, f) in config_flags().items()}


def _true_default(action: argparse.Action) -> Any:
    """What the option means when it is not given: the parser's default, or for a config flag
    (default None: the dataclass decides) the GPTConfig/TrainConfig field's."""
    if action.default is None and action.dest in _CONFIG_FIELDS:
        f = _CONFIG_FIELDS[action.dest]
        return f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return action.default


def _stated_defaults():
    for verb, sp in _subparsers().items():
        for a in sp._actions:
            m = _STATED.search(a.help or "") or re.search(r"\(default (\S+) =", a.help or "")
            if a.option_strings and m and _LITERAL.match(m.group(1).strip()):
                yield verb, a, m.group(1).strip()


def test_cli_defaults_stated_in_help_are_the_real_ones():
    checked = 0
    for verb, a, stated in _stated_defaults():
        real = _true_default(a)
        if real is None:
            continue  # stated in words for a default computed elsewhere ("all")
        if isinstance(real, bool) or isinstance(stated, bool):
            ok = str(real) == stated
        elif isinstance(real, (int, float)):
            ok = float(stated) == float(real)
        else:
            ok = str(real) == stated or str(real).split(",")[0] == stated
        assert ok, f"gpt-small {verb} {a.option_strings[-1]}: --help says default {stated!r}, the code uses {real!r}"
        checked += 1
    assert checked > 50  # the config flags of train, info and compare, serve's, report's, ...
    train = {a.dest: a for a in _subparsers()["train"]._actions}
    assert _true_default(train["train__max_steps"]) == TrainConfig().max_steps
    assert _true_default(train["model__n_layer"]) == GPTConfig().n_layer


def _synopses():
    """(verb, flag, value) of each `[--flag value]` in a ``` block that starts with `gpt-small VERB`."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```[a-z]*\n(.*?)```", path.read_text(), flags=re.S):
            m = re.match(r"\s*gpt-small (\w+)", block)
            if not m:
                continue
            for flag, value in re.findall(r"\[(--[a-z-]+) ([^\]|\s]+)\]", block):
                yield path.name, m.group(1), flag, value


def test_synopsis_defaults_in_the_docs_are_the_parsers():
    subs = _subparsers()
    found = 0
    for doc, verb, flag, value in _synopses():
        if not _LITERAL.match(value) or verb not in subs:  # a metavar (KEY, FILE.toml), not a default
            continue
        action = next(a for a in subs[verb]._actions if flag in a.option_strings)
        real = _true_default(action)
        assert str(real) == value, f"{doc}: gpt-small {verb} {flag} {value}, the parser's default is {real!r}"
        found += 1
    assert found >= 5  # serve's synopsis at least: host, port, max-batch, max-queue, max-new-tokens
