"""The ASGI app (Starlette): routes, auth, request checks and logging, and the bridge from the
engine's worker thread to the event loop. Request decoding lives in protocol.py, batching in
engine.py, response encoding in responses.py; this file only wires them.

Routes: `GET /` (the page), `GET /healthz`, `GET /metrics` (Prometheus), `GET /openapi.json`,
`GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/completions` and `POST /v1/chat/completions`
(OpenAI), `POST /v1/poem` (ours). With an API key, /v1/* and /metrics want
`Authorization: Bearer <key>`. Each request logs one line: method, path, status, tokens, ms.

Handlers are module-level functions that find what they serve in `request.app.state`
(`create_app` puts it there), so each can be called alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..ops.quantize import weights_of
from . import responses as R
from .guard import Guard, route_of
from .engine import DEFAULT_MAX_BATCH, DEFAULT_PREFILL_BATCH, Engine, QueueFull, Sequence, ShuttingDown
from .forms import form_poem
from .metrics import CONTENT_TYPE, Metrics
from .openapi import openapi_schema
from .protocol import (HTTP_LIMITS, STREAM_ERROR, ApiError, CompletionRequest, HttpLimits, Limits, busy, decode_chat,
                       decode_completion, decode_poem, going_away, parse_json)

log = logging.getLogger("gpt_small.serve")

_POLL = 0.5  # seconds between checks for a client that left while no text was coming


class LogRequests:
    """ASGI middleware: one line per request once its response has ended (streams included), and
    the request counted in the metrics by route and status."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]
        state = scope.setdefault("state", {})

        async def send_logged(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        finally:
            seconds = time.perf_counter() - t0
            tail = " (client left)" if state.get("cancelled") else ""
            log.info("%s %s %d tokens=%d ms=%.0f%s", scope["method"], scope["path"], status[0] or 500,
                     state.get("tokens", 0), 1000 * seconds, tail)
            self.metrics.request(route_of(scope["path"]), status[0] or 500, seconds)


# --- helpers shared by the handlers ---

def authorize(request: Request) -> None:
    """The scheme name is case-insensitive (RFC 9110); the key is compared in constant time."""
    key = request.app.state.api_key
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if not (scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())):
        raise ApiError(401, "missing or wrong API key: send the header Authorization: Bearer <key>",
                       code="invalid_api_key")


async def body_json(request: Request) -> dict[str, Any]:
    """The body, bounded in size and in time (a client trickling bytes is cut off)."""
    http = request.app.state.limits.http
    body = b""
    try:
        async with asyncio.timeout(http.body_seconds):
            async for chunk in request.stream():
                body += chunk
                if len(body) > http.max_body_bytes:
                    raise ApiError(413, f"the request body is larger than {http.max_body_bytes} bytes")
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {http.body_seconds:g} s") from None
    return parse_json(body, http)


def start(request: Request, seqs: list[Sequence]) -> asyncio.Queue:
    """Hand seqs to the engine; their events arrive on the returned queue as (index, kind, value)."""
    state = request.app.state
    if state.draining:
        raise going_away("the server is shutting down")
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    for i, s in enumerate(seqs):
        def bridge(kind: str, value: Any, i: int = i) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, (i, kind, value))
        s.on_event = bridge
    try:
        state.engine.submit(seqs)
    except ShuttingDown as e:
        raise going_away(str(e)) from None
    except QueueFull as e:
        raise busy(str(e)) from None
    return queue


async def events(request: Request, seqs: list[Sequence], queue: asyncio.Queue,
                 watch: bool = False) -> AsyncIterator[tuple]:
    """Yield (index, kind, value) until every sequence is done; a client that leaves (or a stream
    closed early) cancels what is left, which frees the rows at the next step. With `watch` (a
    response sent only at the end, its body already read) the disconnect cancels at once."""
    left, metrics = len(seqs), request.app.state.metrics
    checked = time.monotonic()
    watcher = asyncio.create_task(cancel_on_disconnect(request, seqs)) if watch else None
    try:
        while left:
            # a client that left is noticed within _POLL seconds, also while text is flowing (a
            # non-streamed request would otherwise hold its rows to its last token)
            if time.monotonic() - checked > _POLL:
                if await request.is_disconnected():
                    return
                checked = time.monotonic()
            try:  # wait_for costs a task per call: only when nothing is ready
                item = queue.get_nowait() if not queue.empty() else await asyncio.wait_for(queue.get(), _POLL)
            except TimeoutError:
                continue
            if item[1] == "done":
                left -= 1
                metrics.sample(seqs[item[0]], time.perf_counter())
            request.state.tokens = sum(len(s.new_ids) for s in seqs)
            yield item
    finally:
        if watcher is not None:
            watcher.cancel()
        if left:
            request.state.cancelled = True
            request.app.state.engine.cancel(seqs)


