"""Every refusal of the request decoders (serve/protocol.py), with its exact one-line message.

docs/serve.md promises that every bad request gets one 400 (404 for an unknown model) in OpenAI's
error shape whose `param` names the field and whose message says what is wrong, quoting the bad
value (cut to 40 characters of JSON). This table pins each kind of refusal of the three routes and
of the body parser: its status, its `param` and its message, so a refusal that names the wrong
field, says something else or lets the bad value through fails here. The decoders run alone (no
model, no server): the app passes status, param and message through unchanged, which
tests/test_serve_api.py checks over HTTP. The lenient cases a client relies on (null fields of a
reply sent back, text parts, an integer written as 2.0, ...) are pinned as accepted.
"""

from __future__ import annotations

import json

import pytest

from gpt_small.serve.protocol import (ApiError, HttpLimits, Limits, decode_chat, decode_completion,  # noqa: E402
                                      decode_poem, parse_json)
from gpt_small.tokenizer import CharTokenizer
from serve_util import ALPHABET

TOK = CharTokenizer.train(ALPHABET)
# small limits, so each refusal quotes them (and a limit read as a constant shows)
L = Limits(model_name="edge-model", max_new_tokens=7, max_prompt_tokens=9, max_n=3)
DECODE = {"/v1/completions": decode_completion, "/v1/poem": decode_poem, "/v1/chat/completions": decode_chat}
C = {"model": "edge-model", "prompt": "a"}
CH = {"model": "edge-model", "messages": [{"role": "user", "content": "a"}]}
LONGV = "v" * 60  # quoted cut to 40 characters of JSON


def msg(*m: object) -> dict:
    return {**CH, "messages": list(m)}


