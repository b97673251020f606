"""`GET /openapi.json`: an OpenAPI 3.1 description of the routes and their request bodies, with the
bounds the decoders in protocol.py enforce (so a client generator or a fuzzer sees the same
limits the server applies). Fields that OpenAI defines and this server refuses by name are listed
too, described as such."""

from __future__ import annotations

from typing import Any

from .. import limits as bounds
from .forms import FORMS
from .protocol import OPENAI_MAX_TOKENS, OPENAI_TEMPERATURE, POEM_LINES, Limits

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
# every description is docs/serve.md's words for the same thing (a test holds them there)
_REFUSED = {"description": "refused by name (400, param names the field)"}


def _sampling(limits: Limits, temperature: float) -> dict[str, Any]:
    return {
        "temperature": {"type": "number", "minimum": 0, "maximum": limits.max_temperature, "default": temperature,
                        "description": f"below {bounds.TEMPERATURE_FLOOR:g} (0 included) is greedy"},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": -1, "maximum": bounds.MAX_TOP_K,
                  "description": "-1 or 0: off"},
        "repetition_penalty": {"type": "number", "minimum": bounds.MIN_REPETITION_PENALTY,
                               "maximum": bounds.MAX_REPETITION_PENALTY, "default": 1},
        "seed": {"type": "integer", "minimum": 0, "maximum": bounds.MAX_SEED},
        "stream": {"type": "boolean", "default": False},
    }


def _openai_common(limits: Limits) -> dict[str, Any]:
    h = limits.http
    return {
        "model": {"type": "string", "enum": [limits.model_name]},
        "n": {"type": "integer", "minimum": 1, "maximum": limits.max_n, "default": 1},
        "stop": {"oneOf": [{"type": "string", "minLength": 1, "maxLength": h.max_stop_chars},
                           {"type": "array", "maxItems": h.max_stop_strings,
                            "items": {"type": "string", "minLength": 1, "maxLength": h.max_stop_chars}}]},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}},
                           "additionalProperties": False},
        "user": {"type": "string"},
        "presence_penalty": {"type": "number", "enum": [0], "default": 0},
        "frequency_penalty": {"type": "number", "enum": [0], "default": 0},
        "logit_bias": {"type": "object", "maxProperties": 0},
    }


def request_schemas(limits: Limits) -> dict[str, dict[str, Any]]:
    """The request body schema of each POST route."""
    h, max_tokens = limits.http, {"type": "integer", "minimum": 1, "maximum": limits.max_new_tokens}
    until_limit = {**max_tokens, "default": limits.max_new_tokens}  # chat's and the poem's default: the limit
    completion = {**_openai_common(limits), **_sampling(limits, OPENAI_TEMPERATURE),
                  "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1, "maxItems": limits.max_n,
                                                            "items": {"type": "string"}}]},
                  "max_tokens": {**max_tokens, "default": OPENAI_MAX_TOKENS},
                  "echo": {"type": "boolean", "default": False},
                  "logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": h.max_top_logprobs},
                  "best_of": {"type": "integer", "description": "equal to n only"},
                  "suffix": _REFUSED}
    part = {"type": "object", "required": ["type", "text"],
            "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
    message = {"type": "object", "required": ["role", "content"], "additionalProperties": False, "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant"]},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": part}]},
        "name": {"type": ["string", "null"]},
        # OpenAI's reply fields, sent back with a previous reply: accepted as null only
        **{name: {"type": "null"} for name in ("tool_calls", "function_call", "audio", "refusal")}}}
    chat = {**_openai_common(limits), **_sampling(limits, OPENAI_TEMPERATURE),
            "messages": {"type": "array", "minItems": 1, "maxItems": h.max_messages, "items": message},
            "max_tokens": until_limit, "max_completion_tokens": until_limit,
            "logprobs": {"type": "boolean", "default": False},
            "top_logprobs": {"type": "integer", "minimum": 0, "maximum": h.max_top_logprobs, "default": 0},
            "response_format": {"type": "object", "required": ["type"], "properties": {"type": {"const": "text"}},
                                "additionalProperties": False},
            "modalities": {"type": "array", "items": {"const": "text"}},
            "store": {"type": "boolean", "enum": [False]},
            **{name: _REFUSED for name in ("tools", "tool_choice", "functions", "function_call",
                                           "parallel_tool_calls", "audio", "prediction", "reasoning_effort",
                                           "web_search_options", "metadata", "service_tier")}}
    poem = {**_sampling(limits, bounds.DEFAULT_TEMPERATURE), "model": {"type": "string", "enum": [limits.model_name]},
            "prompt": {"type": "string"}, "max_tokens": until_limit,
            "lines": {"type": "integer", "minimum": 1, "maximum": limits.max_poem_lines, "default": POEM_LINES},
            "stanzas": {"type": "integer", "minimum": 1, "maximum": bounds.MAX_STANZAS, "default": 1},
            # verse forms (serve/forms.py holds their names and bounds)
            "form": {"type": "string", "enum": list(FORMS)},
            "rhyme": {"type": "string", "description": 'any scheme instead: "ABAB", "AABB CCDD", "ABBA", or a named one '
                                                    '(petrarchan, ballad, envelope, ...); not together with form'},
            "syllables": {"type": "integer", "minimum": 1, "maximum": bounds.MAX_SYLLABLES}}
    required = {"/v1/completions": ["model"], "/v1/chat/completions": ["model", "messages"], "/v1/poem": []}
    return {path: {"type": "object", "properties": props, "required": required[path], "additionalProperties": False}
            for path, props in (("/v1/completions", completion), ("/v1/chat/completions", chat), ("/v1/poem", poem))}


def openapi_schema(limits: Limits) -> dict[str, Any]:
    errors = {str(code): {"description": why, "content": {"application/json": {"schema": _ERROR}}}
              for code, why in ((400, "wrong types or out-of-range values"), (401, "a missing or wrong key"),
                                (404, "an unknown model"), (408, "if the body has not all arrived"),
                                (413, "a body over 1 MiB"), (415, "a body that is not Content-Type: application/json"),
                                (429, "a full queue"), (503, "a request arriving while the server shuts down"))}
    ok = {"description": "answers with its object, or server-sent events when stream is true",
          "content": {"application/json": {"schema": {"type": "object"}},
                      "text/event-stream": {"schema": {"type": "string"}}}}
    paths: dict[str, Any] = {
        path: {"post": {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
                        "responses": {"200": ok, **errors}}}
        for path, schema in request_schemas(limits).items()}
    json_ok = {"200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}}
    for path in ("/healthz", "/v1/models", "/v1/models/{model}", "/openapi.json"):
        paths[path] = {"get": {"responses": json_ok}}
    paths["/v1/models/{model}"]["get"]["parameters"] = [{"name": "model", "in": "path", "required": True,
                                                         "schema": {"type": "string"}}]
    paths["/metrics"] = {"get": {"responses": {"200": {"description": "Prometheus text format",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}}}}}
    return {"openapi": "3.1.0", "info": {"title": "gpt-small serve", "version": "1"}, "paths": paths,
            "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}}
