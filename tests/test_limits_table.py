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
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from starlette.testclient import TestClient  # noqa: E402

from gpt_small.cli import build_parser  # noqa: E402
from gpt_small.config import GPTConfig, TrainConfig, config_flags  # noqa: E402
from gpt_small.serve import create_app  # noqa: E402
from gpt_small.serve import protocol  # noqa: E402
from gpt_small.serve.protocol import ApiError, Limits, decode_completion, decode_poem  # noqa: E402
from gpt_small.tokenizer import CharTokenizer  # noqa: E402
from serve_util import ALPHABET, make_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NAME = "edge-model"
TOK = CharTokenizer.train(ALPHABET)
DOCS = " ".join((ROOT / "docs" / "serve.md").read_text().split())  # whitespace-normalised

ROUTES = {"/v1/completions": (decode_completion, {"model": NAME, "prompt": "a"}),
          "/v1/poem": (decode_poem, {"prompt": "a"})}


@dataclass(frozen=True)
class Field:
    """One request field: where it is read back, its default, its accepted range [lo, hi]
    (a callable of Limits where a server flag sets it), and the first refused value past each end."""

    route: str
    name: str
    attr: str  # attribute path on the decoded request
    default: Any
    lo: Any
    below: Any  # the first refused value under lo (None: no lower edge to test)
    hi: Any
    above: Any  # the first refused value over hi
    doc: str | None = None  # how docs/serve.md states it (whitespace-normalised)


def L(name: str, plus: int = 0) -> Callable[[Limits], int]:
    return lambda limits: getattr(limits, name) + plus


FIELDS = [
    Field("/v1/completions", "max_tokens", "max_tokens", 16, 1, 0, L("max_new_tokens"), L("max_new_tokens", 1),
          "`max_tokens` (default 16, at most `--max-new-tokens`)"),
    Field("/v1/completions", "temperature", "sampling.temperature", 1.0, 0.0, -0.001, 2.0, 2.001,
          "`temperature` (0-2, default 1)"),
    Field("/v1/completions", "n", "n", 1, 1, 0, L("max_n"), L("max_n", 1), "`n` (up to 8 samples per request)"),
    Field("/v1/completions", "top_p", "sampling.top_p", None, 1e-9, 0.0, 1.0, 1.001),
    Field("/v1/completions", "repetition_penalty", "sampling.repetition_penalty", 1.0, 1e-9, 0.0, 10.0, 10.001),
    Field("/v1/completions", "top_k", "sampling.top_k", None, 1, None, 10**6, None),
    Field("/v1/completions", "seed", "sampling.seed", None, -(2**63), -(2**63) - 1, 2**63 - 1, 2**63),
    Field("/v1/completions", "presence_penalty", None, 0.0, 0.0, -2.001, 0.0, 2.001),
    Field("/v1/completions", "frequency_penalty", None, 0.0, 0.0, -2.001, 0.0, 2.001),
    Field("/v1/poem", "lines", "lines", 12, 1, 0, 200, 201),
    Field("/v1/poem", "stanzas", "stanzas", 1, 1, 0, 50, 51),
    Field("/v1/poem", "max_tokens", "max_tokens", L("max_new_tokens"), 1, 0, L("max_new_tokens"),
          L("max_new_tokens", 1)),
    Field("/v1/poem", "temperature", "sampling.temperature", 0.8, 0.0, -0.001, 2.0, 2.001,
          "`temperature` defaults to 1 on `/v1/completions`, as OpenAI's, and 0.8 on `/v1/poem`"),
    Field("/v1/poem", "top_p", "sampling.top_p", None, 1e-9, 0.0, 1.0, 1.001),
]


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _value(v: Any, limits: Limits) -> Any:
    return v(limits) if callable(v) else v


def _decode(route: str, extra: dict, limits: Limits):
    decode, base = ROUTES[route]
    return decode({**base, **extra}, TOK, limits)


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
            assert _get(_decode(f.route, {}, limits), f.attr) == _value(f.default, limits)
            assert _get(_decode(f.route, {f.name: None}, limits), f.attr) == _value(f.default, limits)
        lo, hi = _value(f.lo, limits), _value(f.hi, limits)
        for v in (lo, hi):
            req = _decode(f.route, {f.name: v}, limits)
            if f.attr is not None:
                assert _get(req, f.attr) == v
        for v in (f.below, f.above):
            if v is not None:
                _refused(f.route, {f.name: _value(v, limits)}, limits, f.name)
        if isinstance(lo, int) and not isinstance(lo, bool):
            _refused(f.route, {f.name: "1"}, limits, f.name)  # a string is not a number
            _refused(f.route, {f.name: True}, limits, f.name)  # nor is a bool
    if f.doc:
        assert f.doc in DOCS, f"docs/serve.md no longer says {f.doc!r}"