# (route, body, status, param, message)
REFUSED = [
    ("/v1/completions", {"prompt": "a"}, 400, 'model', 'model: is required'),
    ("/v1/completions", {**C, "model": 7}, 400, 'model', "model: expected the model's name as a string"),
    ("/v1/completions", {**C, "model": "gpt-4"},
     404, 'model', "the model 'gpt-4' does not exist; this server serves 'edge-model'"),
    ("/v1/completions", {**C, "prompt": 7}, 400, 'prompt', 'prompt: expected a string or a non-empty list of strings'),
    ("/v1/completions", {**C, "prompt": []}, 400, 'prompt', 'prompt: expected a string or a non-empty list of strings'),
    ("/v1/completions", {**C, "prompt": [[1, 2]]},
     400, 'prompt', 'prompt: token-id prompts are not supported; send text'),
    ("/v1/completions", {**C, "prompt": [1, 2]},
     400, 'prompt', 'prompt: token-id prompts are not supported; send text'),
    ("/v1/completions", {**C, "prompt": ["a", 1]},
     400, 'prompt', 'prompt: expected a string or a non-empty list of strings'),
    ("/v1/completions", {**C, "suffix": "b"}, 400, 'suffix', 'suffix: is not supported by this server'),
    ("/v1/completions", {**C, "logit_bias": {"1": 2}},
     400, 'logit_bias', 'logit_bias: is not supported by this server'),
    ("/v1/completions", {**C, "presence_penalty": 1},
     400, 'presence_penalty', 'presence_penalty: only 0 is supported; see repetition_penalty'),
    ("/v1/completions", {**C, "frequency_penalty": -0.5},
     400, 'frequency_penalty', 'frequency_penalty: only 0 is supported; see repetition_penalty'),
    ("/v1/completions", {**C, "presence_penalty": 3},
     400, 'presence_penalty', 'presence_penalty: 3 is out of range; expected [-2.0, 2.0]'),
    ("/v1/completions", {**C, "n": 4}, 400, 'n', 'n: 4 is out of range; expected 1..3'),
    ("/v1/completions", {**C, "n": 0}, 400, 'n', 'n: 0 is out of range; expected 1..3'),
    ("/v1/completions", {**C, "n": 1.5}, 400, 'n', 'n: expected an integer, got 1.5'),
    ("/v1/completions", {**C, "n": LONGV},
     400, 'n', 'n: expected an integer, got "vvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvv'),
    ("/v1/completions", {**C, "stream": LONGV},
     400, 'stream', 'stream: expected true or false, got "vvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvv'),
    ("/v1/completions", {**C, "temperature": LONGV},
     400, 'temperature', 'temperature: expected a number, got "vvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvv'),
    # a prompt is refused by its length in characters only past 8 per token allowed (no token is
    # longer); at exactly 8 per token it is encoded and refused by its count of tokens
    ("/v1/completions", {**C, "prompt": "a" * 72},
     400, 'prompt', 'prompt: the prompt is 72 tokens, longer than the limit of 9'),
    ("/v1/completions", {**C, "prompt": "a" * 73},
     400, 'prompt', 'prompt: the prompt is longer than the limit of 9 tokens'),
    ("/v1/completions", {**C, "best_of": 2}, 400, 'best_of', 'best_of: only best_of = n is supported'),
    # best_of's own range first (1..max_n), then equal to n
    ("/v1/completions", {**C, "best_of": 0}, 400, 'best_of', 'best_of: 0 is out of range; expected 1..3'),
    ("/v1/completions", {**C, "n": 3, "best_of": 4}, 400, 'best_of', 'best_of: 4 is out of range; expected 1..3'),
    ("/v1/completions", {**C, "prompt": ["a", "b"], "n": 2},
     400, 'n', "n: 2 prompts x n=2 samples is more than this server's 3"),
    ("/v1/completions", {**C, "logprobs": 6}, 400, 'logprobs', 'logprobs: 6 is out of range; expected 0..5'),
    ("/v1/completions", {**C, "logprobs": -1}, 400, 'logprobs', 'logprobs: -1 is out of range; expected 0..5'),
    ("/v1/completions", {**C, "logprobs": 1, "echo": True},
     400, 'logprobs', "logprobs: with echo is not supported (the prompt's tokens are not scored)"),
    ("/v1/completions", {**C, "logprobs": 0, "echo": True},
     400, 'logprobs', "logprobs: with echo is not supported (the prompt's tokens are not scored)"),
    ("/v1/completions", {**C, "echo": 1}, 400, 'echo', 'echo: expected true or false, got 1'),
    ("/v1/completions", {**C, "user": 5}, 400, 'user', 'user: expected a string'),
    ("/v1/completions", {**C, "stream": "yes"}, 400, 'stream', 'stream: expected true or false, got "yes"'),
    ("/v1/completions", {**C, "max_tokens": 0}, 400, 'max_tokens', 'max_tokens: 0 is out of range; expected 1..7'),
    ("/v1/completions", {**C, "max_tokens": 8}, 400, 'max_tokens', 'max_tokens: 8 is out of range; expected 1..7'),
    ("/v1/completions", {**C, "temperature": "hot"}, 400, 'temperature', 'temperature: expected a number, got "hot"'),
    ("/v1/completions", {**C, "temperature": 2.5},
     400, 'temperature', 'temperature: 2.5 is out of range; expected [0.0, 2.0]'),
    ("/v1/completions", {**C, "temperature": -0.5},
     400, 'temperature', 'temperature: -0.5 is out of range; expected [0.0, 2.0]'),
    ("/v1/completions", {**C, "temperature": True}, 400, 'temperature', 'temperature: expected a number, got true'),
    ("/v1/completions", {**C, "top_p": 0}, 400, 'top_p', 'top_p: 0 is out of range; expected (0.0, 1.0]'),
    ("/v1/completions", {**C, "top_p": 1.5}, 400, 'top_p', 'top_p: 1.5 is out of range; expected (0.0, 1.0]'),
    ("/v1/completions", {**C, "top_k": -2}, 400, 'top_k', 'top_k: -2 is out of range; expected 1..16777216'),
    ("/v1/completions", {**C, "top_k": 2.5}, 400, 'top_k', 'top_k: expected an integer, got 2.5'),
    ("/v1/completions", {**C, "seed": -1}, 400, 'seed', 'seed: -1 is out of range; expected 0..9223372036854775807'),
    ("/v1/completions", {**C, "seed": 2**63},
     400, 'seed', 'seed: 9223372036854775808 is out of range; expected 0..9223372036854775807'),
    ("/v1/completions", {**C, "repetition_penalty": 0},
     400, 'repetition_penalty', 'repetition_penalty: 0 is out of range; expected [0.01, 100.0]'),
    ("/v1/completions", {**C, "stop": ""},
     400, 'stop', 'stop: expected a non-empty string or a list of up to 4 non-empty strings'),
    ("/v1/completions", {**C, "stop": ["a", "b", "c", "d", "e"]},
     400, 'stop', 'stop: expected a non-empty string or a list of up to 4 non-empty strings'),
    ("/v1/completions", {**C, "stop": ["a", ""]},
     400, 'stop', 'stop: expected a non-empty string or a list of up to 4 non-empty strings'),
    ("/v1/completions", {**C, "stop": 5},
     400, 'stop', 'stop: expected a non-empty string or a list of up to 4 non-empty strings'),
    ("/v1/completions", {**C, "stop": "x" * 101}, 400, 'stop', 'stop: a stop string is longer than 100 characters'),
    ("/v1/completions", {**C, "stop": ["y", "x" * 101]},
     400, 'stop', 'stop: a stop string is longer than 100 characters'),
    ("/v1/completions", {**C, "stream_options": {"include_usage": True, "x": 1}},
     400, 'stream_options', 'stream_options: expected an object with include_usage'),
    ("/v1/completions", {**C, "stream_options": True},
     400, 'stream_options', 'stream_options: expected an object with include_usage'),
    ("/v1/completions", {**C, "stream": True, "stream_options": {"include_usage": 1}},
     400, 'stream_options.include_usage', 'stream_options.include_usage: expected true or false, got 1'),
    ("/v1/completions", {**C, "frobnicate": 1},
     400, 'frobnicate', 'Unrecognized request argument supplied: frobnicate'),
    ("/v1/completions", {**C, "prompt": "日本"},
     400, 'prompt', "prompt: character '日' (U+65E5) is not in the char vocabulary of this model"),
    ("/v1/completions", {**C, "prompt": "a" * 10},
     400, 'prompt', 'prompt: the prompt is 10 tokens, longer than the limit of 9'),
    ("/v1/completions", {**C, "prompt": "a" * 73},
     400, 'prompt', 'prompt: the prompt is longer than the limit of 9 tokens'),
    ("/v1/completions", {**C, "prompt": ["a", "a" * 10]},
     400, 'prompt', 'prompt: the prompt is 10 tokens, longer than the limit of 9'),
    ("/v1/poem", {"prompt": ["a"]}, 400, 'prompt', 'prompt: expected a string'),
    ("/v1/poem", {"lines": 0}, 400, 'lines', 'lines: 0 is out of range; expected 1..200'),
    # a scheme of several stanzas has its own length: lines given with it are refused, naming lines
    ("/v1/poem", {"rhyme": "ABAB CDCD", "lines": 4}, 400, 'lines',
     "lines: the scheme 'ABAB CDCD' has its own length (8 lines); leave lines out"),
    ("/v1/poem", {"lines": 201}, 400, 'lines', 'lines: 201 is out of range; expected 1..200'),
    ("/v1/poem", {"stanzas": 0}, 400, 'stanzas', 'stanzas: 0 is out of range; expected 1..1000'),
    ("/v1/poem", {"model": "x"}, 404, 'model', "the model 'x' does not exist; this server serves 'edge-model'"),
    ("/v1/poem", {"model": 3}, 400, 'model', "model: expected the model's name as a string"),
    ("/v1/poem", {"max_tokens": 8}, 400, 'max_tokens', 'max_tokens: 8 is out of range; expected 1..7'),
    ("/v1/poem", {"form": "sonnet", "max_tokens": 5},
     400, 'max_tokens', 'max_tokens: does not apply to a poem in a form (each line is at most half the context)'),
    ("/v1/poem", {"stream": "no"}, 400, 'stream', 'stream: expected true or false, got "no"'),
    ("/v1/poem", {"foo": 1}, 400, 'foo', 'Unrecognized request argument supplied: foo'),
    ("/v1/chat/completions", {"messages": CH["messages"]}, 400, 'model', 'model: is required'),
    ("/v1/chat/completions", {**CH, "model": "gpt-4"},
     404, 'model', "the model 'gpt-4' does not exist; this server serves 'edge-model'"),
    ("/v1/chat/completions", {**CH, "tools": [{"type": "function"}]},
     400, 'tools', 'tools: is not supported by this server (a base model without tools or other modalities)'),
    ("/v1/chat/completions", {**CH, "tool_choice": "auto"},
     400, 'tool_choice', 'tool_choice: is not supported by this server '
     '(a base model without tools or other modalities)'),
    ("/v1/chat/completions", {**CH, "modalities": ["text", "audio"]},
     400, 'modalities', 'modalities: only ["text"] is supported'),
    ("/v1/chat/completions", {**CH, "response_format": {"type": "json_object"}},
     400, 'response_format', 'response_format: only {"type": "text"} is supported: a base model cannot promise JSON'),
    ("/v1/chat/completions", {**CH, "store": True},
     400, 'store', 'store: is not supported by this server: nothing is stored'),
    ("/v1/chat/completions", {**CH, "logit_bias": {"1": 1}},
     400, 'logit_bias', 'logit_bias: is not supported by this server'),
    ("/v1/chat/completions", {**CH, "frequency_penalty": 1},
     400, 'frequency_penalty', 'frequency_penalty: only 0 is supported; see repetition_penalty'),
    ("/v1/chat/completions", {**CH, "messages": [{"role": "system", "content": "x"}] * 256 + CH["messages"]},
     400, 'messages', 'messages: 257 messages, more than the limit of 256'),
    ("/v1/chat/completions", {**CH, "messages": []},
     400, 'messages', 'messages: expected a non-empty list of messages'),
    ("/v1/chat/completions", {**CH, "messages": "hi"},
     400, 'messages', 'messages: expected a non-empty list of messages'),
    ("/v1/chat/completions", {**CH, "messages": None},
     400, 'messages', 'messages: expected a non-empty list of messages'),
    ("/v1/chat/completions", msg("hi"), 400, 'messages[0]', 'messages[0]: expected an object with role and content'),
    ("/v1/chat/completions", msg({"role": "tool", "content": "x"}),
     400, 'messages[0].role', "messages[0].role: 'tool' messages are not supported: this server has no tools"),
    ("/v1/chat/completions", msg({"role": "function", "content": "x"}),
     400, 'messages[0].role', "messages[0].role: 'function' messages are not supported: this server has no tools"),
    ("/v1/chat/completions", msg({"role": "robot", "content": "x"}),
     400, 'messages[0].role', 'messages[0].role: expected one of system, developer, user, assistant, got "robot"'),
    ("/v1/chat/completions", msg({"content": "x"}),
     400, 'messages[0].role', 'messages[0].role: expected one of system, developer, user, assistant, got null'),
    ("/v1/chat/completions", msg({"role": "user", "content": "a"}, {"role": LONGV, "content": "x"}),
     400, 'messages[1].role', 'messages[1].role: expected one of system, developer, user, assistant, got "' + "v" * 39),
    ("/v1/chat/completions", msg({"role": "user", "content": "a", "tool_calls": []}),
     400, 'messages[0].tool_calls', 'messages[0].tool_calls: is not supported by this server'),
    ("/v1/chat/completions", msg({"role": "user", "content": "a", "extra": None}),
     400, 'messages[0].extra', 'messages[0].extra: is not supported by this server'),
    ("/v1/chat/completions", msg({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}),
     400, 'messages[0].content', 'messages[0].content: only text parts are supported, got "image_url"'),
    ("/v1/chat/completions", msg({"role": "user", "content": [{"type": "text", "text": 5}]}),
     400, 'messages[0].content', "messages[0].content: a text part's text must be a string"),
    ("/v1/chat/completions", msg({"role": "user", "content": [{"text": "a"}]}),
     400, 'messages[0].content', 'messages[0].content: only text parts are supported, got null'),
    ("/v1/chat/completions", msg({"role": "user", "content": ["a"]}),
     400, 'messages[0].content', 'messages[0].content: only text parts are supported, got null'),
    ("/v1/chat/completions", msg({"role": "user", "content": "a", "name": 7}),
     400, 'messages[0].name', 'messages[0].name: expected a string, got 7'),
    ("/v1/chat/completions", msg({"role": "user", "content": "a", "name": [LONGV]}),
     400, 'messages[0].name', 'messages[0].name: expected a string, got ["vvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvv'),
    ("/v1/chat/completions", msg({"role": "user", "content": [{"type": LONGV}]}),
     400, 'messages[0].content', 'messages[0].content: only text parts are supported, got "' + "v" * 39),
    ("/v1/chat/completions", msg({"role": "user", "content": 5}),
     400, 'messages[0].content', 'messages[0].content: expected a string or a list of text parts'),
    ("/v1/chat/completions", msg({"role": "user"}),
     400, 'messages[0].content', 'messages[0].content: expected a string or a list of text parts'),
    ("/v1/chat/completions", {**CH, "logprobs": "yes"}, 400, 'logprobs', 'logprobs: expected true or false, got "yes"'),
    ("/v1/chat/completions", {**CH, "top_logprobs": 2}, 400, 'top_logprobs', 'top_logprobs: needs logprobs: true'),
    ("/v1/chat/completions", {**CH, "logprobs": False, "top_logprobs": 0},
     400, 'top_logprobs', 'top_logprobs: needs logprobs: true'),
    ("/v1/chat/completions", {**CH, "logprobs": True, "top_logprobs": 6},
     400, 'top_logprobs', 'top_logprobs: 6 is out of range; expected 0..5'),
    ("/v1/chat/completions", {**CH, "user": 5}, 400, 'user', 'user: expected a string'),
    ("/v1/chat/completions", {**CH, "max_tokens": 8},
     400, 'max_tokens', 'max_tokens: 8 is out of range; expected 1..7'),
    ("/v1/chat/completions", {**CH, "max_completion_tokens": 0},
     400, 'max_completion_tokens', 'max_completion_tokens: 0 is out of range; expected 1..7'),
    ("/v1/chat/completions", {**CH, "max_tokens": 3, "max_completion_tokens": 8},
     400, 'max_completion_tokens', 'max_completion_tokens: 8 is out of range; expected 1..7'),
    ("/v1/chat/completions", {**CH, "n": 4}, 400, 'n', 'n: 4 is out of range; expected 1..3'),
    ("/v1/chat/completions", {**CH, "stop": ["a"] * 5},
     400, 'stop', 'stop: expected a non-empty string or a list of up to 4 non-empty strings'),
    ("/v1/chat/completions", {**CH, "messages": [{"role": "user", "content": "a" * 10}]},
     400, 'messages', 'messages: the prompt is 10 tokens, longer than the limit of 9'),
    ("/v1/chat/completions", {**CH, "messages": [{"role": "user", "content": "a" * 5},
                                                 {"role": "assistant", "content": "a" * 4}]},
     400, 'messages', 'messages: the prompt is 10 tokens, longer than the limit of 9'),  # the newline between counts
]


