"""The batching engine: one decode loop on a worker thread, shared by every request (continuous
batching over the model's KV cache).

A `Sequence` is one sample: prompt ids, its sampling options, its own `torch.Generator`, and the
rule that ends its text. `Engine.submit` queues sequences (bounded: `QueueFull` beyond
`max_queue`). Each round of the worker, between two decode steps: sample every live row with its
own options and generator; decode one token for every row that has room in one batched forward
(each row at its own position); then prefill, together, every row that needs it: the arrivals
taken into free rows (each prompt once: the `n` samples of a request copy its row) and the rows
whose cache is full (the window rule), in batched forwards of up to `prefill_batch` sequences
padded to the longest (`Engine._prefill`). Rows that finished or whose client went away
(`Sequence.cancel`, honoured at the next round) are freed. The event loop never runs a model step:
it hears of new text through `on_event`, called from the worker thread (the app wraps it in
`loop.call_soon_threadsafe`).

Contract: a seeded sequence yields the tokens of `generate_tokens(model, prompt, seed=...)` for
one sample, whether it runs alone or beside others, whenever it arrives. The steps are
generate.py's (`prefill`, `sample`, `apply_repetition_penalty`, the same window rule past
block_size with the same `keep`), and every forward computes each row bit for bit as it would
alone: a batched prefill runs in the ops layer's row-invariant mode with each row's attention
over its own tokens (generate.prefill, kv_cache.Placement, ops/mode.py; tests/test_prefill.py), and
a decoding step treats each row alike at any batch size (tests/test_decoder.py). A failure ends
only the sequences it touched (a row's sampling: that row; a batched prefill or decode step: its
rows), with "error".

Rows stay packed: the rows that decode hold cache rows 0..B-1, so the batched step runs on rows :B;
after them come the rows to prefill, contiguous, so a batched prefill writes a block of rows. A
finished row is refilled by moving later live rows up (their cached prefix only).
"""

from __future__ import annotations

import logging
import secrets
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence as Seq
from typing import Any

import torch
from torch import Tensor, nn

from .. import limits, ops
from ..generate import apply_repetition_penalty, prefill, sample, window_keep
from ..kv_cache import rows_of
from .protocol import Sampling

log = logging.getLogger("gpt_small.serve")

_REPLACEMENT = "\ufffd"  # a character still incomplete (byte-level BPE split a UTF-8 character)


DEFAULT_MAX_BATCH = limits.DEFAULT_SERVE_BATCH
DEFAULT_PREFILL_BATCH = limits.DEFAULT_PREFILL_BATCH


class QueueFull(Exception):
    """More sequences waiting than the engine's bound."""


class ShuttingDown(QueueFull):
    """The engine is closing: it takes no new sequences."""


