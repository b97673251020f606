"""The serve engine's batched prefill: arrivals between two decode steps (and rows that re-prefill
past the window) are prefilled together, in forwards of up to `prefill_batch` sequences; each
seeded sequence still gives generate_tokens' tokens for its seed; a failed batched prefill ends
exactly its sequences with an error while the others go on. Forward passes are counted by
wrapping the real model's forward (the model itself runs)."""

from __future__ import annotations

import threading

import pytest
import torch

from gpt_small.generate import generate_tokens
from gpt_small.ops import cpu, kernels
from gpt_small.serve.engine import DEFAULT_PREFILL_BATCH, Engine, Sequence
from gpt_small.serve.protocol import Sampling
from serve_util import make_model

PROMPTS = ["the ", "a", "Shall I compare thee", "x", "and all the men and women merely", "O"]


def _counting(model) -> list[tuple[int, int]]:
    """Record (rows, tokens) of every prefill forward of `model` (one that passes lengths)."""
    calls: list[tuple[int, int]] = []
    forward = model.forward

    def counted(idx, *args, **kw):
        if "lengths" in kw:
            calls.append(tuple(idx.shape))
        return forward(idx, *args, **kw)
    model.forward = counted
    return calls


def _seqs(tok, prompts, n: int, seed0: int = 0) -> list[Sequence]:
    return [Sequence(tok.encode(p), Sampling(temperature=1.0, seed=seed0 + i), max_new_tokens=n, tokenizer=tok)
            for i, p in enumerate(prompts)]


def _run(engine: Engine, seqs: list[Sequence], timeout: float = 30.0) -> None:
    done = threading.Semaphore(0)
    for s in seqs:
        inner = s.on_event
        s.on_event = lambda kind, v, inner=inner: (inner(kind, v), kind == "done" and done.release())
    engine.submit(seqs)  # all at once: the worker takes them in its next round
    for _ in seqs:
        assert done.acquire(timeout=timeout), "the engine did not finish in time"


def _alone(tok, prompt: str, seed: int, n: int) -> list[int]:
    reference, _ = make_model()  # the same weights; the engine's model keeps the engine's cache
    return [int(t) for t in generate_tokens(reference, tok.encode(prompt), max_new_tokens=n, temperature=1.0,
                                            seed=seed, banned_ids=[tok.unk_id])]


@pytest.mark.parametrize("prefill_batch, forwards", [(DEFAULT_PREFILL_BATCH, 1), (2, 3), (1, 5)])
def test_arrivals_at_once_are_prefilled_together_and_give_generates_tokens(prefill_batch, forwards):
    """Six sequences, five different prompts of 1 to 33 tokens (one prompt twice: its second
    sequence copies the first's row): one forward at the default, ceil(5 / prefill_batch) forwards
    of at most prefill_batch rows otherwise (1: the prompts one at a time)."""
    model, tok = make_model()
    calls = _counting(model)
    engine = Engine(model, tok, max_batch=8, prefill_batch=prefill_batch)
    prompts = PROMPTS[:5] + ["the "]
    seqs = _seqs(tok, prompts, 25)
    try:
        _run(engine, seqs)
        stats = engine.stats()
    finally:
        engine.close(10)
    assert len(calls) == forwards and all(rows <= prefill_batch for rows, _ in calls), calls
    assert stats["prefills"] == forwards and stats["prefill_rows"] == 5
    if forwards == 1:  # padded to the longest prompt
        assert calls == [(5, max(len(tok.encode(p)) for p in prompts[:5]))]
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        assert s.finish_reason == "length" and s.new_ids == _alone(tok, p, i, 25), f"sequence {i} ({p!r}) differs"


@pytest.mark.skipif(not kernels.available(), reason=kernels.describe())
def test_prompts_past_the_batchable_length_are_prefilled_alone(monkeypatch):
    """Past the ops layer's length rule a prompt goes through the library GEMM alone, as generate's
    prefill does: the short ones still share one forward, and every sequence keeps its tokens."""
    monkeypatch.setattr(cpu, "PREFILL_KERNEL_MAX_T", 8)
    model, tok = make_model()
    calls = _counting(model)
    engine = Engine(model, tok, max_batch=8)
    prompts = ["the ", "Shall I compare thee", "a", "and all the men", "O"]
    seqs = _seqs(tok, prompts, 20, seed0=40)
    try:
        _run(engine, seqs)
    finally:
        engine.close(10)
    lengths = sorted(len(tok.encode(p)) for p in prompts)
    assert sorted(calls) == sorted([(3, 4), (1, lengths[3]), (1, lengths[4])]), calls
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        assert s.new_ids == _alone(tok, p, 40 + i, 20), f"sequence {i} ({p!r}) differs"


@pytest.mark.skipif(not kernels.available(), reason=kernels.describe())
@pytest.mark.parametrize("rule, short, forwards", [(8, True, [(3, 8), (1, 9)]), (8, False, [(2, 8), (1, 9)]),
                                                   (None, True, [(4, 9)])])
def test_the_length_rule_at_its_edge(monkeypatch, rule, short, forwards):
    """A prompt of exactly the rule's length is batched (first in its forward or not), one token
    more is prefilled alone; with no rule (None: any length), all in one forward."""
    monkeypatch.setattr(cpu, "PREFILL_KERNEL_MAX_T", rule)
    model, tok = make_model()
    calls = _counting(model)
    engine = Engine(model, tok, max_batch=8)
    prompts = ["abcdefgh", "the moon", "ijklmnopq"] + (["Oh "] if short else [])  # 8, 8, 9 and 3 tokens
    seqs = _seqs(tok, prompts, 10, seed0=60)
    try:
        _run(engine, seqs)
    finally:
        engine.close(10)
    assert sorted(calls) == sorted(forwards), calls
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        assert s.new_ids == _alone(tok, p, 60 + i, 10), f"sequence {i} ({p!r}) differs"