async def cancel_on_disconnect(request: Request, seqs: list[Sequence]) -> None:
    """The body has been read, so the next ASGI message is the client's disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    request.state.cancelled = True
    request.app.state.engine.cancel(seqs)


class Scores:
    """A sequence's per-token logprobs handed out as its text is: tokens whose text lies within
    `upto` characters of the continuation (the rest wait, or are dropped past a stop string)."""

    def __init__(self, seq: Sequence, tokenizer: Any):
        self.seq, self.tokenizer = seq, tokenizer
        self.sent, self.chars = 0, 0  # tokens handed out, and their characters

    def take(self, upto: int, final: bool = False) -> list[R.Scored]:
        out, decode = [], self.tokenizer.decode
        # the worker thread may be between recording a token's logprobs and appending its id
        while self.sent < min(len(self.seq.token_logprobs), len(self.seq.new_ids)):
            text = decode([self.seq.new_ids[self.sent]])
            end = self.chars + len(text)
            if end > upto and not (final and self.chars < upto):
                break
            lp, alts = self.seq.token_logprobs[self.sent]
            out.append((text, lp, [(decode([t]), a) for t, a in alts]))
            self.sent, self.chars = self.sent + 1, end
        return out


def samples(req: CompletionRequest, tokenizer: Any) -> list[Sequence]:
    seqs = []
    for ids in req.prompt_ids:
        for j in range(req.n):  # sample j of a seeded request draws from seed + j
            s = (req.sampling if req.sampling.seed is None
                 else dataclasses.replace(req.sampling, seed=req.sampling.seed + j))
            seqs.append(Sequence(ids, s, max_new_tokens=req.max_tokens, tokenizer=tokenizer, stop=req.stop,
                                 logprobs=req.logprobs))
    return seqs


def sse_response(request: Request, seqs: list[Sequence], queue: asyncio.Queue, scores: list[Scores],
                 text: Callable[[int, str, bool, list], dict], end: Callable[[int, str, bool, list], dict],
                 usage: Callable[[dict], dict] | None, prompt_tokens: int, opening: list[dict] = ()) -> Response:
    """Server-sent events for completions and chat alike: `opening`, then for each sample its text
    chunks (`text(i, piece, first, logprobs)`) and its end (`end(i, reason, first, logprobs)`), an
    error event in OpenAI's shape for a sample that failed, the usage chunk if asked, [DONE]."""
    async def stream() -> AsyncIterator[bytes]:
        for chunk in opening:
            yield R.sse(chunk)
        sent = [0] * len(seqs)  # characters of each sample's text sent so far
        async for i, kind, value in events(request, seqs, queue):
            if kind == "text":
                first = not sent[i]
                sent[i] += len(value)
                yield R.sse(text(i, value, first, scores[i].take(sent[i])))
            elif value in ("stop", "length"):
                yield R.sse(end(i, value, not sent[i], scores[i].take(len(seqs[i].text), final=True)))
            elif value == "error":
                yield R.sse(STREAM_ERROR)
        if usage is not None:
            yield R.sse(usage(R.usage(prompt_tokens, sum(len(q.new_ids) for q in seqs))))
        yield R.sse("[DONE]")
    return StreamingResponse(stream(), media_type="text/event-stream", headers=R.SSE_HEADERS)


async def finished(request: Request, seqs: list[Sequence], queue: asyncio.Queue) -> None:
    async for _ in events(request, seqs, queue, watch=True):
        pass
    if any(s.finish_reason == "error" for s in seqs):
        raise RuntimeError("the decode loop failed (logged)")


# --- routes ---

async def page(request: Request) -> Response:
    return FileResponse(str(request.app.state.static / "index.html"), media_type="text/html; charset=utf-8")


async def healthz(request: Request) -> Response:
    s = request.app.state
    return JSONResponse({"status": "ok", "model": s.model_name, "params": s.n_params, "weights": s.weights,
                         **s.engine.stats()})


async def metrics(request: Request) -> Response:
    authorize(request)
    s = request.app.state
    return Response(s.metrics.render(s.engine.stats()), media_type=CONTENT_TYPE)


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_schema(request.app.state.limits))