class Sequence:
    """One sample being written. The worker thread fills it; `on_event(kind, value)` tells the
    caller: ("text", new text) as it grows, then ("done", finish reason) once: "stop" (a stop
    string or the last line), "length" (max_new_tokens), "cancelled" or "error"."""

    def __init__(self, prompt_ids: Seq[int], sampling: Sampling, *, max_new_tokens: int, tokenizer: Any,
                 stop: Seq[str] = (), keep_stop: bool = False, lines: int | None = None,
                 logprobs: int | None = None, on_event: Callable[[str, Any], None] = lambda kind, value: None,
                 forced: Seq[int] | None = None, score: bool = False, keep_first: bool = False):
        self.prompt_ids = list(prompt_ids)
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        self.tokenizer = tokenizer
        self.stop, self.keep_stop, self.lines = list(stop), keep_stop, lines
        self.on_event = on_event
        self.new_ids: list[int] = []
        # logprobs=N: for each new token, (its log-probability, the top N (id, log-probability)),
        # filled before the token's text is announced
        self.logprobs = logprobs
        self.token_logprobs: list[tuple[float, list[tuple[int, float]]]] = []
        self.text = ""  # the continuation so far, cut at the stop rule
        self._decoded = ""  # the text of new_ids up to the last complete character: it never changes
        self._pending: list[int] = []  # ids after that (a byte-level character still incomplete)
        self._newlines = 0  # newlines in self._decoded
        self.emitted = 0  # characters of self.text already sent
        self.finish_reason: str | None = None
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)  # private either way:
        self.generator = torch.Generator().manual_seed(seed)  # threads never share torch's global RNG
        # Hooks for verse forms (serve/forms.py), which run their candidate lines as rows here:
        # `forced` tokens are taken instead of sampled (teacher forcing); with `score`, `scores`
        # gets each taken token's log-probability at temperature 1 (before bans and penalties);
        # with `keep_first`, `first_logprobs` keeps the whole first distribution (V,). Rows with
        # the same prompt admitted in one step share one prefill (Engine._admit).
        self.forced = list(forced) if forced is not None else None
        self.scores: list[float] | None = [] if score else None
        self.keep_first = keep_first
        self.first_logprobs: Tensor | None = None

    def cancel(self) -> None:
        """Free this sequence's row at the next step boundary (the client went away)."""
        self.cancelled = True

    def feed(self, token: int) -> bool:
        """Take one new token; send the text that is now certain; return whether the sample ended.

        Incremental: only the ids since the last complete character are decoded (together, so a
        character split over byte-level tokens joins), and only the new text is searched for
        newlines and stop strings (an earlier match would have ended the sample)."""
        self.new_ids.append(token)
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self._pending.append(token)
        tail = self.tokenizer.decode(self._pending)
        old = len(self._decoded)  # text before this is settled and was searched
        text = self._decoded + tail
        end, hold, stopped = len(text), 0, False  # stopped: a line count or a stop string ended it
        if self.lines is not None:
            seen, k = self._newlines, old - 1
            while seen < self.lines and (k := text.find("\n", k + 1)) >= 0:
                seen += 1
            if seen >= self.lines:
                end, stopped = k + 1, True
        for s in self.stop:
            k = text.find(s, max(0, old - len(s)))  # a match ending right at `old` did not end the sample
            if k >= 0:
                end, stopped = min(end, k + len(s) if self.keep_stop else k), True
        if not tail.endswith(_REPLACEMENT):  # every character complete: settle the text
            if self.lines is not None:
                self._newlines += text.count("\n", old)
            self._decoded, self._pending = text, []
        self.text = text[:end]
        if stopped:  # (end < len(text) only when a rule cut the text)
            self.finish_reason = "stop"
        elif len(self.new_ids) >= self.max_new_tokens:
            self.finish_reason = "length"
        else:  # hold back what may still change: an incomplete character, the start of a stop string
            hold = 1 if text.endswith(_REPLACEMENT) else 0
            for s in self.stop:
                hold = max(hold, max((j for j in range(1, len(s)) if text.endswith(s[:j])), default=0))
        self._emit(len(self.text) - hold)
        return self.finish_reason is not None

    def _emit(self, upto: int) -> None:
        if upto > self.emitted:
            self.on_event("text", self.text[self.emitted:upto])
            self.emitted = upto

    def finish(self, reason: str) -> None:
        if self.finish_reason is None or reason in ("cancelled", "error"):
            self.finish_reason = reason
        if reason not in ("cancelled", "error"):
            self._emit(len(self.text))
        self.on_event("done", self.finish_reason)


class _Row:
    """A live sequence's decoding state: its tokens, their count, the logits of the next token."""

    def __init__(self, seq: Sequence, ids: Tensor, window: int):
        self.seq = seq
        self.T0 = ids.numel()
        self.total = self.T0 + seq.max_new_tokens
        self.ids = torch.empty(self.total, dtype=torch.long)
        self.ids[:self.T0] = ids
        self.T = self.T0  # tokens so far
        self.start = max(0, self.T0 - window)  # sequence index at cache position 0 (generate.Window)
        self.failed = False  # ended with an error; its cache row is freed at the next step
        self.twin: _Row | None = None  # an arrival of the same round with the same prompt, whose row it copies
        self.logits: Tensor | None = None  # (1, V)


