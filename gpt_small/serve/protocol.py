"""Request decoding: JSON bodies in, checked request objects out, or an `ApiError` naming the field.

Every bad request becomes a 4xx in OpenAI's error shape (`{"error": {"message", "type", "param",
"code"}}`), never a 500: the decoders below check types and ranges before anything reaches the
engine, and the prompt is encoded here, so a character outside the vocabulary or a prompt past the
limit is refused with a message that says which.

`/v1/completions` follows OpenAI's legacy completions API: prompt (a string or a list of strings),
max_tokens (default 16), temperature (0-2, default 1), top_p, n, stop (a string or up to 4),
seed, stream, stream_options.include_usage, echo, user, logprobs (0-5: the sampled token's
log-probability and the top N). Fields that would change the result and that we do not implement
(best_of > n, suffix, logit_bias, non-zero presence/frequency penalties) are refused, not silently
ignored; unknown fields are refused as OpenAI refuses them. Two extensions, as vLLM spells them:
top_k and repetition_penalty. chat.py decodes /v1/chat/completions with the same helpers.

`HTTP_LIMITS` is the one table of what a request may hold (body size, number length, stop strings,
connection timeouts); docs/serve.md shows it and the tests walk it. A bound that means what it means
on the command line (stop strings, seed, top_k, repetition penalty, syllables, stanzas) is read from
gpt_small/limits.py; the server keeps its own value only where it follows OpenAI or protects the
other clients, and says so beside it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from .. import limits as bounds
from ..errors import GPTSmallError


class ApiError(Exception):
    """A request the server refuses: HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        message, param = _printable(message), None if param is None else _printable(param)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _printable(text: str) -> str:
    """One line that encodes as UTF-8, whatever a message quotes from the request: control
    characters and lone surrogates become escapes."""
    # a lone surrogate (category Cs) is never printable, so isprintable() refuses it too
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


# a sample that failed mid-stream: an event in OpenAI's error shape before [DONE], never a bare end
STREAM_ERROR = ApiError(500, "internal error while generating (logged by the server)", type="server_error").body()


def busy(message: str) -> ApiError:
    """429: the queue is full; the same server takes the request shortly."""
    return ApiError(429, f"the server is busy: {message}; retry shortly", type="requests",
                    code="rate_limit_exceeded", headers={"Retry-After": "1"})


def going_away(message: str) -> ApiError:
    """503: the server is shutting down; another one (or this one, once back) takes the request."""
    return ApiError(503, f"{message}; retry on another server or once it is back", type="server_error",
                    code="service_unavailable", headers={"Retry-After": "5"})


@dataclass(frozen=True, kw_only=True)
class HttpLimits:
    """Bounds on what one client may send, checked before any work; one field per row of the
    limits table in docs/serve.md."""

    max_body_bytes: int = 1 << 20  # a request body; a prompt at the token limit is far smaller
    max_number_chars: int = 32  # digits of one JSON number: Python parses a 10,000-digit integer slowly
    max_stop_strings: int = bounds.MAX_STOP_STRINGS  # as OpenAI, and as the CLI
    max_stop_chars: int = bounds.MAX_STOP_CHARS  # searched for at every token of every row
    max_top_logprobs: int = 5  # as OpenAI's completions API
    max_messages: int = 256  # chat messages in one request
    header_seconds: float = 10.0  # a connection must send a request's headers within this
    body_seconds: float = 30.0  # and its body within this
    keep_alive_seconds: int = 5  # an idle keep-alive connection is closed after this
    max_header_bytes: int = 16 * 1024  # the request line and headers together
    max_connections: int = 512  # past this the oldest idle connection is closed


HTTP_LIMITS = HttpLimits()


