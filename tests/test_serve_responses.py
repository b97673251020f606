"""Response encoding (serve/responses.py) against a reference: OpenAI's own Python client's types.

Each object the server sends as OpenAI's (completion, chat completion, their stream chunks and
usage chunks, logprobs in both shapes, the model list) is parsed by the `openai` package's pydantic
model for it, and must carry every field that model requires, a value of the type it wants
(`object` is a literal there: "text_completion", "chat.completion", ...), and no field it does
not know, at any depth (a field the client does not know would be kept as an "extra" and seen by
nobody). Our own additions are the documented ones only: `weights` on the model object. The
values are checked by their definitions: usage totals, text offsets, UTF-8 bytes, stream events."""

from __future__ import annotations

import json
import re
import time

import pytest

openai_types = pytest.importorskip("openai.types")
from openai import BaseModel  # noqa: E402
from openai._models import construct_type  # noqa: E402
from openai.types import Completion, Model  # noqa: E402
from openai.types.chat import ChatCompletion, ChatCompletionChunk  # noqa: E402

from gpt_small.serve import responses as R  # noqa: E402

OURS = {"Model": {"weights"}}  # documented additions (docs/serve.md)


def unknown_fields(m: BaseModel, path: str = "") -> list[str]:
    """Fields a parsed object holds that its model does not declare, at any depth."""
    out = [f"{path}.{k}" for k in (m.model_extra or {}) if k not in OURS.get(type(m).__name__, set())]
    for name in type(m).model_fields:
        out += _walk(getattr(m, name), f"{path}.{name}")
    return out


def _walk(v, path: str) -> list[str]:
    if isinstance(v, BaseModel):
        return unknown_fields(v, path)
    if isinstance(v, list):
        return [x for i, item in enumerate(v) for x in _walk(item, f"{path}[{i}]")]
    if isinstance(v, dict):
        return [x for k, item in v.items() for x in _walk(item, f"{path}[{k}]")]
    return []


def parsed(cls: type[BaseModel], obj: dict, stream: bool = False) -> BaseModel:
    """obj as OpenAI's client reads it, with no unknown field: validated, or for a stream event
    built as the client builds one (its types would refuse the null finish_reason of a chunk)."""
    obj = json.loads(json.dumps(obj))
    m = construct_type(type_=cls, value=obj) if stream else cls.model_validate(obj)
    assert not unknown_fields(m), unknown_fields(m)
    required = {n for n, f in cls.model_fields.items() if f.is_required()}
    assert required <= set(obj), required - set(obj)
    return m


USE = R.usage(5, 7)
SCORED = [("a", -0.5, [("a", -0.5), ("b", -1.25)]), ("é", -2.0, [("é", -2.0)]), (" x", -0.125, [])]


def test_usage_counts_add_up():
    assert USE == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    assert R.usage(0, 0)["total_tokens"] == 0


def test_completion_is_openais_completion():
    lp = R.completion_logprobs(SCORED, 0, top=True)
    obj = R.completion("cmpl-1", 1700000000, "poet", [("ab", "stop", lp), ("c", "length", None)], USE)
    m = parsed(Completion, obj)
    assert (m.id, m.object, m.created, m.model, m.system_fingerprint) == ("cmpl-1", "text_completion", 1700000000,
                                                                         "poet", None)
    assert [(c.index, c.text, c.finish_reason) for c in m.choices] == [(0, "ab", "stop"), (1, "c", "length")]
    assert m.choices[1].logprobs is None
    assert m.usage.model_dump(exclude_none=True) == USE


def test_completion_logprobs_offsets_and_top():
    lp = R.completion_logprobs(SCORED, 3, top=True)
    assert lp == {"tokens": ["a", "é", " x"], "token_logprobs": [-0.5, -2.0, -0.125],
                  "top_logprobs": [{"a": -0.5, "b": -1.25}, {"é": -2.0}, {}], "text_offset": [3, 4, 5]}
    assert R.completion_logprobs(SCORED, 0, top=False)["top_logprobs"] is None  # logprobs: 0
    assert R.completion_logprobs(SCORED, 0, top=False)["text_offset"] == [0, 1, 2]
    assert R.completion_logprobs([], 9, top=True) == {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                                      "text_offset": []}
    parsed(Completion, R.completion("c", 1, "m", [("a", "stop", lp)], USE))


def test_completion_chunks_and_usage_chunk():
    lp = R.completion_logprobs(SCORED[:1], 0, top=True)
    chunk = R.completion_chunk("cmpl-2", 5, "poet", 3, "piece", None, lp)
    m = parsed(Completion, chunk, stream=True)
    assert (m.object, m.choices[0].index, m.choices[0].text, m.choices[0].finish_reason) == \
        ("text_completion", 3, "piece", None)
    assert m.usage is None and "usage" not in chunk
    assert m.choices[0].logprobs.tokens == ["a"]
    end = R.completion_chunk("cmpl-2", 5, "poet", 0, "", "length")
    assert parsed(Completion, end, stream=True).choices[0].finish_reason == "length"
    assert end["choices"][0]["logprobs"] is None
    last = R.usage_chunk("cmpl-2", 5, "poet", USE)
    m = parsed(Completion, last, stream=True)
    assert m.choices == [] and m.usage.total_tokens == 12
    assert (m.id, m.object, m.created, m.model) == ("cmpl-2", "text_completion", 5, "poet")
    assert parsed(Completion, end, stream=True).object == "text_completion"