async def list_models(request: Request) -> Response:
    authorize(request)
    s = request.app.state
    return JSONResponse(R.models(s.model_name, s.created, s.weights))


async def get_model(request: Request) -> Response:
    authorize(request)
    s, wanted = request.app.state, request.path_params["model"]
    if wanted != s.model_name:
        raise ApiError(404, f"the model {wanted!r} does not exist", param="model", code="model_not_found")
    return JSONResponse(R.model_card(s.model_name, s.created, s.weights))


async def completions(request: Request) -> Response:
    authorize(request)
    s = request.app.state
    req = decode_completion(await body_json(request), s.tokenizer, s.limits)
    seqs = samples(req, s.tokenizer)
    queue = start(request, seqs)
    prompt_tokens = sum(len(ids) for ids in req.prompt_ids)
    cid, now, name = R.new_id("cmpl"), int(time.time()), s.model_name
    echo = [req.prompts[i // req.n] if req.echo else "" for i in range(len(seqs))]
    scores, top = [Scores(q, s.tokenizer) for q in seqs], bool(req.logprobs)  # logprobs 0: no alternatives
    lp = (lambda i, got: R.completion_logprobs(got, scores[i].chars - sum(len(t) for t, _, _ in got), top)
          if req.logprobs is not None else None)
    if req.stream:
        def text(i: int, piece: str, first: bool, got: list) -> dict:
            return R.completion_chunk(cid, now, name, i, (echo[i] if first else "") + piece, None, lp(i, got))

        def end(i: int, reason: str, first: bool, got: list) -> dict:
            return R.completion_chunk(cid, now, name, i, echo[i] if first else "", reason, lp(i, got) if got else None)

        usage = (lambda u: R.usage_chunk(cid, now, name, u)) if req.include_usage else None
        return sse_response(request, seqs, queue, scores, text, end, usage, prompt_tokens)
    await finished(request, seqs, queue)
    choices = [(echo[i] + q.text, q.finish_reason, lp(i, scores[i].take(len(q.text), final=True)))
               for i, q in enumerate(seqs)]
    return JSONResponse(R.completion(cid, now, name, choices,
                                     R.usage(prompt_tokens, sum(len(q.new_ids) for q in seqs))))


async def chat_completions(request: Request) -> Response:
    authorize(request)
    s = request.app.state
    req = decode_chat(await body_json(request), s.tokenizer, s.limits)
    seqs = samples(req, s.tokenizer)
    queue = start(request, seqs)
    prompt_tokens = len(req.prompt_ids[0])
    cid, now, name = R.new_id("chatcmpl"), int(time.time()), s.model_name
    scores = [Scores(q, s.tokenizer) for q in seqs]
    lp = (lambda got: R.chat_logprobs(got)) if req.logprobs is not None else (lambda got: None)
    if req.stream:
        def text(i: int, piece: str, first: bool, got: list) -> dict:
            return R.chat_chunk(cid, now, name, i, {"content": piece}, None, lp(got))

        def end(i: int, reason: str, first: bool, got: list) -> dict:
            return R.chat_chunk(cid, now, name, i, {}, reason, lp(got) if got else None)

        usage = (lambda u: R.chat_usage_chunk(cid, now, name, u)) if req.include_usage else None
        # OpenAI opens each choice with the role
        opening = [R.chat_chunk(cid, now, name, i, {"role": "assistant", "content": ""}) for i in range(len(seqs))]
        return sse_response(request, seqs, queue, scores, text, end, usage, prompt_tokens, opening)
    await finished(request, seqs, queue)
    choices = [(q.text, q.finish_reason, lp(scores[i].take(len(q.text), final=True))) for i, q in enumerate(seqs)]
    return JSONResponse(R.chat_completion(cid, now, name, choices,
                                          R.usage(prompt_tokens, sum(len(q.new_ids) for q in seqs))))


async def poem(request: Request) -> Response:
    authorize(request)
    s = request.app.state
    req = decode_poem(await body_json(request), s.tokenizer, s.limits)
    if req.form is not None:  # rhyme / syllables: serve/forms.py, its lines as rows of the engine
        return await form_poem(request, req, s.engine, s.model, s.tokenizer, s.model_name)
    seq = Sequence(req.prompt_ids, req.sampling, max_new_tokens=req.max_tokens, tokenizer=s.tokenizer,
                   lines=req.lines * req.stanzas)
    queue = start(request, [seq])
    pid = R.new_id("poem")
    breaks = StanzaBreaks(req.lines, req.stanzas)

    def result() -> dict[str, Any]:
        return R.poem(pid, s.model_name, req.prompt, breaks.layout(seq.text), seq.finish_reason,
                      len(req.prompt_ids), len(seq.new_ids),
                      R.timing(seq.submitted, seq.first_token_at, len(seq.new_ids)))

    if req.stream:
        async def stream() -> AsyncIterator[bytes]:
            async for _, kind, value in events(request, [seq], queue):
                if kind == "text":
                    yield R.sse({"text": breaks.feed(value)})
                elif value in ("stop", "length"):
                    yield R.sse({"done": True, **result()})
                elif value == "error":
                    yield R.sse(STREAM_ERROR)
            yield R.sse("[DONE]")
        return StreamingResponse(stream(), media_type="text/event-stream", headers=R.SSE_HEADERS)
    await finished(request, [seq], queue)
    return JSONResponse(result())


# --- errors: OpenAI's shape for every status ---

def error_response(err: ApiError) -> Response:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def api_error(request: Request, exc: ApiError) -> Response:
    return error_response(exc)


async def http_error(request: Request, exc: HTTPException) -> Response:
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    err = ApiError(exc.status_code, message.get(exc.status_code, str(exc.detail)), headers=dict(exc.headers or {}))
    return error_response(err)


async def server_error(request: Request, exc: Exception) -> Response:
    return error_response(ApiError(500, "internal error (logged by the server)", type="server_error"))


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    s = app.state
    s.engine = Engine(s.model, s.tokenizer, max_batch=s.max_batch, max_queue=s.max_queue, keep=s.window_keep,
                      prefill_batch=s.prefill_batch)
    try:
        yield
    finally:  # uvicorn has stopped taking requests and drained the open ones
        s.draining = True
        await asyncio.to_thread(s.engine.close)


STATIC = resources.files("gpt_small.serve") / "static"
ROUTES = [
    Route("/", page), Route("/healthz", healthz), Route("/metrics", metrics), Route("/openapi.json", openapi),
    Route("/v1/models", list_models), Route("/v1/models/{model:path}", get_model),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/poem", poem, methods=["POST"]), Mount("/static", StaticFiles(directory=str(STATIC)), name="static"),
]


def create_app(*, model: Any, tokenizer: Any, model_name: str, max_batch: int = DEFAULT_MAX_BATCH,
               max_queue: int = 64, max_new_tokens: int = 1000, max_prompt_tokens: int = 4096,
               api_key: str | None = None, allowed_hosts: list[str] | None = None, http: HttpLimits = HTTP_LIMITS,
               window_keep: int | str | None = None, prefill_batch: int = DEFAULT_PREFILL_BATCH) -> Starlette:
    """The app over a loaded model; the engine starts and drains with the app's lifespan.
    allowed_hosts: the Host header names accepted (None: any; `serve` passes the loopback names
    when it runs on loopback without a key); window_keep: the window rule past the context
    (generate.window_keep); prefill_batch: arrivals prefilled together in one forward pass."""
    app = Starlette(routes=ROUTES, lifespan=lifespan,
                    exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error})
    s = app.state
    s.model, s.tokenizer, s.model_name, s.api_key = model, tokenizer, model_name, api_key
    s.max_batch, s.max_queue, s.static, s.window_keep = max_batch, max_queue, STATIC, window_keep
    s.prefill_batch = prefill_batch
    s.limits = Limits(model_name=model_name, max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens,
                      http=http)
    s.created = int(time.time())
    # read off the model rather than taken from the caller, so what clients see is what decodes
    s.weights = weights_of(model)
    # the config's count, not model.num_params(): an int8 Linear keeps its weight as a buffer
    s.n_params = model.config.num_params()
    s.metrics, s.draining = Metrics(), False
    app.add_middleware(Guard, allowed_hosts=allowed_hosts, http=http)
    app.add_middleware(LogRequests, metrics=s.metrics)
    return app


class StanzaBreaks:
    """Puts a blank line after every `lines` verse lines, between stanzas, as text streams by."""

    def __init__(self, lines: int, stanzas: int):
        self.lines, self.stanzas, self.seen = lines, stanzas, 0

    def feed(self, piece: str) -> str:
        out = []
        for c in piece:
            out.append(c)
            if c == "\n":
                self.seen += 1
                if self.seen % self.lines == 0 and self.seen < self.lines * self.stanzas:
                    out.append("\n")
        return "".join(out)

    def layout(self, text: str) -> str:
        return StanzaBreaks(self.lines, self.stanzas).feed(text)
