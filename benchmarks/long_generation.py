"""Long generation past the context window: does decoding keep its speed after block_size?

Not a test. On a trained checkpoint (default runs/poem-cpu, context 256), in one process:
- generate, batch 1: tokens/s of `--long` new tokens against tokens/s of the first `--short`,
  for fp32, bf16 and int8 weights (the window rule's default, keep half); and the exact per-token
  slide (`keep="slide"`, the rule of older versions) for comparison at `--slide-tokens`.
- the serve engine (in process, no HTTP): 8 streams of `--serve-long` tokens against 8 streams of
  `--serve-short`, aggregate tokens/s over the wall time of the whole batch.
- with --max-batch-sweep 8,16,32: the serve engine's aggregate tokens/s for --sweep-streams streams
  of --serve-short tokens at each max_batch (runs alternate between the values), as a ratio to
  the first; the figure `serve --max-batch`'s default was chosen from.
Each figure is the median of --reps runs after one warm-up; the two sides of a ratio alternate
(short, long, short, ...) so a change in machine load hits both. Sampling at temperature 0.8
with a fixed seed, so the long runs really pass the window (no early stop: generate_tokens has
none). Compare ratios within one run; absolute tokens/s on a shared machine are noisy.

    python benchmarks/long_generation.py [--checkpoint runs/poem-cpu] [--reps 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time

import torch

from gpt_small.checkpoint import load_checkpoint
from gpt_small.generate import generate_tokens
from gpt_small.ops.quantize import convert_weights
from gpt_small.serve.engine import Engine, Sequence
from gpt_small.serve.protocol import Sampling


def generate_seconds(model, prompt: list[int], n: int, keep=None) -> float:
    t = time.perf_counter()
    for _ in generate_tokens(model, prompt, max_new_tokens=n, temperature=0.8, seed=0, keep=keep):
        pass
    return time.perf_counter() - t


def serve_seconds(model, tok, prompt: list[int], streams: int, n: int, max_batch: int | None = None) -> float:
    """Wall time for `streams` sequences of n tokens submitted together to one engine."""
    engine = Engine(model, tok, max_batch=max_batch or streams, max_queue=streams)
    try:
        done = threading.Semaphore(0)
        seqs = [Sequence(prompt, Sampling(temperature=0.8, seed=i), max_new_tokens=n, tokenizer=tok,
                         on_event=lambda kind, v: kind == "done" and done.release()) for i in range(streams)]
        t = time.perf_counter()
        engine.submit(seqs)
        for _ in seqs:
            done.acquire()
        seconds = time.perf_counter() - t
        assert all(len(s.new_ids) == n for s in seqs), "a stream ended early"
        return seconds
    finally:
        engine.close()


def median_pair(short, long, reps: int) -> tuple[float, float]:
    short(), long()  # warm-up
    a, b = [], []
    for _ in range(reps):
        a.append(short())
        b.append(long())
    return statistics.median(a), statistics.median(b)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="runs/poem-cpu")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--short", type=int, default=200)
    p.add_argument("--long", type=int, default=2000)
    p.add_argument("--slide-tokens", type=int, default=500)
    p.add_argument("--serve-short", type=int, default=200)
    p.add_argument("--serve-long", type=int, default=600)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-batch-sweep", help="comma-separated max_batch values (e.g. 8,16,32)")
    p.add_argument("--sweep-streams", type=int, default=32)
    p.add_argument("--only-sweep", action="store_true", help="skip the long-generation figures")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.checkpoint}; median of {args.reps}")
    ckpt = load_checkpoint(args.checkpoint, device="cpu")
    W = ckpt.model_config.block_size
    prompt = ckpt.tokenizer.encode("\n")
    if args.max_batch_sweep:
        sweep(ckpt, prompt, [int(b) for b in args.max_batch_sweep.split(",")], args)
    if args.only_sweep:
        return
    print(f"context {W}; generate batch 1, temperature 0.8, seed 0")
    print(f"{'weights':8} {'rule':6} {'first ' + str(args.short):>12} {str(args.long) + ' tokens':>12} {'ratio':>6}")
    for weights in ("float32", "bfloat16", "int8"):
        ckpt = load_checkpoint(args.checkpoint, device="cpu")
        model = convert_weights(ckpt.model, weights).eval()
        s, l = median_pair(lambda: generate_seconds(model, prompt, args.short),
                           lambda: generate_seconds(model, prompt, args.long), args.reps)
        short_tps, long_tps = args.short / s, args.long / l
        print(f"{weights:8} {'half':6} {short_tps:10,.0f}/s {long_tps:10,.0f}/s {long_tps / short_tps:6.2f}x", flush=True)
        if weights == "float32":
            s, l = median_pair(lambda: generate_seconds(model, prompt, args.short, keep="slide"),
                               lambda: generate_seconds(model, prompt, args.slide_tokens, keep="slide"), 1)
            short_tps, long_tps = args.short / s, args.slide_tokens / l
            print(f"{weights:8} {'slide':6} {short_tps:10,.0f}/s {long_tps:10,.0f}/s {long_tps / short_tps:6.2f}x"
                  f"  ({args.slide_tokens} tokens, one run)", flush=True)
    ckpt = load_checkpoint(args.checkpoint, device="cpu")
    model, tok = ckpt.model.eval(), ckpt.tokenizer
    s, l = median_pair(lambda: serve_seconds(model, tok, prompt, args.streams, args.serve_short),
                       lambda: serve_seconds(model, tok, prompt, args.streams, args.serve_long), args.reps)
    short_tps, long_tps = args.streams * args.serve_short / s, args.streams * args.serve_long / l
    print(f"serve engine, {args.streams} streams, fp32: {args.serve_short} tokens each {short_tps:,.0f}/s, "
          f"{args.serve_long} each {long_tps:,.0f}/s aggregate: {long_tps / short_tps:.2f}x")


def sweep(ckpt, prompt: list[int], batches: list[int], args) -> None:
    model, tok, n = ckpt.model.eval(), ckpt.tokenizer, args.serve_short
    serve_seconds(model, tok, prompt, 4, 20)  # warm-up
    times: dict[int, list[float]] = {b: [] for b in batches}
    for _ in range(args.reps):
        for b in batches:
            times[b].append(serve_seconds(model, tok, prompt, args.sweep_streams, n, max_batch=b))
    base = args.sweep_streams * n / statistics.median(times[batches[0]])
    print(f"serve engine, {args.sweep_streams} streams of {n} tokens, fp32, aggregate tokens/s by max_batch:")
    for b in batches:
        tps = args.sweep_streams * n / statistics.median(times[b])
        print(f"  max_batch {b:3}: {tps:7,.0f}/s  {tps / base:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