@pytest.mark.parametrize("route, body, status, param, message", REFUSED,
                         ids=[f"{i}-{r[3]}" for i, r in enumerate(REFUSED)])
def test_each_refusal_names_its_field_and_says_what_is_wrong(route, body, status, param, message):
    with pytest.raises(ApiError) as e:
        DECODE[route](body, TOK, L)
    err = e.value
    assert (err.status, err.param, err.message) == (status, param, message)
    assert str(err) == message  # as an exception, a refusal reads as its message
    assert err.type == "invalid_request_error"
    assert err.body() == {"error": {"message": message, "type": "invalid_request_error", "param": param,
                                    "code": "model_not_found" if status == 404 else None}}


# raw bodies: refused while parsing, before any field is read (param null)
RAW = [
    (b"{not json", "the request body is not valid JSON"),
    (b"", "the request body is not valid JSON"),
    (b"\xff\xfe", "the request body is not valid JSON"),
    (b"[" * 100000, "the request body is not valid JSON"),  # deeper than Python's recursion limit
    (b"[1, 2]", "the request body must be a JSON object, got list"),
    (b'"x"', "the request body must be a JSON object, got str"),
    (b"7", "the request body must be a JSON object, got int"),
    (b'{"a": 1e400}', "the request body holds 1e400, which does not fit a 64-bit float"),
    (b'{"a": -1e400}', "the request body holds -1e400, which does not fit a 64-bit float"),
    (b'{"a": ' + b"9" * 33 + b"}", "the request body holds a number of 33 characters (at most 32)"),
    (b'{"a": 0.' + b"5" * 31 + b"}", "the request body holds a number of 33 characters (at most 32)"),
    (b'{"a": NaN}', "the request body holds NaN, which is not a JSON number"),
    (b'{"a": Infinity}', "the request body holds Infinity, which is not a JSON number"),
    (b'{"a": -Infinity}', "the request body holds -Infinity, which is not a JSON number"),
    (b'{"\\ud800": 1}', "the request body holds a lone surrogate (\\uD800-\\uDFFF) in a string"),
    (b'{"a": ["\\udc00"]}', "the request body holds a lone surrogate (\\uD800-\\uDFFF) in a string"),
    (b'{"a": {"b": "\\ud800"}}', "the request body holds a lone surrogate (\\uD800-\\uDFFF) in a string"),
]


