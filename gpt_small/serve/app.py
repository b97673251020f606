"""The ASGI app (Starlette): routes, auth, request logging, and the bridge from the engine's worker
thread to the event loop. Request decoding lives in protocol.py, batching in engine.py, response
encoding in responses.py; this file only wires them.

Routes: `GET /` (the page), `GET /healthz`, `GET /v1/models`, `GET /v1/models/{id}`,
`POST /v1/completions` (OpenAI), `POST /v1/poem` (ours). With an API key, /v1/* wants
`Authorization: Bearer <key>`. Each request logs one line: method, path, status, tokens, ms.
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
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..ops.quantize import weights_of
from . import responses as R
from .engine import DEFAULT_MAX_BATCH, Engine, QueueFull, Sequence
from .protocol import ApiError, Limits, decode_completion, decode_poem, parse_json

log = logging.getLogger("gpt_small.serve")

MAX_BODY = 1 << 20  # bytes; a prompt at the token limit is far smaller
_POLL = 0.5  # seconds between checks for a client that left while no text was coming


class LogRequests:
    """ASGI middleware: one line per request once its response has ended (streams included)."""

    def __init__(self, app: Any):
        self.app = app

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
            tail = " (client left)" if state.get("cancelled") else ""
            log.info("%s %s %d tokens=%d ms=%.0f%s", scope["method"], scope["path"], status[0] or 500,
                     state.get("tokens", 0), 1000 * (time.perf_counter() - t0), tail)


def create_app(*, model: Any, tokenizer: Any, model_name: str, max_batch: int = DEFAULT_MAX_BATCH, max_queue: int = 64,
               max_new_tokens: int = 1000, max_prompt_tokens: int = 4096, api_key: str | None = None,
               window_keep: int | str | None = None) -> Starlette:
    """The app over a loaded model; the engine starts and drains with the app's lifespan."""
    limits = Limits(model_name=model_name, max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens)
    created = int(time.time())
    # read off the model rather than taken from the caller, so what clients see is what decodes
    weights = weights_of(model)
    # the config's count, not model.num_params(): an int8 Linear keeps its weight as a buffer
    n_params = (model.config.num_params() if hasattr(model, "num_params")
                else sum(p.numel() for p in model.parameters()))
    box: dict[str, Engine] = {}
    static = resources.files("gpt_small.serve") / "static"

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        box["engine"] = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, keep=window_keep)
        app.state.engine = box["engine"]
        try:
            yield
        finally:  # uvicorn has stopped taking requests and drained the open ones
            await asyncio.to_thread(box["engine"].close)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), api_key.encode())):
            raise ApiError(401, "missing or wrong API key: send the header Authorization: Bearer <key>",
                           code="invalid_api_key")

    async def body_json(request: Request) -> dict[str, Any]:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes")
        return parse_json(body)

    def start(request: Request, seqs: list[Sequence]) -> asyncio.Queue:
        """Hand seqs to the engine; their events arrive on the returned queue as (index, kind, value)."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        for i, s in enumerate(seqs):
            def bridge(kind: str, value: Any, i: int = i) -> None:
                with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
                    loop.call_soon_threadsafe(queue.put_nowait, (i, kind, value))
            s.on_event = bridge
        try:
            box["engine"].submit(seqs)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry shortly", type="requests",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
        return queue

    async def events(request: Request, seqs: list[Sequence], queue: asyncio.Queue,
                     watch: bool = False) -> AsyncIterator[tuple]:
        """Yield (index, kind, value) until every sequence is done; a client that leaves (or a
        stream closed early) cancels what is left, which frees the rows at the next step. With
        `watch` (a response sent only at the end), the client's disconnect cancels at once."""
        left = len(seqs)
        watcher = asyncio.create_task(cancel_on_disconnect(request, seqs)) if watch else None
        try:
            while left:
                try:  # wait_for costs a task per call: only when nothing is ready
                    item = queue.get_nowait() if not queue.empty() else await asyncio.wait_for(queue.get(), _POLL)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if item[1] == "done":
                    left -= 1
                request.state.tokens = sum(len(s.new_ids) for s in seqs)
                yield item
        finally:
            if watcher is not None:
                watcher.cancel()
            if left:
                request.state.cancelled = True
                box["engine"].cancel(seqs)

    async def cancel_on_disconnect(request: Request, seqs: list[Sequence]) -> None:
        """The body has been read, so the next ASGI message is the client's disconnect."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        request.state.cancelled = True
        box["engine"].cancel(seqs)

    def stream_error() -> bytes:
        """The event that ends a stream whose sample failed (OpenAI's error shape), before [DONE]."""
        return R.sse(ApiError(500, "the sample failed on the server (logged); the text so far is incomplete",
                              type="server_error").body())

    # --- routes ---

    async def page(request: Request) -> Response:
        return FileResponse(str(static / "index.html"), media_type="text/html; charset=utf-8")

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model_name, "params": n_params, "weights": weights,
                             **box["engine"].stats()})

    async def list_models(request: Request) -> Response:
        authorize(request)
        return JSONResponse(R.models(model_name, created, weights))

    async def get_model(request: Request) -> Response:
        authorize(request)
        if request.path_params["model"] != model_name:
            raise ApiError(404, f"the model {request.path_params['model']!r} does not exist", param="model",
                           code="model_not_found")
        return JSONResponse(R.model_card(model_name, created, weights))

    async def completions(request: Request) -> Response:
        authorize(request)
        req = decode_completion(await body_json(request), tokenizer, limits)
        seqs = []
        for ids in req.prompt_ids:
            for j in range(req.n):  # sample j of a seeded request draws from seed + j
                s = req.sampling if req.sampling.seed is None else dataclasses.replace(
                    req.sampling, seed=req.sampling.seed + j)
                seqs.append(Sequence(ids, s, max_new_tokens=req.max_tokens, tokenizer=tokenizer, stop=req.stop))
        queue = start(request, seqs)
        prompt_tokens = sum(len(ids) for ids in req.prompt_ids)
        cid, now = R.new_id("cmpl"), int(time.time())
        echo = [req.prompts[i // req.n] if req.echo else "" for i in range(len(seqs))]
        if req.stream:
            async def stream() -> AsyncIterator[bytes]:
                sent = [False] * len(seqs)
                async for i, kind, value in events(request, seqs, queue):
                    if kind == "text":
                        yield R.sse(R.completion_chunk(cid, now, model_name, i, (echo[i] if not sent[i] else "") + value))
                        sent[i] = True
                    elif value in ("stop", "length"):
                        yield R.sse(R.completion_chunk(cid, now, model_name, i, "" if sent[i] else echo[i], value))
                    elif value == "error":
                        yield stream_error()
                if req.include_usage:
                    yield R.sse(R.usage_chunk(cid, now, model_name,
                                              R.usage(prompt_tokens, sum(len(s.new_ids) for s in seqs))))
                yield R.sse("[DONE]")
            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        async for _ in events(request, seqs, queue, watch=True):
            pass
        if any(s.finish_reason == "error" for s in seqs):
            raise RuntimeError("the decode loop failed (logged)")
        return JSONResponse(R.completion(cid, now, model_name, [(echo[i] + s.text, s.finish_reason)
                                                                  for i, s in enumerate(seqs)],
                                         R.usage(prompt_tokens, sum(len(s.new_ids) for s in seqs))))

    async def poem(request: Request) -> Response:
        authorize(request)
        req = decode_poem(await body_json(request), tokenizer, limits)
        seq = Sequence(req.prompt_ids, req.sampling, max_new_tokens=req.max_tokens, tokenizer=tokenizer,
                       lines=req.lines * req.stanzas)
        queue = start(request, [seq])
        pid = R.new_id("poem")
        breaks = StanzaBreaks(req.lines, req.stanzas)

        def result() -> dict[str, Any]:
            return R.poem(pid, model_name, req.prompt, breaks.layout(seq.text), seq.finish_reason,
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
                        yield stream_error()
                yield R.sse("[DONE]")
            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        async for _ in events(request, [seq], queue, watch=True):
            pass
        if seq.finish_reason == "error":
            raise RuntimeError("the decode loop failed (logged)")
        return JSONResponse(result())

    # --- errors: OpenAI's shape for every status ---

    async def api_error(request: Request, exc: ApiError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        err = ApiError(exc.status_code, message.get(exc.status_code, str(exc.detail)))
        return JSONResponse(err.body(), status_code=exc.status_code, headers=dict(exc.headers or {}))

    async def server_error(request: Request, exc: Exception) -> Response:
        err = ApiError(500, "internal error (logged by the server)", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    routes = [
        Route("/", page), Route("/healthz", healthz), Route("/v1/models", list_models),
        Route("/v1/models/{model:path}", get_model), Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/poem", poem, methods=["POST"]), Mount("/static", StaticFiles(directory=str(static)), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error})
    app.add_middleware(LogRequests)
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