@dataclass(kw_only=True)
class Limits:
    """What the server accepts; set from `gpt-small serve`'s flags."""

    model_name: str  # the one model id served
    max_new_tokens: int = 1000  # most tokens one sample may ask for
    max_prompt_tokens: int = 4096  # longer prompts are refused (the model sees the last block_size)
    # The server's own caps, lower than the CLI's because rows share one batch with other clients:
    # OpenAI's temperature range (0-2; the CLI takes up to limits.MAX_TEMPERATURE), samples per
    # request, and verse lines per stanza of /v1/poem (max_tokens bounds the poem anyway).
    max_temperature: float = 2.0
    max_n: int = 8  # prompts x n
    max_poem_lines: int = 200
    http: HttpLimits = HTTP_LIMITS


# Defaults a request may leave out: OpenAI's for its routes; /v1/poem's are generate's.
OPENAI_TEMPERATURE = 1.0
OPENAI_MAX_TOKENS = 16
POEM_LINES = 12  # verse lines per stanza


@dataclass(kw_only=True)
class Sampling:
    """Per-sample options; each sample draws from its own generator seeded with `seed`."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None


@dataclass(kw_only=True)
class CompletionRequest:
    prompts: list[str]
    prompt_ids: list[list[int]]
    max_tokens: int
    n: int
    stop: list[str]
    stream: bool
    include_usage: bool
    echo: bool
    sampling: Sampling
    logprobs: int | None = None  # top-N alternatives per token (0: the sampled token's only); None: off


@dataclass(kw_only=True)
class PoemRequest:
    prompt: str
    prompt_ids: list[int]
    lines: int  # verse lines per stanza
    stanzas: int  # a blank line is put between stanzas (layout: the model never sees it)
    max_tokens: int
    stream: bool
    sampling: Sampling = field(default_factory=Sampling)
    form: Any = None  # a forms.Form when the request asks for one (serve/forms.py), else free verse
    form_name: str | None = None  # its preset's name, if any


class _BadNumber(ValueError):
    pass


def parse_json(body: bytes, http: HttpLimits = HTTP_LIMITS) -> dict[str, Any]:
    """The body as a JSON object. Numbers longer than `max_number_chars` and numbers that overflow a
    float (1e400) are refused while parsing, before Python builds a huge int; so are NaN/Infinity
    (not JSON) and lone surrogates anywhere (they cannot be encoded back to UTF-8)."""
    def number(kind: type) -> Any:
        def parse(text: str) -> Any:
            if len(text) > http.max_number_chars:
                raise _BadNumber(f"a number of {len(text)} characters (at most {http.max_number_chars})")
            v = kind(text)
            if isinstance(v, float) and not math.isfinite(v):
                raise _BadNumber(f"{text}, which does not fit a 64-bit float")
            return v
        return parse

    def constant(text: str) -> Any:
        raise _BadNumber(f"{text}, which is not a JSON number")

    try:
        d = json.loads(body, parse_int=number(int), parse_float=number(float), parse_constant=constant)
        _check_text(d)
    except _BadNumber as e:
        raise ApiError(400, f"the request body holds {e}") from None
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(d, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(d).__name__}")
    return d


def _check_text(v: Any) -> None:
    """Refuse lone surrogates (\\ud800 escapes) in any key or string, which no reply could quote."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "the request body holds a lone surrogate (\\uD800-\\uDFFF) in a string") from None
    elif isinstance(v, dict):
        for k, x in v.items():
            _check_text(k)
            _check_text(x)
    elif isinstance(v, list):
        for x in v:
            _check_text(x)


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param)