@pytest.mark.parametrize("body, message", RAW, ids=[str(i) for i in range(len(RAW))])
def test_each_unreadable_body_is_refused_before_any_field(body, message):
    with pytest.raises(ApiError) as e:
        parse_json(body, L.http)
    assert (e.value.status, e.value.param, e.value.message) == (400, None, message)


def test_numbers_up_to_the_limit_parse_to_their_values():
    assert parse_json(b'{"a": ' + b"9" * 32 + b"}") == {"a": int("9" * 32)}
    assert parse_json(b'{"a": -1.5e300, "b": [2.0, 0]}') == {"a": -1.5e300, "b": [2.0, 0]}
    assert parse_json(b'{"a": 123456}', HttpLimits(max_number_chars=6)) == {"a": 123456}
    with pytest.raises(ApiError):
        parse_json(b'{"a": 1234567}', HttpLimits(max_number_chars=6))
    # a surrogate pair is one character, not a lone surrogate
    assert parse_json('{"é": "\\u00e9 \\ud83d\\ude00"}'.encode()) == {"é": "é \U0001f600"}


def test_what_a_refusal_quotes_is_one_printable_line():
    """A field name or model name sent with control characters is quoted escaped, so the reply
    stays one line."""
    for name in ("fo\no", "a\u2028b", "tab\there", "nul\x00"):
        with pytest.raises(ApiError) as e:
            decode_completion({**C, name: 1}, TOK, L)
        escaped = ascii(name)[1:-1]
        assert e.value.param == escaped
        assert e.value.message == f"Unrecognized request argument supplied: {escaped}"
        assert e.value.message.isprintable()
    e = ApiError(400, "x\ud800y", param="p\rq")
    assert (e.message, e.param) == ("x\\ud800y", "p\\rq")
    # every lone surrogate (U+D800..U+DFFF) is escaped, and the characters either side of the range too
    # (U+D7FF is unassigned, U+E000 private): neither can be printed as it is
    for c in ("\ud7ff", "\ud800", "\ud801", "\udbff", "\udc00", "\udffe", "\udfff", "\ue000"):
        assert ApiError(400, f"<{c}>").message == f"<{ascii(c)[1:-1]}>", ascii(c)
    assert ApiError(400, "é \U0001f600").message == "é \U0001f600"  # printable non-ASCII stays
    json.dumps(e.body()).encode("utf-8")


