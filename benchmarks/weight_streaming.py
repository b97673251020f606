"""How fast a decode step can read weights: MKL's GEMV, oneDNN's linear, our C kernel, a plain sum.

Not a test. Builds the 24 weight matrices of the 6x384 shape (43 MB of fp32, more than a 32 MB
L3 cache) and, for each method, passes `--batch` vectors through all of them in turn, as one
decode step does; prints the median time per pass and the weight bytes read per second. The sum
is the reference for what memory can deliver (it reads every weight once and computes nearly
nothing); the ratio of each method to F.linear (MKL) is printed too. "skinny_linear" is the
kernel the CPU backend uses at decode (gpt_small/ops/kernels.py), when it could be built here.

    python benchmarks/weight_streaming.py [--batch 1] [--reps 30] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from gpt_small.ops import kernels
from gpt_small.ops.cpu import onednn_linear  # the op the CPU backend calls for prompts, or None

SHAPES = [(1152, 384), (384, 384), (1536, 384), (384, 1536)] * 6  # (out, in): c_attn, c_proj, c_fc, c_proj


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1, choices=range(1, kernels.MAX_ROWS + 1))
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights = [torch.randn(o, i) for o, i in SHAPES]
    biases = [torch.randn(o) for o, _ in SHAPES]
    x = {n: torch.randn(args.batch, n) for n in (384, 1536)}
    total = sum(w.numel() * 4 for w in weights)

    methods = {
        "F.linear (MKL)": lambda: [F.linear(x[w.shape[1]], w, b) for w, b in zip(weights, biases)],
        "sum (reads only)": lambda: [w.sum() for w in weights],
    }
    if onednn_linear is not None:
        methods["oneDNN linear"] = lambda: [onednn_linear(x[w.shape[1]], w, b, "none", [], "")
                                            for w, b in zip(weights, biases)]
    if kernels.available():
        methods["skinny_linear (C)"] = lambda: [kernels.skinny_linear(x[w.shape[1]], w, b)
                                                for w, b in zip(weights, biases)]
    times: dict[str, list[float]] = {name: [] for name in methods}
    for fn in methods.values():
        fn()  # warm-up
    for _ in range(args.reps):  # alternate, so machine noise hits every method alike
        for name, fn in methods.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{len(weights)} matrices, {total / 2**20:.1f} MiB of fp32 weights, median of {args.reps}")
    print(kernels.describe())
    base = statistics.median(times["F.linear (MKL)"])
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:<18} {m * 1000:7.2f} ms per pass  {total / m / 1e9:6.1f} GB/s  {base / m:5.2f}x F.linear")


if __name__ == "__main__":
    main()