def test_top_k_off_values_and_stop_counts():
    assert _decode("/v1/completions", {"top_k": -1}, SMALL).sampling.top_k is None  # vLLM's "off"
    assert _decode("/v1/completions", {"top_k": 0}, SMALL).sampling.top_k is None
    _refused("/v1/completions", {"top_k": -2}, SMALL, "top_k")
    # stop: a string or up to 4 non-empty strings (OpenAI's limit)
    assert _decode("/v1/completions", {}, SMALL).stop == []
    assert _decode("/v1/completions", {"stop": "x"}, SMALL).stop == ["x"]
    assert _decode("/v1/completions", {"stop": ["a", "b", "c", "d"]}, SMALL).stop == ["a", "b", "c", "d"]
    for bad in (["a", "b", "c", "d", "e"], "", [""], ["a", 1]):
        _refused("/v1/completions", {"stop": bad}, SMALL, "stop")
    assert "a string or up to 4" in DOCS


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


LIMIT_PROBES: dict[str, Callable[[Limits, int], tuple[list, list]]] = {
    "max_new_tokens": _probe_max_new_tokens,
    "max_prompt_tokens": _probe_max_prompt_tokens,
    "max_n": _probe_max_n,
}
# how docs/serve.md states each default ({} is the default, formatted as shown)
LIMIT_DOCS = {"max_new_tokens": "[--max-new-tokens {}]", "max_prompt_tokens": "a prompt past {:,} tokens",
              "max_n": "`n` (up to {} samples per request)"}
LIMIT_FIELDS = [f for f in dataclasses.fields(Limits) if f.name != "model_name"]


def test_every_limit_has_a_probe_and_a_documented_default():
    missing = [f.name for f in LIMIT_FIELDS if f.name not in LIMIT_PROBES or f.name not in LIMIT_DOCS]
    assert not missing, f"protocol.Limits fields with no edge probe or doc phrase in this file: {missing}"


@pytest.mark.parametrize("name", [f.name for f in LIMIT_FIELDS])
@pytest.mark.parametrize("k", [4, 6])
def test_each_limit_at_its_edge(name, k):
    limits = dataclasses.replace(Limits(model_name=NAME), **{name: k})
    accepted, refused = LIMIT_PROBES[name](limits, k)
    for route, extra in accepted:
        _decode(route, extra, limits)
    for route, extra, param in refused:
        _refused(route, extra, limits, param)


@pytest.mark.parametrize("f", LIMIT_FIELDS, ids=lambda f: f.name)
def test_each_limits_default_is_the_documented_one(f):
    phrase = LIMIT_DOCS[f.name].format(f.default)
    assert phrase in DOCS, f"docs/serve.md should say {phrase!r}"
    params = inspect.signature(create_app).parameters
    if f.name in params:  # the app's keyword, where it has one, defaults to the same value
        assert params[f.name].default == f.default
    serve = _subparsers()["serve"]
    flag = "--" + f.name.replace("_", "-")
    action = next((a for a in serve._actions if flag in a.option_strings), None)
    if action is not None:
        assert action.default == f.default and f"(default: {f.default})" in action.help


def test_http_refuses_at_the_edges_with_the_field_named():
    """The same edges through the real app: status, OpenAI's error shape, param."""
    model, tok = make_model()
    app = create_app(model=model, tokenizer=tok, model_name=NAME, max_new_tokens=5, max_prompt_tokens=12)
    limits = Limits(model_name=NAME, max_new_tokens=5, max_prompt_tokens=12)
    with TestClient(app) as c:
        for name in LIMIT_PROBES:
            _, refused = LIMIT_PROBES[name](limits, getattr(limits, name))
            for route, extra, param in refused:
                r = c.post(route, json={**ROUTES[route][1], **extra})
                assert r.status_code == 400 and r.json()["error"]["param"] == param, (route, extra, r.text)
        for f in FIELDS:
            for v in (f.below, f.above):
                if v is not None:
                    r = c.post(f.route, json={**ROUTES[f.route][1], f.name: _value(v, limits)})
                    assert r.status_code == 400 and r.json()["error"]["param"] == f.name, (f, r.text)
        # the last accepted values of the server's limits, generated for real
        r = c.post("/v1/completions", json={"model": NAME, "prompt": "a" * 12, "max_tokens": 5, "n": 2,
                                            "seed": 1, "temperature": 2.0, "stop": ["x", "y", "z", "w"]})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2
        assert r.json()["usage"]["completion_tokens"] <= 10
        body = b'{"prompt": "' + b"a" * (1 << 20) + b'"}'
        assert c.post("/v1/poem", content=body).status_code == 413  # over 1 MiB
        assert "a body over 1 MiB (413)" in DOCS


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
