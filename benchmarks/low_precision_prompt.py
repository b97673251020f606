"""Prompts with bf16/int8 weights: the C kernel 8 rows at a time, or the weight dequantized to fp32
and one fp32 matmul, by rows of input.

Not a test. For each model shape (the weight matrices of its blocks) and weight kind, passes
`rows` rows of input through every matrix both ways and prints the median time of a pass. The
kernel reads each weight once from memory and repeats the arithmetic every 8 rows; the other way
writes an fp32 copy of every weight first and then runs torch's matmul (oneDNN for large
weights, as ops/cpu.py does), which uses the cores better. The row count where the two cross is
ops/cpu.py's `_LOW_PRECISION_KERNEL_MAX_ROWS`.

    python benchmarks/low_precision_prompt.py [--reps 7] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from gpt_small.ops import kernels, reference
from gpt_small.ops.cpu import _LOW_PRECISION_KERNEL_MAX_ROWS, _ONEDNN_MIN_WEIGHTS, onednn_linear
from gpt_small.ops.quantize import quantize_int8

ROWS = (8, 16, 32, 48, 64, 128)
SHAPES = {"gpt2-124m (12x768)": (768, 12), "6x384": (384, 6), "4x128": (128, 4)}  # (n_embd, layers)


def median_seconds(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def dequantized_matmul(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | None):
    wf = reference.dequantize(w, scale, torch.float32)
    if onednn_linear is not None and wf.numel() >= _ONEDNN_MIN_WEIGHTS:
        return onednn_linear(x, wf, b, "none", [], "")
    return F.linear(x, wf, b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not kernels.available():
        raise SystemExit(kernels.describe())
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads (load average {load:.1f}); "
          f"ms per pass through all block weights, kernel / dequantize + matmul (median of {args.reps}); "
          f"the CPU backend takes the kernel up to {_LOW_PRECISION_KERNEL_MAX_ROWS} rows")
    print(f"{'shape':<20}{'weights':>8}" + "".join(f"{f'{r} rows':>16}" for r in ROWS))
    torch.manual_seed(0)
    for name, (C, layers) in SHAPES.items():
        shapes = [(3 * C, C), (C, C), (4 * C, C), (C, 4 * C)] * layers  # c_attn, c_proj, c_fc, c_proj
        for kind in ("int8", "bf16"):
            mats = []
            for n, k in shapes:
                w = torch.randn(n, k) * 0.02
                mats.append(quantize_int8(w) if kind == "int8" else (w.bfloat16(), None))
            biases = [torch.zeros(n) for n, _ in shapes]
            line = f"{name:<20}{kind:>8}"
            for rows in ROWS:
                xs = {k: torch.randn(rows, k) for k in (C, 4 * C)}
                kern = median_seconds(lambda: [kernels.skinny_linear(xs[w.shape[1]], w, b, s)
                                               for (w, s), b in zip(mats, biases)], args.reps)
                deq = median_seconds(lambda: [dequantized_matmul(xs[w.shape[1]], w, b, s)
                                              for (w, s), b in zip(mats, biases)], args.reps)
                line += f"{kern * 1e3:>8.1f} /{deq * 1e3:>6.1f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