class Engine:
    """One decode loop over `max_batch` cache rows; see the module docstring."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_batch: int = DEFAULT_MAX_BATCH, max_queue: int = 64,
                 keep: int | str | None = None, prefill_batch: int = DEFAULT_PREFILL_BATCH):
        if prefill_batch < 1:
            raise ValueError(f"prefill_batch must be >= 1, got {prefill_batch}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefill_batch = prefill_batch  # sequences in one batched prefill forward (1: one at a time)
        self.window = model.config.block_size
        self.keep = window_keep(self.window, keep)
        self.banned = [u] if (u := getattr(tokenizer, "unk_id", None)) is not None else []
        self.positions = torch.arange(self.window, device=next(model.parameters()).device)
        self._pending: deque[Sequence] = deque()
        self._rows: list[_Row] = []  # row i of the cache belongs to self._rows[i]
        self._cond = threading.Condition()
        self._stopping = False
        # prefills: forward passes that prefilled; prefill_rows: the sequences they held
        self.counts = dict(finished=0, cancelled=0, tokens=0, steps=0, peak_batch=0, prefills=0, prefill_rows=0)
        model.setup_kv_cache(max_batch, self.window)
        self._thread = threading.Thread(target=self._loop, name="gpt-small-decode", daemon=True)
        self._thread.start()

    # --- called from other threads ---

    def _room(self) -> int:
        """Sequences submit() takes now (under the lock): the free rows not already claimed by
        queued sequences, plus the queue's bound."""
        free = self.max_batch - len(self._rows)
        return self.max_queue + max(0, free - len(self._pending)) - len(self._pending)

    def room(self) -> int:
        with self._cond:
            return self._room()

    def submit(self, seqs: Seq[Sequence]) -> None:
        """Queue sequences (all or none); QueueFull when the bounded queue cannot take them."""
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(seqs) > self._room():
                raise QueueFull(f"{len(self._pending)} samples are waiting (the queue holds {self.max_queue})")
            self._pending.extend(seqs)
            self._cond.notify()

    def cancel(self, seqs: Seq[Sequence]) -> None:
        """End these sequences ("cancelled") and free their rows at the next step boundary, at
        most one decoding step from now (a client went away); queued ones never start."""
        for s in seqs:
            s.cancel()
        with self._cond:
            self._cond.notify()

    def stats(self) -> dict[str, int]:
        with self._cond:
            return dict(active=len(self._rows), queued=len(self._pending), max_batch=self.max_batch,
                        max_queue=self.max_queue, prefill_batch=self.prefill_batch, window_keep=self.keep,
                        **self.counts)

    def close(self, timeout: float | None = None) -> None:
        """Finish what is running and queued, then stop the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    # --- the worker thread ---

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._rows and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._pending and not self._rows:
                    return
                admit = []
                while self._pending and len(self._rows) + len(admit) < self.max_batch:
                    admit.append(self._pending.popleft())
            try:
                with torch.inference_mode():
                    self._round(admit)
            except Exception:  # a bug, not a bad request: fail what is live, keep serving
                log.exception("decode step failed; ending the live requests")
                for seq in {id(s): s for s in [*admit, *(row.seq for row in self._rows)]}.values():
                    if seq.finish_reason not in ("cancelled", "error"):
                        self._end(seq, "error")
                self._rows.clear()
                if self.model.kv_cache is None:  # someone cleared it: start over
                    self.model.setup_kv_cache(self.max_batch, self.window)

    def _end(self, seq: Sequence, reason: str) -> None:
        self.counts["cancelled" if reason == "cancelled" else "finished"] += 1
        seq.finish(reason)

    def _fail(self, row: _Row, what: str) -> None:
        """End one row's sequence with an error (its client gets an error event); the others go on.
        A row fails at most once (a failed row is skipped from then on), and a cancelled one leaves
        at the sampling step, before any forward: no row reaches here cancelled or failed."""
        # a copied row fails with no exception of its own (the prefill it copies failed): no traceback
        log.error("%s failed; ending that request", what, exc_info=sys.exc_info()[0] is not None)
        row.failed = True
        self._end(row.seq, "error")

    def _round(self, admit: list[Sequence]) -> None:
        """Between two decode steps: sample, pack, decode, then prefill what needs it, together."""
        B = self._step()
        # then the arrivals, and every row that needs a prefill (past the window, or new) prefilled
        # together, in batched forwards (_prefill)
        twins = self._admit(admit)
        self._prefill(B, len(self._rows) - len(twins))
        for row in twins:  # the same prompt as an earlier arrival of this round: its row, copied
            first = row.twin
            if first.failed:
                self._fail(row, "the prefill it copies")
                continue
            self.model.kv_cache.copy_row(self._rows.index(first), self._rows.index(row), row.T0 - row.start)
            row.logits = first.logits.clone()
        self.counts["peak_batch"] = max(self.counts["peak_batch"], len(self._rows))

    def _step(self) -> int:
        """Sample every row, pack the rows, decode those with room; return how many decoded (B):
        rows B.. are those whose cache is full, to re-prefill."""
        # 1. sample every row from its own logits, with its own options and generator
        keep: list[_Row] = []
        for row in self._rows:
            seq = row.seq
            if row.failed:
                continue
            if seq.cancelled:
                self._end(seq, "cancelled")
                continue
            try:
                ended = self._sample_row(row)
            except Exception:
                self._fail(row, "sampling a row")
                continue
            if ended:
                self._end(seq, "length")
            else:
                keep.append(row)
        # 2. pack the rows that decode into cache rows 0..B-1; after them the rows whose cache is
        # full (the window rule, generate.Window): they keep their last `self.keep` tokens and the
        # new one, re-prefilled at positions 0..keep by _round, so their cached prefix needs no move
        decoding = [row for row in keep if row.T - 1 - row.start < self.window]
        full = [row for row in keep if row.T - 1 - row.start >= self.window]
        for i, row in enumerate(decoding):
            j = self._rows.index(row)
            if j != i:  # j > i: rows only move up, so no row is overwritten before it moves
                self.model.kv_cache.copy_row(j, i, row.T - 1 - row.start)
        for row in full:
            row.start = row.T - 1 - self.keep
        self._rows = decoding + full
        # 3. one batched step at per-row positions over rows :B
        B = len(decoding)
        if B:
            cur = torch.tensor([[int(r.ids[r.T - 1])] for r in decoding])
            pos = torch.tensor([[r.T - 1 - r.start] for r in decoding])
            try:
                logits = self.model(cur, input_pos=pos, last_only=True)[:, -1]  # (B, V)
                for i, row in enumerate(decoding):
                    row.logits = logits[i:i + 1]
            except Exception:  # every row of the step is affected; the others are not
                for row in decoding:
                    self._fail(row, "a batched decode step")
            self.counts["steps"] += 1
        return B

    def _admit(self, seqs: list[Sequence]) -> list[_Row]:
        """Give each arrival a row after the live ones: those to prefill (shortest prompt first,
        so a batched prefill pads little), then those whose prompt an earlier arrival of this
        round has (the `n` samples of one request), which copy its row: one prefill for all.
        Returns those twins (the last rows)."""
        fresh: list[_Row] = []
        twins: list[_Row] = []
        first: dict[tuple[int, ...], _Row] = {}
        for seq in seqs:
            if seq.cancelled:
                self._end(seq, "cancelled")
                continue
            # a prompt longer than the window is cropped, as generate does
            row = _Row(seq, torch.tensor(seq.prompt_ids, dtype=torch.long), self.window)
            key = tuple(seq.prompt_ids)
            if key in first:
                row.twin = first[key]
                twins.append(row)
            else:
                first[key] = row
                fresh.append(row)
        fresh.sort(key=lambda r: r.T - r.start)
        self._rows += fresh + twins
        return twins

    def _prefill(self, lo: int, hi: int) -> None:
        """Prefill rows lo..hi-1, each its tokens ids[start:T] at positions 0.., in batched forwards
        of up to `prefill_batch` rows padded to the longest. generate.prefill's row-invariant mode
        gives each row the bits of its prefill alone; a sequence longer than the mode's length rule
        (ops.row_invariant_max_t) is prefilled alone, as generate does. A failed forward ends
        exactly its rows' sequences with an error."""
        limit = ops.row_invariant_max_t(self.positions.device)
        i = lo
        while i < hi:
            j = i + 1
            if limit is None or self._rows[i].T - self._rows[i].start <= limit:
                while (j < hi and j - i < self.prefill_batch
                       and (limit is None or self._rows[j].T - self._rows[j].start <= limit)):
                    j += 1
            rows = self._rows[i:j]
            try:
                lengths = [r.T - r.start for r in rows]
                T = max(lengths)
                idx = torch.zeros(len(rows), T, dtype=torch.long)  # padding: token 0, never cached
                for b, r in enumerate(rows):
                    idx[b, :lengths[b]] = r.ids[r.start:r.T]
                with rows_of(self.model, i, j):
                    logits = prefill(self.model, idx, self.positions[:T].expand(len(rows), T), torch.tensor(lengths))
                for b, r in enumerate(rows):
                    r.logits = logits[b:b + 1]
            except Exception:
                for r in rows:
                    self._fail(r, "a batched prefill")
            self.counts["prefills"] += 1
            self.counts["prefill_rows"] += len(rows)
            i = j

    def _sample_row(self, row: _Row) -> bool:
        """Sample a row's next token from its own logits, options and generator; feed it to its
        sequence; return whether the sequence ended."""
        seq, logits, s = row.seq, row.logits, row.seq.sampling
        # the model's own distribution, before the ban, penalty, temperature and truncation
        need = seq.logprobs is not None or seq.scores is not None or (seq.keep_first and seq.first_logprobs is None)
        lp = torch.log_softmax(logits[0].float(), dim=-1) if need else None
        if seq.keep_first and seq.first_logprobs is None:
            seq.first_logprobs = lp
        if seq.forced is not None:
            cur = seq.forced[len(seq.new_ids)]
        else:
            if self.banned:
                logits[:, self.banned] = float("-inf")
            if s.repetition_penalty != 1.0:
                logits = apply_repetition_penalty(logits, row.ids[None, :row.T], s.repetition_penalty)
            cur = int(sample(logits, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                             generator=seq.generator)[0])
        if seq.scores is not None:
            seq.scores.append(float(lp[cur]))
        if seq.logprobs is not None:
            top = torch.topk(lp, seq.logprobs) if seq.logprobs else None
            seq.token_logprobs.append((float(lp[cur]), [] if top is None else
                                       list(zip(top.indices.tolist(), top.values.tolist()))))
        row.ids[row.T] = cur
        row.T += 1
        self.counts["tokens"] += 1
        return seq.feed(cur) or row.T == row.total
