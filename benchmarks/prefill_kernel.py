"""A lone prompt's prefill in row-invariant mode: the C kernel against the library GEMM.

Not a test. Generation prefills in the ops layer's row-invariant mode (gpt_small/ops/mode.py), where
a sequence of up to `cpu.PREFILL_KERNEL_MAX_T` tokens takes the C kernel (every row alike at any
number of rows, so the serve engine can batch prefills) and a longer one the library GEMM (oneDNN
or MKL), alone. This times one prefill of T tokens (batch 1, fp32, the whole forward with the KV
cache, as generate.prefill runs it) both ways, alternating, and prints the median of each and
their ratio: where the kernel stops paying, the rule's threshold.

    python benchmarks/prefill_kernel.py [--checkpoint runs/poem-cpu] [--lengths 16,32,64,128,256] [--reps 15]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from gpt_small.checkpoint import load_checkpoint
from gpt_small.generate import prefill
from gpt_small.ops import cpu, kernels


def prefill_seconds(model, idx: torch.Tensor, kernel_max_t: int, repeat: int) -> float:
    """Seconds per prefill of idx (1, T), with the kernel taking sequences up to kernel_max_t."""
    saved = cpu.PREFILL_KERNEL_MAX_T
    cpu.PREFILL_KERNEL_MAX_T = kernel_max_t
    try:
        T = idx.shape[1]
        pos = torch.arange(T)
        t = time.perf_counter()
        for _ in range(repeat):
            prefill(model, idx, pos)
        return (time.perf_counter() - t) / repeat
    finally:
        cpu.PREFILL_KERNEL_MAX_T = saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="runs/poem-cpu")
    p.add_argument("--lengths", default="16,32,64,128,256")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--repeat", type=int, default=10, help="prefills per timed sample")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not kernels.available():
        raise SystemExit(f"the C kernels are not available here: {kernels.describe()}")
    ckpt = load_checkpoint(args.checkpoint, device="cpu")
    model = ckpt.model.eval()
    W = ckpt.model_config.block_size
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; {args.checkpoint}; median of {args.reps}; the rule's threshold now {cpu.PREFILL_KERNEL_MAX_T}")
    print(f"{'tokens':>6} {'kernel ms':>10} {'library ms':>11} {'kernel/library':>15}")
    g = torch.Generator().manual_seed(0)
    model.setup_kv_cache(1, W)
    for T in (int(t) for t in args.lengths.split(",")):
        idx = torch.randint(0, ckpt.model_config.vocab_size, (1, min(T, W)), generator=g)
        prefill_seconds(model, idx, W, 2), prefill_seconds(model, idx, 0, 2)  # warm-up
        kernel, library = [], []
        for _ in range(args.reps):
            kernel.append(prefill_seconds(model, idx, W, args.repeat))
            library.append(prefill_seconds(model, idx, 0, args.repeat))
        k, lib = statistics.median(kernel), statistics.median(library)
        print(f"{idx.shape[1]:6} {k * 1e3:10.2f} {lib * 1e3:11.2f} {k / lib:14.2f}x", flush=True)
    model.clear_kv_cache()


if __name__ == "__main__":
    main()
