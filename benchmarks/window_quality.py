"""What the window rule costs in quality: the generator's loss past the window against `eval`'s.

Not a test. On the first --tokens tokens of a checkpoint's validation split (cut so that eval's
last window is a whole stride on, see generate.forced_log_prob), prints the loss (nats/token) of:
- `eval --stride W/2` (evaluate_tokens, the default stride);
- the generator teacher-forced through the default window rule (generate.forced_log_prob, keep
  half): the two should agree to 1e-4 (tests/test_generate.py checks it on a random model);
- `eval --stride 1`: every token from a full window, which is what the exact per-token slide
  (`--window-keep slide`) gives each token;
- `eval --stride W`: windows that do not overlap (the training's evaluation).

    python benchmarks/window_quality.py [--checkpoint runs/poem-cpu] [--data data/eng-poem-char]
                                        [--tokens 3000] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch

from gpt_small.checkpoint import load_checkpoint
from gpt_small.data import PreparedData
from gpt_small.evaluate import evaluate_tokens
from gpt_small.generate import forced_log_prob, window_keep


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="runs/poem-cpu")
    p.add_argument("--data", default="data/eng-poem-char")
    p.add_argument("--tokens", type=int, default=3000)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.checkpoint, device="cpu")
    model = ckpt.model.eval()
    W = ckpt.model_config.block_size
    stride = W - window_keep(W)
    n = 1 + W + max(1, (args.tokens - 1 - W) // stride) * stride
    tokens = PreparedData(args.data).val[:n]
    print(f"{args.checkpoint}, context {W}, first {n:,} validation tokens of {args.data}")
    for label, s in ((f"eval --stride {stride} (default)", stride), ("eval --stride 1 (= exact slide)", 1),
                     (f"eval --stride {W} (no overlap)", W)):
        t = time.perf_counter()
        r = evaluate_tokens(model, tokens, context=W, stride=s, batch_size=8)
        print(f"  {label:34} loss {r.loss:.5f}  ({time.perf_counter() - t:.0f} s)", flush=True)
    t = time.perf_counter()
    total, count = forced_log_prob(model, torch.as_tensor(tokens.astype("int64")))
    print(f"  {'generator, window rule (keep half)':34} loss {-total / count:.5f}  ({time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
