"""Many clients arriving at once: the serve engine's batched prefill against one prompt at a time.

Not a test. On a trained checkpoint (default runs/poem-cpu), the engine in process (no HTTP):
N clients submit at the same moment, each with a different prompt of 10-60 tokens (slices of a
sonnet) and 200 new tokens (temperature 0.8, its own seed). For each N (--clients, default 8 and
32) two engines run the same requests: `--prefill-batch` sequences per prefill forward (the
default) and 1 (each prompt prefilled alone, the engine's behaviour before batched prefills).
Printed: the median time to first token over the clients (submit to first sampled token), and the
aggregate tokens/s over the wall time until the last client is done; each the median of --reps
runs, the two settings alternating (batched, alone, batched, ...) so a change in machine load hits
both; then their ratios. The seeded tokens are the same both ways (asserted): only time differs.

    python benchmarks/prefill_arrivals.py [--checkpoint runs/poem-cpu] [--clients 8,32] [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import threading
import time

import torch

from gpt_small.checkpoint import load_checkpoint
from gpt_small.serve.engine import DEFAULT_MAX_BATCH, DEFAULT_PREFILL_BATCH, Engine, Sequence
from gpt_small.serve.protocol import Sampling

SONNET = ("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"
          "Rough winds do shake the darling buds of May,\nAnd summer's lease hath all too short a date;\n"
          "Sometime too hot the eye of heaven shines,\nAnd often is his gold complexion dimm'd;\n"
          "And every fair from fair sometime declines,\nBy chance or nature's changing course untrimm'd;\n")


def prompts(tok, n: int, seed: int = 0) -> list[list[int]]:
    """n different prompts of 10-60 tokens: slices of the sonnet."""
    ids = tok.encode(SONNET)
    rnd = random.Random(seed)
    out: list[list[int]] = []
    while len(out) < n:
        length = rnd.randint(10, 60)
        start = rnd.randrange(0, len(ids) - length)
        if ids[start:start + length] not in out:
            out.append(ids[start:start + length])
    return out


def run(model, tok, ps: list[list[int]], tokens: int, prefill_batch: int) -> tuple[float, float, list[list[int]]]:
    """(median time to first token in s, aggregate tokens/s, the tokens) for all prompts at once."""
    engine = Engine(model, tok, max_batch=max(DEFAULT_MAX_BATCH, len(ps)), max_queue=len(ps),
                    prefill_batch=prefill_batch)
    try:
        done = threading.Semaphore(0)
        seqs = [Sequence(p, Sampling(temperature=0.8, seed=i), max_new_tokens=tokens, tokenizer=tok,
                         on_event=lambda kind, v: kind == "done" and done.release()) for i, p in enumerate(ps)]
        t = time.perf_counter()
        engine.submit(seqs)
        for _ in seqs:
            done.acquire()
        wall = time.perf_counter() - t
        assert all(len(s.new_ids) == tokens for s in seqs), "a stream ended early"
        ttft = statistics.median(s.first_token_at - s.submitted for s in seqs)
        return ttft, len(ps) * tokens / wall, [s.new_ids for s in seqs]
    finally:
        engine.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="runs/poem-cpu")
    p.add_argument("--clients", default="8,32")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--prefill-batch", type=int, default=DEFAULT_PREFILL_BATCH)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; {args.checkpoint}; {args.tokens} tokens per client; median of {args.reps}")
    ckpt = load_checkpoint(args.checkpoint, device="cpu")
    model, tok = ckpt.model.eval(), ckpt.tokenizer
    run(model, tok, prompts(tok, 4), 20, args.prefill_batch)  # warm-up
    pb = args.prefill_batch
    print(f"{'clients':>7} {'prefill':>10} {'first token':>12} {'tokens/s':>9}")
    for n in (int(c) for c in args.clients.split(",")):
        ps = prompts(tok, n)
        res: dict[int, list[tuple[float, float]]] = {pb: [], 1: []}
        tokens: dict[int, list[list[int]]] = {}
        for _ in range(args.reps):
            for b in (pb, 1):
                ttft, tps, tokens[b] = run(model, tok, ps, args.tokens, b)
                res[b].append((ttft, tps))
        assert tokens[pb] == tokens[1], "batched prefill changed a seeded sample"
        med = {b: (statistics.median(r[0] for r in res[b]), statistics.median(r[1] for r in res[b])) for b in res}
        for b, label in ((pb, f"{pb} rows"), (1, "alone")):
            print(f"{n:7} {label:>10} {med[b][0] * 1e3:10.0f}ms {med[b][1]:9,.0f}", flush=True)
        print(f"{n:7} {'ratio':>10} {med[1][0] / med[pb][0]:10.2f}x {med[pb][1] / med[1][1]:8.2f}x  "
              f"(time to first token: alone / batched; tokens/s: batched / alone)", flush=True)


if __name__ == "__main__":
    main()