def test_chat_completion_is_openais_chat_completion():
    lp = R.chat_logprobs(SCORED)
    obj = R.chat_completion("chatcmpl-1", 7, "poet", [("ab", "stop", lp), ("", "length", None)], USE)
    m = parsed(ChatCompletion, obj)
    assert (m.object, m.service_tier, m.system_fingerprint) == ("chat.completion", None, None)
    assert [(c.index, c.message.role, c.message.content, c.message.refusal, c.finish_reason) for c in m.choices] == \
        [(0, "assistant", "ab", None, "stop"), (1, "assistant", "", None, "length")]
    assert m.usage.model_dump(exclude_none=True) == USE
    tokens = m.choices[0].logprobs.content
    assert [(t.token, t.logprob, t.bytes) for t in tokens] == [("a", -0.5, [97]), ("é", -2.0, [0xC3, 0xA9]),
                                                               (" x", -0.125, [32, 120])]
    assert [(a.token, a.logprob, a.bytes) for a in tokens[0].top_logprobs] == [("a", -0.5, [97]), ("b", -1.25, [98])]
    assert tokens[2].top_logprobs == [] and m.choices[0].logprobs.refusal is None
    assert m.choices[1].logprobs is None


def test_chat_logprobs_bytes_of_a_partial_character():
    """A byte-level token may hold part of a character; its text is then U+FFFD, whose UTF-8 is sent."""
    lp = R.chat_logprobs([("\ufffd", -1.0, [("\ufffd", -1.0)]), ("\ud800", -3.0, [])])
    assert lp["content"][0]["bytes"] == [0xEF, 0xBF, 0xBD]
    assert lp["content"][1]["bytes"] == [ord("?")]  # a lone surrogate cannot be encoded: replaced


def test_chat_chunks_and_usage_chunk():
    first = R.chat_chunk("chatcmpl-3", 9, "poet", 1, {"role": "assistant", "content": ""})
    m = parsed(ChatCompletionChunk, first)
    assert (m.object, m.choices[0].index, m.choices[0].delta.role, m.choices[0].delta.content) == \
        ("chat.completion.chunk", 1, "assistant", "")
    assert m.choices[0].finish_reason is None and m.choices[0].logprobs is None
    piece = R.chat_chunk("chatcmpl-3", 9, "poet", 0, {"content": "ab"}, None, R.chat_logprobs(SCORED[:1]))
    assert parsed(ChatCompletionChunk, piece).choices[0].logprobs.content[0].token == "a"
    end = R.chat_chunk("chatcmpl-3", 9, "poet", 0, {}, "stop")
    assert parsed(ChatCompletionChunk, end).choices[0].finish_reason == "stop"
    last = R.chat_usage_chunk("chatcmpl-3", 9, "poet", USE)
    m = parsed(ChatCompletionChunk, last)
    assert m.choices == [] and m.usage.prompt_tokens == 5 and (m.id, m.created, m.model) == ("chatcmpl-3", 9, "poet")


def test_model_list_and_model_card():
    card = R.model_card("poet", 11, "int8")
    m = parsed(Model, card)
    assert (m.id, m.object, m.created, m.owned_by) == ("poet", "model", 11, "gpt-small")
    assert card["weights"] == "int8"
    listing = R.models("poet", 11, "bfloat16")
    assert listing["object"] == "list" and len(listing["data"]) == 1
    assert parsed(Model, listing["data"][0]).model_extra == {"weights": "bfloat16"}


def test_ids_carry_their_prefix_and_do_not_repeat():
    ids = {R.new_id("cmpl") for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"cmpl-[0-9a-f]{24}", i) for i in ids)
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{24}", R.new_id("chatcmpl"))


def test_server_sent_events():
    assert R.sse("[DONE]") == b"data: [DONE]\n\n"
    event = R.sse({"text": "é\n", "n": 1})
    assert event == 'data: {"text":"é\\n","n":1}\n\n'.encode()  # one line, compact, UTF-8 as is
    assert json.loads(event[len(b"data: "):].decode()) == {"text": "é\n", "n": 1}


def test_poem_object_and_timing(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    now[0] = 102.5
    times = R.timing(100.0, 100.25, 10)
    assert times == {"ms": 2500.0, "ttft_ms": 250.0, "tokens": 10, "tokens_per_s": 4.0}
    assert R.timing(100.0, None, 0) == {"ms": 2500.0, "ttft_ms": None, "tokens": 0, "tokens_per_s": 0.0}
    now[0] = 100.0
    assert R.timing(100.0, None, 0)["tokens_per_s"] is None  # no time has passed: no rate
    now[0] = 100.00012345
    assert R.timing(100.0, 100.00001, 1)["ms"] == 0.1 and R.timing(100.0, 100.00001, 1)["ttft_ms"] == 0.0
    now[0] = 103.0  # docs/serve.md: to one decimal, whatever the figures
    assert R.timing(100.0, 100.01234, 10) == {"ms": 3000.0, "ttft_ms": 12.3, "tokens": 10, "tokens_per_s": 3.3}
    assert R.timing(100.0, 100.01276, 2) == {"ms": 3000.0, "ttft_ms": 12.8, "tokens": 2, "tokens_per_s": 0.7}
    obj = R.poem("poem-1", "poet", "The sea\n", "waves", "length", 8, 5, times)
    assert obj == {"id": "poem-1", "object": "poem", "model": "poet", "prompt": "The sea\n", "text": "waves",
                   "poem": "The sea\nwaves", "finish_reason": "length",
                   "usage": {"prompt_tokens": 8, "completion_tokens": 5, "total_tokens": 13}, "timing": times}