def _int(d: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    v = d.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise _bad(name, f"expected an integer, got {json.dumps(v)[:40]}")
    if not lo <= v <= hi:
        raise _bad(name, f"{v} is out of range; expected {lo}..{hi}")
    return v


def _float(d: dict, name: str, default: float | None, lo: float, hi: float, lo_open: bool = False) -> float | None:
    v = d.get(name)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise _bad(name, f"expected a number, got {json.dumps(v)[:40]}")
    if v < lo or v > hi or (lo_open and v == lo):
        raise _bad(name, f"{v} is out of range; expected {'(' if lo_open else '['}{lo}, {hi}]")
    return float(v)


def _bool(d: dict, name: str, default: bool, param: str | None = None) -> bool:
    v = d.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(param or name, f"expected true or false, got {json.dumps(v)[:40]}")
    return v


def _sampling(d: dict, temperature_default: float, limits: Limits) -> Sampling:
    """The CLI's sampling bounds (limits.py), except OpenAI's temperature cap. Below
    limits.TEMPERATURE_FLOOR the engine's `sample` is greedy, as `generate` is."""
    return Sampling(
        temperature=_float(d, "temperature", temperature_default, 0.0, limits.max_temperature),
        top_k=(_int(d, "top_k", None, 1, bounds.MAX_TOP_K)
               if d.get("top_k") not in (None, -1, 0) else None),  # vLLM: -1 = off
        top_p=_float(d, "top_p", None, 0.0, 1.0, lo_open=True),
        repetition_penalty=_float(d, "repetition_penalty", 1.0, bounds.MIN_REPETITION_PENALTY,
                                  bounds.MAX_REPETITION_PENALTY),
        seed=_int(d, "seed", None, 0, bounds.MAX_SEED),
    )


def _no_penalties(d: dict) -> None:
    """OpenAI's presence/frequency penalties (-2..2): only 0, their off value, is supported."""
    for name in ("presence_penalty", "frequency_penalty"):
        if _float(d, name, 0.0, -2.0, 2.0) != 0.0:
            raise _bad(name, "only 0 is supported; see repetition_penalty")


def encode_prompt(tokenizer: Any, text: str, limits: Limits, param: str = "prompt") -> list[int]:
    """Token ids of a prompt ("" starts a new line, as `generate` does); refuses unknown
    characters and prompts past the limit."""
    if len(text) > 8 * limits.max_prompt_tokens:  # no token is 8 characters: refuse before encoding
        raise _bad(param, f"the prompt is longer than the limit of {limits.max_prompt_tokens} tokens")
    try:
        ids = tokenizer.encode(text or "\n", unknown="error")
    except GPTSmallError as e:
        raise _bad(param, str(e)) from None
    if len(ids) > limits.max_prompt_tokens:
        raise _bad(param, f"the prompt is {len(ids)} tokens, longer than the limit of {limits.max_prompt_tokens}")
    return ids


def check_model(d: dict, limits: Limits, required: bool) -> None:
    model = d.get("model")
    if model is None and not required:
        return
    if not isinstance(model, str):
        raise _bad("model", "expected the model's name as a string" if model is not None else "is required")
    if model != limits.model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {limits.model_name!r}",
                       param="model", code="model_not_found")


def check_fields(d: dict[str, Any], allowed: set[str]) -> None:
    """OpenAI's answer to a field it does not know."""
    for name in d:
        if name not in allowed:
            raise ApiError(400, f"Unrecognized request argument supplied: {name}", param=name)


_COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream",
                      "stream_options", "echo", "user", "logprobs", "best_of", "suffix", "logit_bias",
                      "presence_penalty", "frequency_penalty", "top_k", "repetition_penalty"}


def decode_completion(d: dict[str, Any], tokenizer: Any, limits: Limits) -> CompletionRequest:
    check_fields(d, _COMPLETION_FIELDS)
    check_model(d, limits, required=True)
    prompt = d.get("prompt", "")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (int, list)) for p in prompt):
        raise _bad("prompt", "token-id prompts are not supported; send text")
    else:
        raise _bad("prompt", "expected a string or a non-empty list of strings")
    if d.get("suffix") is not None:
        raise _bad("suffix", "is not supported by this server")
    if d.get("logit_bias"):
        raise _bad("logit_bias", "is not supported by this server")
    _no_penalties(d)
    n = _int(d, "n", 1, 1, limits.max_n)
    if _int(d, "best_of", n, 1, limits.max_n) != n:
        raise _bad("best_of", "only best_of = n is supported")
    if n * len(prompts) > limits.max_n:
        raise _bad("n", f"{len(prompts)} prompts x n={n} samples is more than this server's {limits.max_n}")
    logprobs = _int(d, "logprobs", None, 0, limits.http.max_top_logprobs)
    echo = _bool(d, "echo", False)
    if echo and logprobs is not None:
        raise _bad("logprobs", "with echo is not supported (the prompt's tokens are not scored)")
    if d.get("user") is not None and not isinstance(d.get("user"), str):
        raise _bad("user", "expected a string")
    stream = _bool(d, "stream", False)
    return CompletionRequest(
        prompts=prompts, prompt_ids=[encode_prompt(tokenizer, p, limits) for p in prompts],
        max_tokens=_int(d, "max_tokens", OPENAI_MAX_TOKENS, 1, limits.max_new_tokens), n=n, stop=decode_stop(d, limits),
        stream=stream, include_usage=include_usage(d, stream), echo=echo,
        sampling=_sampling(d, OPENAI_TEMPERATURE, limits), logprobs=logprobs)


