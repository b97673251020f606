"""Response encoding: OpenAI's completion objects and stream chunks, our poem objects, and
server-sent events. Pure functions of plain values; the app decides when to send them."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line (`data: [DONE]` ends OpenAI's streams)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, created: int, model: str, choices: list[tuple[str, str | None]],
               use: dict[str, int]) -> dict[str, Any]:
    """choices: (text, finish_reason) in index order."""
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"text": t, "index": i, "logprobs": None, "finish_reason": f} for i, (t, f) in enumerate(choices)],
            "usage": use}


def completion_chunk(cid: str, created: int, model: str, index: int, text: str,
                     finish_reason: str | None = None) -> dict[str, Any]:
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}]}


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