# --- the lenient cases clients rely on ---

def test_a_reply_sent_back_with_openais_null_fields_is_accepted():
    """OpenAI's clients send a previous reply back as a message with its unset fields as null."""
    reply = {"role": "assistant", "content": "b", "refusal": None, "tool_calls": None, "function_call": None,
             "audio": None, "name": "poet"}
    req = decode_chat(msg({"role": "user", "content": "a"}, reply, {"role": "user", "content": "c"}), TOK, L)
    assert req.prompts == ["a\nb\nc"]
    for field in ("refusal", "tool_calls", "function_call", "audio"):
        for value in ([], "x", {"name": "f"}):
            with pytest.raises(ApiError) as e:
                decode_chat(msg({**reply, field: value}), TOK, L)
            assert e.value.param == f"messages[0].{field}", (field, value)


def test_text_parts_are_joined_as_they_are():
    parts = [{"type": "text", "text": "ab"}, {"type": "text", "text": ""}, {"type": "text", "text": "c d"}]
    req = decode_chat(msg({"role": "user", "content": parts}), TOK, L)
    assert req.prompts == ["abc d"]
    assert req.prompt_ids == [TOK.encode("abc d")]


def test_system_and_developer_messages_are_left_out_of_the_prompt():
    req = decode_chat(msg({"role": "system", "content": "zzz"}, {"role": "user", "content": "a"},
                          {"role": "developer", "content": "yyy"}, {"role": "assistant", "content": "b"}), TOK, L)
    assert req.prompts == ["a\nb"]