def decode_stop(d: dict[str, Any], limits: Limits) -> list[str]:
    stop, h = d.get("stop"), limits.http
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and len(stop) <= h.max_stop_strings and all(isinstance(s, str) and s for s in stop)):
        raise _bad("stop", f"expected a non-empty string or a list of up to {h.max_stop_strings} non-empty strings")
    if any(len(s) > h.max_stop_chars for s in stop):
        raise _bad("stop", f"a stop string is longer than {h.max_stop_chars} characters")
    return stop


def include_usage(d: dict[str, Any], stream: bool) -> bool:
    opts = d.get("stream_options")
    if opts is not None and not (isinstance(opts, dict) and set(opts) <= {"include_usage"}):
        raise _bad("stream_options", "expected an object with include_usage")
    usage = _bool(opts or {}, "include_usage", False, param="stream_options.include_usage")
    return stream and usage


_POEM_FIELDS = {"model", "prompt", "lines", "stanzas", "temperature", "top_k", "top_p", "repetition_penalty",
                "seed", "stream", "max_tokens", "form", "rhyme", "syllables"}


def decode_poem(d: dict[str, Any], tokenizer: Any, limits: Limits) -> PoemRequest:
    check_fields(d, _POEM_FIELDS)
    check_model(d, limits, required=False)
    prompt = d.get("prompt", "")
    if not isinstance(prompt, str):
        raise _bad("prompt", "expected a string")
    lines = _int(d, "lines", POEM_LINES, 1, limits.max_poem_lines)
    stanzas = _int(d, "stanzas", 1, 1, bounds.MAX_STANZAS)
    from .forms import decode_form  # verse forms: their fields and checks live with them

    form = decode_form(d, d.get("lines") and lines, d.get("stanzas") and stanzas)
    if form is not None and d.get("max_tokens") is not None:
        raise _bad("max_tokens", "does not apply to a poem in a form (each line is at most half the context)")
    return PoemRequest(prompt=prompt, prompt_ids=encode_prompt(tokenizer, prompt, limits), lines=lines,
                       stanzas=stanzas, max_tokens=_int(d, "max_tokens", limits.max_new_tokens, 1,
                                                        limits.max_new_tokens),
                       stream=_bool(d, "stream", False), sampling=_sampling(d, bounds.DEFAULT_TEMPERATURE, limits),
                       form=form and form[0], form_name=form and form[1])


# --- /v1/chat/completions: OpenAI's chat shape over a base model ---

_CHAT_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop",
                "seed", "stream", "stream_options", "user", "logprobs", "top_logprobs", "logit_bias",
                "presence_penalty", "frequency_penalty", "top_k", "repetition_penalty", "response_format",
                "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "audio", "modalities",
                "prediction", "reasoning_effort", "web_search_options", "store", "metadata", "service_tier"}
# Known to OpenAI, meaningless for a model that only continues text: refused by name when set.
_CHAT_UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "audio",
                     "prediction", "reasoning_effort", "web_search_options", "metadata", "service_tier")
_ROLES = ("system", "developer", "user", "assistant")