def test_rows_past_the_window_re_prefill_together():
    """Four sequences that reach the 64-token window at the same step re-prefill their kept
    33 tokens in one forward of 4 rows, and still give generate's tokens."""
    model, tok = make_model()
    calls = _counting(model)
    engine = Engine(model, tok, max_batch=4)
    prompts = ["the ", "a b ", "O me", "and "]  # 4 tokens each
    seqs = _seqs(tok, prompts, 100, seed0=7)
    try:
        _run(engine, seqs)
    finally:
        engine.close(10)
    assert calls[0] == (4, 4) and (4, 33) in calls, calls
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        assert s.new_ids == _alone(tok, p, 7 + i, 100), f"sequence {i} differs"


def test_a_failed_batched_prefill_ends_exactly_its_sequences_and_a_running_stream_finishes(caplog):
    """The arrivals' prefill fails: they end with an error, the sample that shares a prompt with
    one of them (and would have copied its row) too, each logged by name; a running stream goes on."""
    model, tok = make_model()
    forward = model.forward
    failed = []

    def failing(idx, *args, **kw):  # the first prefill of more than one row raises
        if "lengths" in kw and idx.shape[0] > 1 and not failed:
            failed.append(idx.shape)
            raise RuntimeError("injected failure in a batched prefill")
        return forward(idx, *args, **kw)
    model.forward = failing
    engine = Engine(model, tok, max_batch=8)
    try:
        first = threading.Event()
        running = Sequence(tok.encode("the "), Sampling(temperature=1.0, seed=1), max_new_tokens=120, tokenizer=tok,
                           on_event=lambda kind, v: first.set())
        done = threading.Event()
        inner = running.on_event
        running.on_event = lambda kind, v: (inner(kind, v), kind == "done" and done.set())
        engine.submit([running])
        assert first.wait(30), "the running stream did not start"
        events: dict[int, list] = {i: [] for i in range(4)}
        arrivals = _seqs(tok, ["a", "Shall I", "O me", "Shall I"], 20)  # the last copies the second's row
        for i, s in enumerate(arrivals):
            s.on_event = lambda kind, v, i=i: events[i].append((kind, v))
        _run(engine, arrivals)
        assert failed and failed[0][0] == 3, failed
        for i, s in enumerate(arrivals):
            assert s.finish_reason == "error" and events[i] == [("done", "error")] and not s.new_ids
        logged = sorted((r.getMessage(), bool(r.exc_info)) for r in caplog.records if r.name == "gpt_small.serve")
        assert logged == ([("a batched prefill failed; ending that request", True)] * 3  # with the traceback
                          + [("the prefill it copies failed; ending that request", False)])  # none of its own
        assert done.wait(30)
        assert running.finish_reason == "length" and running.new_ids == _alone(tok, "the ", 1, 120)
        again = _seqs(tok, ["a", "O me"], 10)  # and the engine keeps serving, batched prefills too
        _run(engine, again)
        assert [s.new_ids for s in again] == [_alone(tok, "a", 0, 10), _alone(tok, "O me", 1, 10)]
    finally:
        engine.close(10)


def test_a_failed_prefill_ends_its_own_copies_only():
    """Two prompts of two samples each, prefilled one at a time: the prefill of the first fails;
    its two samples end with an error, those of the other prompt (one prefilled, one copied) run."""
    model, tok = make_model()
    forward = model.forward
    bad = tok.encode("Shall I")

    def failing(idx, *args, **kw):  # the prefill of "Shall I" raises
        if "lengths" in kw and idx.shape[1] == len(bad) and idx[0].tolist() == bad:
            raise RuntimeError("injected failure in a prefill")
        return forward(idx, *args, **kw)
    model.forward = failing
    engine = Engine(model, tok, max_batch=8, prefill_batch=1)
    try:
        seqs = _seqs(tok, ["Shall I", "O me", "Shall I", "O me"], 12)  # the copies are the last two
        _run(engine, seqs)
    finally:
        engine.close(10)
    assert [s.finish_reason for s in seqs] == ["error", "length", "error", "length"]
    assert seqs[1].new_ids == _alone(tok, "O me", 1, 12) and seqs[3].new_ids == _alone(tok, "O me", 3, 12)


def test_prefill_batch_is_checked_at_its_bounds():
    """--prefill-batch: 1 to MAX_SERVE_BATCH, refused by name in one line (exit 2) past either end,
    before the checkpoint is read; the engine refuses 0; the default is 8."""
    from gpt_small import limits
    from test_fuzz import MISSING, run

    assert DEFAULT_PREFILL_BATCH == limits.DEFAULT_PREFILL_BATCH == 8
    for value, refused in (("0", True), ("1", False), (str(limits.MAX_SERVE_BATCH), False),
                           (str(limits.MAX_SERVE_BATCH + 1), True)):
        code, out, err = run(["serve", "--checkpoint", MISSING, "--prefill-batch", value])
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert ("--prefill-batch" in err) == refused, (value, err)  # else: the missing checkpoint
    model, tok = make_model()
    with pytest.raises(ValueError, match="^prefill_batch must be >= 1, got 0$"):
        Engine(model, tok, prefill_batch=0)
