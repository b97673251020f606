"""How fast a decode step can read weights: MKL's GEMV, oneDNN's linear, our C kernel (with fp32,
bf16 and int8 weights), a plain sum.

Not a test. Builds the weight matrices of a model's blocks (6x384: 24 matrices, 43 MB of fp32;
gpt2-124m: 48 matrices and the 50257-row head, 494 MB) and, for each method, passes `--batch`
vectors through all of them in turn, as one decode step does; prints the median time per pass and
the weight bytes read per second (each method's own bytes: half for bf16, a quarter for int8).
The sum is the reference for what memory can deliver (it reads every fp32 weight once and
computes nearly nothing); the ratio of each method to F.linear (MKL) is printed too.
"skinny_linear" is the kernel the CPU backend uses at decode (gpt_small/ops/kernels.py), when it
could be built here.

    python benchmarks/weight_streaming.py [--shape 6x384|gpt2-124m] [--batch 1] [--reps 30] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from gpt_small.ops import kernels
from gpt_small.ops.cpu import onednn_linear  # the op the CPU backend calls for prompts, or None
from gpt_small.ops.quantize import quantize_int8

SHAPES = {  # (out, in): c_attn, c_proj, c_fc, c_proj per block, then the head if any
    "6x384": [(1152, 384), (384, 384), (1536, 384), (384, 1536)] * 6,
    "gpt2-124m": [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12 + [(50257, 768)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="6x384", choices=list(SHAPES))
    parser.add_argument("--batch", type=int, default=1, choices=range(1, kernels.MAX_ROWS + 1))
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = SHAPES[args.shape]
    weights = [torch.randn(o, i) * 0.02 for o, i in shapes]
    biases = [torch.randn(o) for o, _ in shapes]
    x = {n: torch.randn(args.batch, n) for n in {i for _, i in shapes}}
    total = sum(w.numel() * 4 for w in weights)

    methods = {
        "F.linear (MKL)": lambda: [F.linear(x[w.shape[1]], w, b) for w, b in zip(weights, biases)],
        "sum (reads only)": lambda: [w.sum() for w in weights],
    }
    if onednn_linear is not None:
        methods["oneDNN linear"] = lambda: [onednn_linear(x[w.shape[1]], w, b, "none", [], "")
                                            for w, b in zip(weights, biases)]
    nbytes = {}  # methods that read fewer bytes than fp32
    if kernels.available():
        methods["skinny_linear (C)"] = lambda: [kernels.skinny_linear(x[w.shape[1]], w, b)
                                                for w, b in zip(weights, biases)]
        bf16 = [w.bfloat16() for w in weights]
        int8 = [quantize_int8(w) for w in weights]
        methods["skinny bf16 (C)"] = lambda: [kernels.skinny_linear(x[w.shape[1]], w, b)
                                              for w, b in zip(bf16, biases)]
        methods["skinny int8 (C)"] = lambda: [kernels.skinny_linear(x[q.shape[1]], q, b, s)
                                              for (q, s), b in zip(int8, biases)]
        nbytes = {"skinny bf16 (C)": total // 2, "skinny int8 (C)": total // 4}
    times: dict[str, list[float]] = {name: [] for name in methods}
    for fn in methods.values():
        fn()  # warm-up
    for _ in range(args.reps):  # alternate, so machine noise hits every method alike
        for name, fn in methods.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.shape}, batch {args.batch}, "
          f"{len(weights)} matrices, {total / 2**20:.1f} MiB of fp32 weights, median of {args.reps}")
    print(kernels.describe())
    base = statistics.median(times["F.linear (MKL)"])
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:<18} {m * 1000:7.2f} ms per pass  {nbytes.get(name, total) / m / 1e9:6.1f} GB/s  "
              f"{base / m:5.2f}x F.linear")


if __name__ == "__main__":
    main()