def chat_prompt(messages: list[dict[str, Any]]) -> str:
    """The chat template: a base model continues text, so the conversation is read as one poem
    written in turns. The user and assistant messages' texts, in order, joined by newlines, are the
    prompt; the reply continues it (so one user message gives what /v1/completions gives for the
    same prompt). System and developer messages are instructions that a model trained on poems
    cannot follow: they are left out rather than written into the poem."""
    return "\n".join(m["content"] for m in messages if m["role"] in ("user", "assistant"))


def _message(i: int, m: Any) -> dict[str, str]:
    param = f"messages[{i}]"
    if not isinstance(m, dict):
        raise _bad(param, "expected an object with role and content")
    role = m.get("role")
    if role in ("tool", "function"):
        raise _bad(f"{param}.role", f"{role!r} messages are not supported: this server has no tools")
    if role not in _ROLES:
        raise _bad(f"{param}.role", f"expected one of {', '.join(_ROLES)}, got {json.dumps(role)[:40]}")
    for name in m:
        if name not in ("role", "content", "name"):
            if name in ("tool_calls", "function_call", "audio", "refusal") and m[name] is None:
                continue
            raise _bad(f"{param}.{name}", "is not supported by this server")
    if m.get("name") is not None and not isinstance(m["name"], str):  # null: left out, as OpenAI's fields above
        raise _bad(f"{param}.name", f"expected a string, got {json.dumps(m['name'])[:40]}")
    content = m.get("content")
    if isinstance(content, list):  # content parts: text only
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise _bad(f"{param}.content", f"only text parts are supported, got {json.dumps(kind)[:40]}")
            if not isinstance(part.get("text"), str):
                raise _bad(f"{param}.content", "a text part's text must be a string")
        content = "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise _bad(f"{param}.content", "expected a string or a list of text parts")
    return {"role": role, "content": content}


def decode_chat(d: dict[str, Any], tokenizer: Any, limits: Limits) -> CompletionRequest:
    """A chat request as the completion request it runs as (one prompt, n samples)."""
    check_fields(d, _CHAT_FIELDS)
    check_model(d, limits, required=True)
    for name in _CHAT_UNSUPPORTED:
        if d.get(name) not in (None, [], {}, "none", False):  # unset, however a client spells it
            raise _bad(name, "is not supported by this server (a base model without tools or other modalities)")
    if d.get("modalities") not in (None, ["text"]):
        raise _bad("modalities", 'only ["text"] is supported')
    fmt = d.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise _bad("response_format", 'only {"type": "text"} is supported: a base model cannot promise JSON')
    if d.get("store") not in (None, False):
        raise _bad("store", "is not supported by this server: nothing is stored")
    if d.get("logit_bias"):
        raise _bad("logit_bias", "is not supported by this server")
    _no_penalties(d)
    messages = d.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "expected a non-empty list of messages")
    if len(messages) > limits.http.max_messages:
        raise _bad("messages", f"{len(messages)} messages, more than the limit of {limits.http.max_messages}")
    prompt = chat_prompt([_message(i, m) for i, m in enumerate(messages)])
    logprobs = _bool(d, "logprobs", False)
    top = _int(d, "top_logprobs", None, 0, limits.http.max_top_logprobs)
    if top is not None and not logprobs:
        raise _bad("top_logprobs", "needs logprobs: true")
    if d.get("user") is not None and not isinstance(d.get("user"), str):
        raise _bad("user", "expected a string")
    # OpenAI's newer name wins over the deprecated one when a client sends both
    older = _int(d, "max_tokens", None, 1, limits.max_new_tokens)
    max_tokens = _int(d, "max_completion_tokens", older, 1, limits.max_new_tokens)
    stream = _bool(d, "stream", False)
    return CompletionRequest(
        prompts=[prompt], prompt_ids=[encode_prompt(tokenizer, prompt, limits, param="messages")],
        max_tokens=max_tokens or limits.max_new_tokens, n=_int(d, "n", 1, 1, limits.max_n), stop=decode_stop(d, limits),
        stream=stream, include_usage=include_usage(d, stream), echo=False,
        sampling=_sampling(d, OPENAI_TEMPERATURE, limits), logprobs=(top or 0) if logprobs else None)
