"""Verse forms in the server: `/v1/poem` with `form`, `rhyme` or `syllables` writes with forms.py's
search (the engine of `generate --rhyme`), whose candidate lines run as rows of the serve engine's
batch.

A form poem is sequential (each line is chosen knowing the ones before it), so `compose` runs on a
thread of its own per request; each of its model calls (sample N candidate lines, rank the first
token of dictionary endings, score endings teacher-forced) becomes a group of `Sequence`s sharing
one prompt, submitted to the engine and decoded beside every other request's rows. Nothing holds
the model for a whole line: a plain stream running beside a form request waits, between two of its
tokens, at most one decode step plus the admission of new rows.

Request fields (decoded by `decode_form`): `form` names a preset (FORMS); `rhyme` is any scheme
("ABAB", "AABB CCDD", a named scheme of verse.NAMED_SCHEMES); `syllables` the target per line
(+-1); `lines` is lines per stanza and `stanzas` the number of stanzas, as for free verse, except
that a scheme of several stanzas (the sonnet) fixes its own length. A bad field is one 400 naming it.

Seeds: the poem's seed seeds a generator that gives each candidate row a seed of its own, so a
seeded form request gives the same poem every time, whatever else the server is doing. It is not
the poem `generate --rhyme --seed` writes (that one samples every row from one generator).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from torch import Tensor

from .. import limits as bounds
from .. import verse
from ..errors import GPTSmallError
from ..forms import Form, compose
from . import responses as R
from .engine import Engine, QueueFull, Sequence, ShuttingDown
from .protocol import STREAM_ERROR, ApiError, Sampling, busy, going_away

log = logging.getLogger("gpt_small.serve")

# preset name -> (rhyme scheme, default syllables per line); None: free verse
FORMS: dict[str, tuple[str | None, int | None]] = {
    "free": (None, None),
    "couplets": ("AA", None),
    "quatrains": ("ABAB", None),
    "sonnet": ("ABAB CDCD EFEF GG", 10),
    "limerick": ("AABBA", None),
}
MAX_FORM_LINES = 64  # per poem: every line costs at least one round of candidates


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param)


def decode_form(d: dict[str, Any], lines: int | None, stanzas: int | None) -> tuple[Form, str | None] | None:
    """The Form a /v1/poem body asks for (and its preset name), or None for free verse.
    `lines` (per stanza) and `stanzas` are the body's, None where it left them out."""
    name, rhyme, syllables = d.get("form"), d.get("rhyme"), d.get("syllables")
    if name is not None and (not isinstance(name, str) or name.lower() not in FORMS):
        raise _bad("form", f"expected one of {', '.join(FORMS)}; any other scheme goes in rhyme")
    if name is not None and rhyme is not None:
        raise _bad("rhyme", "give either form (a preset) or rhyme (a scheme), not both")
    if syllables is not None:
        if isinstance(syllables, float) and syllables.is_integer():
            syllables = int(syllables)
        top = bounds.MAX_SYLLABLES
        if not isinstance(syllables, int) or isinstance(syllables, bool) or not 1 <= syllables <= top:
            raise _bad("syllables", f"expected an integer 1..{top} (syllables per line), got {syllables!r}")
    if name is not None:
        rhyme, preset_syllables = FORMS[name.lower()]
        syllables = syllables if syllables is not None else preset_syllables
    if rhyme is None and syllables is None:
        return None
    k = stanzas or 1
    if rhyme is not None:
        if not isinstance(rhyme, str):
            raise _bad("rhyme", "expected a scheme such as \"ABAB\" or \"ABAB CDCD EFEF GG\"")
        try:
            scheme = verse.parse_scheme(rhyme)
        except GPTSmallError as e:
            raise _bad("rhyme", str(e)) from None
        if len(scheme) > 1:  # the scheme has its own stanzas and length
            if lines is not None:
                raise _bad("lines", f"the scheme {' '.join(scheme)!r} has its own length "
                                    f"({sum(map(len, scheme))} lines); leave lines out")
            form = Form(rhyme=rhyme, stanzas=stanzas, syllables=syllables)
        else:
            form = Form(rhyme=rhyme, lines=(lines or len(scheme[0])) * k, stanzas=k, syllables=syllables)
    else:
        form = Form(lines=(lines or 12) * k, stanzas=k, syllables=syllables)
    if form.lines is not None and form.lines > MAX_FORM_LINES:
        raise _bad("lines", f"a poem in a form has at most {MAX_FORM_LINES} lines; this one has {form.lines}")
    try:
        form.plan()
    except GPTSmallError as e:
        # a scheme that fits by itself fails to plan only when repeated or split: by the lines per
        # stanza the body gave, or else by its stanzas
        raise _bad("lines" if lines is not None else "stanzas", str(e).replace("--", "")) from None
    return form, (name.lower() if name is not None else None)