def test_integers_written_as_floats_and_neutral_values_are_accepted():
    req = decode_completion({**C, "n": 2.0, "best_of": 2, "max_tokens": 7.0, "seed": 0.0, "presence_penalty": 0,
                             "frequency_penalty": 0.0, "logit_bias": {}, "suffix": None, "user": "u",
                             "stream_options": {}, "echo": True, "stop": None}, TOK, L)
    assert (req.n, req.max_tokens, req.sampling.seed, req.echo, req.stop) == (2, 7, 0, True, [])
    assert isinstance(req.n, int) and isinstance(req.max_tokens, int)
    assert decode_completion({**C, "stream_options": None}, TOK, L).include_usage is False
    assert decode_completion({**C, "stream": True, "stream_options": {"include_usage": False}}, TOK, L).include_usage \
        is False


def test_chat_logprobs_top_logprobs_and_max_tokens():
    assert decode_chat(CH, TOK, L).logprobs is None
    assert decode_chat({**CH, "logprobs": False}, TOK, L).logprobs is None
    assert decode_chat({**CH, "logprobs": True}, TOK, L).logprobs == 0
    assert decode_chat({**CH, "logprobs": True, "top_logprobs": 0}, TOK, L).logprobs == 0
    assert decode_chat({**CH, "logprobs": True, "top_logprobs": 5}, TOK, L).logprobs == 5
    assert decode_chat({**CH, "logprobs": False, "top_logprobs": None}, TOK, L).logprobs is None
    assert decode_chat(CH, TOK, L).max_tokens == L.max_new_tokens  # default and maximum --max-new-tokens
    assert decode_chat({**CH, "max_tokens": 3}, TOK, L).max_tokens == 3
    assert decode_chat({**CH, "max_tokens": 7, "max_completion_tokens": 2}, TOK, L).max_tokens == 2
    assert decode_chat({**CH, "max_completion_tokens": 7}, TOK, L).max_tokens == 7
    req = decode_chat({**CH, "n": 3, "stop": ["x", "y"], "user": "u", "stream": True,
                       "stream_options": {"include_usage": True}}, TOK, L)
    assert (req.n, req.stop, req.stream, req.include_usage, req.echo) == (3, ["x", "y"], True, True, False)


