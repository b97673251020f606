"""Response encoding: OpenAI's completion and chat objects, their stream chunks and logprobs, our
poem objects, and server-sent events. Pure functions of plain values; the app decides when to send them."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


# a stream's headers: no caching, and no buffering by a proxy (nginx) between the server and the client
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line (`data: [DONE]` ends OpenAI's streams)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, created: int, model: str, choices: list[tuple[str, str | None, dict | None]],
               use: dict[str, int]) -> dict[str, Any]:
    """choices: (text, finish_reason, logprobs or None) in index order."""
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"text": t, "index": i, "logprobs": lp, "finish_reason": f}
                        for i, (t, f, lp) in enumerate(choices)],
            "usage": use}


def completion_chunk(cid: str, created: int, model: str, index: int, text: str,
                     finish_reason: str | None = None, logprobs: dict | None = None) -> dict[str, Any]:
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}]}


def usage_chunk(cid: str, created: int, model: str, use: dict[str, int]) -> dict[str, Any]:
    """stream_options.include_usage: the last chunk before [DONE], with no choices."""
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": None, "choices": [], "usage": use}


def timing(started: float, first_token_at: float | None, tokens: int) -> dict[str, Any]:
    now = time.perf_counter()
    seconds = now - started
    return {"ms": round(1000 * seconds, 1),
            "ttft_ms": None if first_token_at is None else round(1000 * (first_token_at - started), 1),
            "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None}


def poem(pid: str, model: str, prompt: str, text: str, finish_reason: str | None,
         prompt_tokens: int, tokens: int, times: dict[str, Any]) -> dict[str, Any]:
    return {"id": pid, "object": "poem", "model": model, "prompt": prompt, "text": text,
            "poem": prompt + text, "finish_reason": finish_reason, "usage": usage(prompt_tokens, tokens),
            "timing": times}


def models(model: str, created: int, weights: str) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(model, created, weights)]}


def model_card(model: str, created: int, weights: str) -> dict[str, Any]:
    """OpenAI's model object; `weights` (float32, bfloat16, int8) is ours, as OpenAI's clients keep
    fields they do not know."""
    return {"id": model, "object": "model", "created": created, "owned_by": "gpt-small", "weights": weights}


# --- logprobs: (token text, log-probability, [(alternative text, log-probability)]) per token ---

Scored = tuple[str, float, list[tuple[str, float]]]


def completion_logprobs(scored: list[Scored], offset: int, top: bool) -> dict[str, Any]:
    """OpenAI's completions shape; text_offset counts characters from the start of the choice's
    text. top_logprobs is null when no alternatives were asked for (logprobs: 0)."""
    offsets, at = [], offset
    for text, _, _ in scored:
        offsets.append(at)
        at += len(text)
    return {"tokens": [t for t, _, _ in scored], "token_logprobs": [lp for _, lp, _ in scored],
            "top_logprobs": [dict(alts) for _, _, alts in scored] if top else None, "text_offset": offsets}


def _chat_token(text: str, lp: float) -> dict[str, Any]:
    return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8", "replace"))}


def chat_logprobs(scored: list[Scored]) -> dict[str, Any]:
    return {"content": [{**_chat_token(t, lp), "top_logprobs": [_chat_token(a, alp) for a, alp in alts]}
                        for t, lp, alts in scored], "refusal": None}


# --- chat: chat.completion and chat.completion.chunk ---

def chat_completion(cid: str, created: int, model: str, choices: list[tuple[str, str | None, dict | None]],
                    use: dict[str, int]) -> dict[str, Any]:
    """choices: (text, finish_reason, logprobs or None) in index order."""
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": None, "service_tier": None,
            "choices": [{"index": i, "message": {"role": "assistant", "content": t, "refusal": None},
                         "logprobs": lp, "finish_reason": f} for i, (t, f, lp) in enumerate(choices)],
            "usage": use}


def chat_chunk(cid: str, created: int, model: str, index: int, delta: dict[str, Any],
               finish_reason: str | None = None, logprobs: dict | None = None) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def chat_usage_chunk(cid: str, created: int, model: str, use: dict[str, int]) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None, "choices": [], "usage": use}