class Cancelled(Exception):
    """The client went away, or the server is shutting down."""


class EngineCalls:
    """form_calls.ModelCalls' three methods, run as rows of the serve engine (see the module docstring)."""

    def __init__(self, engine: Engine, tokenizer: Any, sampling: dict, seed: int | None, stop: threading.Event):
        self.engine, self.tokenizer, self.sampling, self.stop = engine, tokenizer, sampling, stop
        self.seeds = random.Random(seed)  # unseeded: fresh randomness from the OS

    def _sampling(self) -> Sampling:
        return Sampling(temperature=self.sampling["temperature"], top_k=self.sampling["top_k"],
                        top_p=self.sampling["top_p"], seed=self.seeds.getrandbits(63))

    def _run(self, seqs: list[Sequence]) -> list[Sequence]:
        """Submit seqs (in slices the engine has room for) and wait until all are done."""
        left, done = [len(seqs)], threading.Event()
        lock = threading.Lock()

        def on_event(kind: str, value: Any) -> None:
            if kind == "done":
                with lock:
                    left[0] -= 1
                    if not left[0]:
                        done.set()
        for s in seqs:
            s.on_event = on_event
        try:
            i = 0
            while i < len(seqs):  # as many as the engine has room for now, at least one at a time
                if self.stop.is_set():
                    raise Cancelled
                n = max(1, min(len(seqs) - i, self.engine.room()))
                try:
                    self.engine.submit(seqs[i:i + n])
                    i += n
                except ShuttingDown:
                    raise Cancelled from None
                except QueueFull:  # taken by others since: wait for room
                    time.sleep(0.02)
            while not done.wait(0.05):
                if self.stop.is_set():
                    raise Cancelled
        except Cancelled:
            self.engine.cancel(seqs)
            raise
        if any(s.finish_reason in ("error", "cancelled") for s in seqs):
            raise Cancelled if self.stop.is_set() else RuntimeError("the decode loop failed (logged)")
        return seqs

    def sample_lines(self, prefix: Tensor, rows: int, max_tokens: int) -> list[tuple[list[int], float, bool]]:
        ids = prefix.tolist()
        seqs = self._run([Sequence(ids, self._sampling(), max_new_tokens=max_tokens, tokenizer=self.tokenizer,
                                   lines=1, score=True) for _ in range(rows)])
        return [(s.new_ids, sum(s.scores), s.finish_reason == "stop") for s in seqs]

    def next_token_logprobs(self, prefix: Tensor) -> Tensor:
        (s,) = self._run([Sequence(prefix.tolist(), Sampling(), max_new_tokens=1, tokenizer=self.tokenizer,
                                   forced=[0], keep_first=True)])
        return s.first_logprobs

    def score_continuations(self, prefix: Tensor, conts: list[list[int]]) -> list[float]:
        ids = prefix.tolist()
        seqs = self._run([Sequence(ids, Sampling(), max_new_tokens=len(c), tokenizer=self.tokenizer, forced=c,
                                   score=True) for c in conts])
        return [sum(s.scores) for s in seqs]


def form_check(form: Form, name: str | None, meta: dict[str, Any], seconds: list[float]) -> dict[str, Any]:
    """The response's account of the form: which lines meet it and what the others break."""
    return {"name": name, "rhyme": meta["form"]["plan"][0] if form.rhyme else None, "syllables": form.syllables,
            "tolerance": form.tolerance, "all_met": meta["all_met"],
            "lines_met": sum(m["met"] for m in meta["lines"]), "lines_total": len(meta["lines"]),
            "candidates": meta["candidates"],
            "lines": [{k: m[k] for k in ("line", "stanza", "rhyme", "text", "end_word", "syllables", "met",
                                         "violations", "how", "candidates")} | {"seconds": t}
                      for m, t in zip(meta["lines"], seconds)]}