def test_an_absent_prompt_starts_a_new_line_as_an_empty_one():
    """docs/serve.md: a prompt left out or empty starts the model on a new line, as `generate` does."""
    for body in ({"model": "edge-model"}, {**C, "prompt": ""}):
        req = decode_completion(body, TOK, L)
        assert req.prompts == [""] and req.prompt_ids == [TOK.encode("\n")]
    for body in ({}, {"prompt": ""}):
        req = decode_poem(body, TOK, L)
        assert req.prompt == "" and req.prompt_ids == TOK.encode("\n")


def test_best_of_equal_to_n_is_accepted_at_each_end():
    for n in (1, L.max_n):
        assert decode_completion({**C, "n": n, "best_of": n}, TOK, L).n == n


def test_a_poems_lines_and_stanzas_shape_its_form_only_where_given():
    """Stanzas of a one-stanza scheme repeat it; a scheme of several stanzas keeps its own unless
    stanzas are given; lines per stanza stretch a one-stanza scheme."""
    form = decode_poem({"rhyme": "ABAB", "stanzas": 3}, TOK, L).form
    assert (form.lines, form.stanzas) == (12, 3) and len(form.plan()) == 3
    assert decode_poem({"rhyme": "ABAB CDCD"}, TOK, L).form.plan() == [list("ABAB"), list("CDCD")]
    assert len(decode_poem({"rhyme": "ABAB CDCD", "stanzas": 3}, TOK, L).form.plan()) == 3
    assert decode_poem({"rhyme": "AABB", "lines": 8}, TOK, L).form.lines == 8
    # a preset is named back (in the poem's metadata) in lower case; a scheme of one's own has no name
    req = decode_poem({"form": "Sonnet"}, TOK, L)
    assert (req.form.rhyme, req.form.syllables, req.form_name) == ("ABAB CDCD EFEF GG", 10, "sonnet")
    req = decode_poem({"rhyme": "AABB"}, TOK, L)
    assert req.form.rhyme == "AABB" and req.form_name is None
    req = decode_poem({}, TOK, L)
    assert req.form is None and req.form_name is None  # free verse
