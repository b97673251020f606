"""Load on `gpt-small serve` against a hand-written baseline server, over loopback.

Not a test. For each model, two servers in subprocesses on free loopback ports:
- ours: `gpt-small serve` (continuous batching, --max-batch B), streamed requests;
- baseline: what a user would write by hand, a minimal FastAPI endpoint on uvicorn that calls our
  own `generate_text` once per request, one request at a time (a lock), answering when done.
At 1, 8 and 32 concurrent clients, `--requests` completions of `--tokens` tokens each (no stop,
so every request makes exactly that many) are sent; each level is bounded by `--level-seconds`
(requests not started by then are not sent, and the table says how many ran). Printed per level:
p50/p99 latency, p50 time to first token (the baseline's first token comes with its last), total
new tokens per second, errors, and each server's RSS before and after; then ours/baseline ratios.

    python benchmarks/serve_load.py [--checkpoint runs/poem-cpu] [--gpt2] [--requests 200]
        [--tokens 200] [--clients 1,8,32] [--max-batch 32] [--threads 0] [--level-seconds 600]

--gpt2 adds a randomly initialised gpt2-124m-shaped model (GPT-2's BPE tokenizer) saved to a
temporary folder. Figures on a shared machine are noisy: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BASELINE = '''
import sys, threading
from fastapi import FastAPI
from pydantic import BaseModel
import uvicorn
from gpt_small.checkpoint import load_checkpoint
from gpt_small.device import set_threads
from gpt_small.generate import generate_text

set_threads(int(sys.argv[3]))
ckpt = load_checkpoint(sys.argv[1])
app, lock = FastAPI(), threading.Lock()

class Req(BaseModel):
    prompt: str = ""
    max_tokens: int = 16
    temperature: float = 1.0
    seed: int | None = None

@app.post("/v1/completions")
def complete(req: Req):
    with lock:
        text = generate_text(ckpt.model, ckpt.tokenizer, req.prompt, max_new_tokens=req.max_tokens,
                             temperature=req.temperature, seed=req.seed)[0]
    return {"choices": [{"text": text[len(req.prompt):]}], "usage": {"completion_tokens": req.max_tokens}}

print("ready", flush=True)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
'''

PROMPTS = ["The sea", "O moon, ", "When I", "Night falls", "The old house", "Stars", "In spring", "My love"]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start(kind: str, checkpoint: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if kind == "ours":
        cmd = [sys.executable, "-m", "gpt_small", "serve", "--checkpoint", str(checkpoint), "--port", "0",
               "--max-batch", str(args.max_batch), "--max-queue", "256", "--threads", str(args.threads),
               "--max-new-tokens", str(max(args.tokens, 1000))]
    else:
        port = free_port()
        cmd = [sys.executable, "-c", BASELINE, str(checkpoint), str(port), str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    first = proc.stdout.readline()
    if kind == "ours":
        url = re.search(r"on (http://\S+?)/ ", first).group(1)
    else:
        assert first.strip() == "ready", first
        url = f"http://127.0.0.1:{port}"
    for _ in range(600):  # until it answers
        try:
            httpx.post(f"{url}/v1/completions", json={"model": checkpoint.name, "prompt": "a", "max_tokens": 2},
                       timeout=60)
            break
        except httpx.TransportError:
            time.sleep(0.1)
    return proc, url


async def one(client: httpx.AsyncClient, kind: str, url: str, model: str, i: int, tokens: int) -> dict:
    body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens, "temperature": 0.8,
            "seed": i}
    t0 = time.perf_counter()
    ttft, n = None, 0
    try:
        if kind == "ours":
            async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True,
                                     "stream_options": {"include_usage": True}}) as r:
                if r.status_code != 200:
                    return {"error": r.status_code}
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if ttft is None and chunk["choices"] and chunk["choices"][0]["text"]:
                        ttft = time.perf_counter() - t0
                    if chunk.get("usage"):
                        n = chunk["usage"]["completion_tokens"]
        else:
            r = await client.post(f"{url}/v1/completions", json=body)
            if r.status_code != 200:
                return {"error": r.status_code}
            n = r.json()["usage"]["completion_tokens"]
            ttft = time.perf_counter() - t0
    except httpx.HTTPError as e:
        return {"error": type(e).__name__}
    return {"latency": time.perf_counter() - t0, "ttft": ttft, "tokens": n}


async def level(kind: str, url: str, model: str, clients: int, args: argparse.Namespace) -> dict:
    results, next_i = [], iter(range(args.requests))
    deadline = time.perf_counter() + args.level_seconds
    async with httpx.AsyncClient(timeout=args.level_seconds + 60,
                                 limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def worker():
            for i in next_i:
                if time.perf_counter() > deadline:
                    return
                results.append(await one(client, kind, url, model, i, args.tokens))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    lat = sorted(r["latency"] for r in ok) or [float("nan")]
    q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    return {"requests": len(results), "errors": len(results) - len(ok), "p50": q(lat, 0.5), "p99": q(lat, 0.99),
            "ttft": statistics.median([r["ttft"] for r in ok if r["ttft"] is not None] or [float("nan")]),
            "tok_s": sum(r["tokens"] for r in ok) / wall}


def gpt2_checkpoint(folder: Path) -> Path:
    import torch
    from gpt_small.checkpoint import save_checkpoint
    from gpt_small.config import GPTConfig
    from gpt_small.model import GPT
    from gpt_small.tokenizer import gpt2_tokenizer

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2-124m"))
    run = folder / "gpt2-124m-random"
    save_checkpoint(run, step=0, model=model, tokenizer=gpt2_tokenizer(), config={"model": model.config.to_dict()},
                    links=("last", "best"))
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="runs/poem-cpu")
    ap.add_argument("--gpt2", action="store_true")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--level-seconds", type=float, default=600)
    args = ap.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"# {cpu}, {os.cpu_count()} cores; {args.requests} requests x {args.tokens} tokens per level, "
          f"ours --max-batch {args.max_batch}")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = [Path(args.checkpoint)] + ([gpt2_checkpoint(Path(tmp))] if args.gpt2 else [])
        for ckpt in checkpoints:
            model = ckpt.name
            table = {}
            for kind in ("baseline", "ours"):
                proc, url = start(kind, ckpt, args)
                try:
                    before = rss_mb(proc.pid)
                    for c in map(int, args.clients.split(",")):
                        table[kind, c] = asyncio.run(level(kind, url, model, c, args))
                    after = rss_mb(proc.pid)
                finally:
                    proc.terminate()
                    proc.wait(60)
                table[kind, "rss"] = (before, after)
            print(f"\n## {model}")
            print("| server | clients | requests | errors | p50 s | p99 s | TTFT p50 ms | tokens/s |")
            print("|---|---|---|---|---|---|---|---|")
            for c in map(int, args.clients.split(",")):
                for kind in ("baseline", "ours"):
                    r = table[kind, c]
                    print(f"| {kind} | {c} | {r['requests']} | {r['errors']} | {r['p50']:.2f} | {r['p99']:.2f} | "
                          f"{1000 * r['ttft']:.0f} | {r['tok_s']:.0f} |")
            for kind in ("baseline", "ours"):
                b, a = table[kind, "rss"]
                print(f"{kind} server RSS: {b:.0f} MB before, {a:.0f} MB after")
            for c in map(int, args.clients.split(",")):
                o, b = table["ours", c], table["baseline", c]
                print(f"{c} clients: ours/baseline tokens/s {o['tok_s'] / b['tok_s']:.2f}x, "
                      f"p99 latency {o['p99'] / b['p99']:.2f}x")


if __name__ == "__main__":
    main()