async def form_poem(request: Request, req: Any, engine: Engine, model: Any, tokenizer: Any,
                    model_name: str) -> Response:
    """/v1/poem for a request with a form (req.form set): plain JSON or server-sent events, one
    event per line as it is chosen, then {"done": true, ...} with the form check."""
    if engine.room() < 1:  # not one more row could wait: refused, as a plain request would be
        raise busy("its queue is full")
    loop, queue, stop = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
    started = time.perf_counter()
    plan_sizes = [len(s) for s in req.form.plan()]
    s = req.sampling
    if s.repetition_penalty != 1.0:
        raise _bad("repetition_penalty", "does not apply to a poem in a form")

    def post(kind: str, value: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

    line_seconds: list[float] = []  # wall time of each line's search, as the server saw it

    def on_line(m: dict[str, Any]) -> None:
        line_seconds.append(round(time.perf_counter() - started - sum(line_seconds), 3))
        post("line", m)

    def work() -> None:
        try:
            calls = lambda newline, sampling, banned: EngineCalls(engine, tokenizer, sampling, s.seed, stop)  # noqa: E731
            # (no seed for compose: it seeds only its own model calls; EngineCalls seeds each row)
            poem = compose(model, tokenizer, req.form, prompt=req.prompt, temperature=s.temperature,
                           top_k=s.top_k, top_p=s.top_p, calls=calls, on_line=on_line)
            post("done", poem)
        except Cancelled:
            post("cancelled", None)
        except Exception as e:  # noqa: BLE001 - a bug: logged by the app's handler via the re-raise below
            post("error", e)

    threading.Thread(target=work, name="gpt-small-form", daemon=True).start()
    head = req.prompt.rpartition("\n")[2]  # the prompt's unfinished line, which the first line finishes
    pid, first_at = R.new_id("poem"), [None]

    def piece(m: dict[str, Any]) -> str:
        text = m["text"][len(head):] if m["line"] == 1 else m["text"]
        k, ends = m["line"], 0
        for size in plan_sizes[:-1]:
            ends += size
            if k == ends:
                return text + "\n\n"
        return text + "\n"

    def result(poem: Any) -> dict[str, Any]:
        text = poem.text[len(req.prompt):]
        tokens = len(tokenizer.encode(text, unknown="unk"))
        request.state.tokens = tokens
        out = R.poem(pid, model_name, req.prompt, text, "stop", len(req.prompt_ids), tokens,
                     R.timing(started, first_at[0], tokens))
        return {**out, "seed": s.seed, "form": form_check(req.form, req.form_name, poem.meta, line_seconds)}

    async def left() -> None:
        """The body has been read, so the next ASGI message is the client's disconnect. (A stream
        has its own watcher in Starlette, which cancels the stream when the client leaves.)"""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        queue.put_nowait(("left", None))

    async def items() -> AsyncIterator[tuple[str, Any]]:
        ended = False  # the poem's own end; any other way out is a client that left
        watcher = None if req.stream else asyncio.create_task(left())
        try:
            while True:
                kind, value = await queue.get()
                if kind == "left":
                    return
                if kind == "line" and first_at[0] is None:
                    first_at[0] = time.perf_counter()
                ended = kind in ("done", "cancelled", "error")
                if kind == "error":
                    raise value
                yield kind, value
                if ended:
                    return
        finally:  # also when a stream's client leaves: its task is cancelled at the await above
            stop.set()
            if watcher is not None:
                watcher.cancel()
            if not ended:
                request.state.cancelled = True

    if req.stream:
        async def stream() -> AsyncIterator[bytes]:
            try:
                async for kind, value in items():
                    if kind == "line":
                        yield R.sse({"text": piece(value)})
                    elif kind == "done":
                        yield R.sse({"done": True, **result(value)})
            except Exception:  # noqa: BLE001 - the status is sent: an error event, as a plain poem's
                log.exception("a poem in a form failed")
                yield R.sse(STREAM_ERROR)
            yield R.sse("[DONE]")
        return StreamingResponse(stream(), media_type="text/event-stream", headers=R.SSE_HEADERS)
    async for kind, value in items():
        if kind == "done":
            return JSONResponse(result(value))
    if getattr(request.state, "cancelled", False):  # the client left: nobody reads this
        return Response(status_code=499)
    raise going_away("the server is shutting down")

