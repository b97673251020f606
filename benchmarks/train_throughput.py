"""Training throughput: gpt-small's trainer against a nanoGPT-equivalent baseline, same machine, same run.

    python benchmarks/train_throughput.py [--shapes A,B,150m] [--steps N] [--repeats R]
    python benchmarks/train_throughput.py --device cuda --shapes 150m --batch 64 --compile

For each shape the baseline (benchmarks/nanogpt_like.py) and our `Trainer.train_step` run in
alternating child processes (baseline, ours, baseline, ours, ...), so the two see the same machine
state and each gets its own peak RSS; the table gives medians over the repeats and the ratio
ours / baseline. MFU = training FLOPs per token (6N + 6 * n_layer * T * C, config.flops_per_token)
times tokens/s, divided by the fp32 matmul peak measured at the start of this run
(torch.mm, n = 4096, this process's threads).

Shapes (anchors.md): A = nanoGPT "baby" 4x4x128, block 64, batch 12, dropout 0;
B = shakespeare_char 6x6x384, block 256, batch 64, dropout 0.2; 150m = our small-150m preset,
block 512, batch 4 (ours only: the baseline's LayerNorm-without-bias model differs in shape).
Both sides run the same model shape with GELU and no biases (ours: GELU's tanh form, GPT-2's, through
our C kernel; the baseline: nanoGPT's exact GELU); ours with our default trainer settings.
`ours-compile` (--compile) is `ours` under torch.compile; its warm-up steps absorb the compilation.
`ours-relu` is the same shape with ReLU, our default activation (the original spec): a different
model, listed apart, never as the like-for-like ratio. `ours-bf16` (--bf16) is `ours` under bf16
autocast, also listed apart: the target is fp32, and bf16 helps only on CPUs whose bf16 matmuls
beat fp32 (MFU still counts against the fp32 peak).

`--device cuda`: ours only (the baseline is nanoGPT's CPU set-up), with the trainer's defaults
there (bf16 autocast, TF32, fused AdamW), each step timed to a CUDA synchronize; MFU against
the bf16 matmul peak measured at the start (torch.mm, n = 8192), memory = peak allocated on the
GPU. `--batch` overrides every shape's batch size (a GPU wants more than the CPU's 4 at 150m).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    "A": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0.0, steps=60),
    "B": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, dropout=0.2, steps=6),
    "150m": dict(n_layer=12, n_head=16, n_embd=1024, block_size=512, batch_size=4, dropout=0.0, steps=4),
}
WARMUP = {"A": 10, "B": 2, "150m": 1}  # steps before timing (compilation happens in the first)


def matmul_peak(n: int = 4096, reps: int = 5, device: str = "cpu") -> float:
    """FLOP/s of one n x n matmul, median of reps: fp32 on the CPU, bf16 on CUDA."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _data() -> np.ndarray:
    """eng-poem's training tokens if prepared, else random tokens of a 118-character vocabulary."""
    path = ROOT / "data" / "eng-poem-char" / "train.bin"
    if path.exists():
        return np.memmap(path, dtype=np.uint16, mode="r")
    return np.random.default_rng(0).integers(0, 118, size=2_000_000, dtype=np.uint16)


def worker(impl: str, shape_name: str, steps: int, device: str = "cpu", batch: int | None = None) -> dict:
    s = {**SHAPES[shape_name], **({"batch_size": batch} if batch else {})}
    data = _data()
    vocab = 118
    if impl == "baseline":
        sys.path.insert(0, str(Path(__file__).parent))
        from nanogpt_like import BaselineTrainer

        t = BaselineTrainer(data, vocab_size=vocab, block_size=s["block_size"], n_layer=s["n_layer"],
                            n_head=s["n_head"], n_embd=s["n_embd"], dropout=s["dropout"], batch_size=s["batch_size"])
        step = t.train_step
    else:
        step = _our_step(s, vocab, activation="relu" if impl == "ours-relu" else "gelu",
                         preset="small-150m" if shape_name == "150m" else None, compile=impl == "ours-compile",
                         device=device, dtype="bfloat16" if impl == "ours-bf16" else "auto")
    warmup = WARMUP[shape_name] if device == "cpu" else 5  # CUDA: compilation, autotuning, the allocator
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1000
    memory = (torch.cuda.max_memory_allocated() if device == "cuda"
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"ms_per_step": ms, "tokens_per_s": s["batch_size"] * s["block_size"] / (ms / 1000),
            "peak_memory_gib": memory / 2**30}


def _our_step(s: dict, vocab: int, activation: str, preset: str | None, compile: bool = False,
              device: str = "cpu", dtype: str = "auto"):
    """Our real Trainer.train_step on a throw-away prepared-data folder of the same tokens."""
    from gpt_small import GPTConfig, TrainConfig
    from gpt_small.data import PreparedData, prepare
    from gpt_small.device import configure_process
    from gpt_small.train import Trainer

    tmp = Path(tempfile.mkdtemp(prefix="gpt-small-bench-"))
    src = ROOT / "data" / "eng-poem-char"
    data_dir = src if src.exists() else _tiny_prepared(tmp, prepare)
    data = PreparedData(data_dir)
    if preset:  # the real preset (ReLU, biases), not the baseline's shape
        model = GPTConfig.from_preset(preset, vocab_size=data.tokenizer.vocab_size)
    else:
        model = GPTConfig(vocab_size=data.tokenizer.vocab_size, block_size=s["block_size"], n_layer=s["n_layer"],
                          n_head=s["n_head"], n_embd=s["n_embd"], dropout=s["dropout"], activation=activation,
                          bias=False)
    train = TrainConfig(batch_size=s["batch_size"], max_steps=10**6, warmup_steps=10, compile=compile, device=device,
                        dtype=dtype)
    configure_process(device=device, threads=train.threads)
    trainer = Trainer(model, train, data, tmp / "run", show_progress=False)
    trainer.setup()
    return trainer.train_step


def _tiny_prepared(tmp: Path, prepare) -> Path:
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz    \n"))
    (tmp / "text.txt").write_text("".join(rng.choice(letters, size=3_000_000)) + "\n")
    prepare(out=tmp / "data", text=tmp / "text.txt", tokenizer="char")
    return tmp / "data"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="A,B,150m")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, help="timed steps per child (default per shape)")
    p.add_argument("--compile", action="store_true", help="also time ours with torch.compile (slow to start)")
    p.add_argument("--bf16", action="store_true", help="also time ours under bf16 autocast on the CPU")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch", type=int, help="batch size for every shape (default: each shape's own)")
    p.add_argument("--worker", nargs=3, metavar=("IMPL", "SHAPE", "STEPS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        impl, shape, steps = args.worker
        print(json.dumps(worker(impl, shape, int(steps), args.device, args.batch)))
        return

    from gpt_small import GPTConfig

    cuda = args.device == "cuda"
    if cuda:
        peak = matmul_peak(8192, device="cuda")
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}; bf16 matmul peak {peak / 1e12:.0f} TFLOP/s")
    else:
        peak = matmul_peak()
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    memory = "GPU mem" if cuda else "peak RSS"
    print(f"{'shape':<6} {'impl':<12} {'batch':>5} {'ms/step':>9} {'tokens/s':>10} {'MFU':>6} {memory:>9}   ratio (tokens/s)")
    for shape in args.shapes.split(","):
        s = {**SHAPES[shape], **({"batch_size": args.batch} if args.batch else {})}
        steps = args.steps or s["steps"]
        cfg = GPTConfig(vocab_size=118, block_size=s["block_size"], n_layer=s["n_layer"], n_head=s["n_head"],
                        n_embd=s["n_embd"], bias=False)
        impls = ["ours"] if shape == "150m" or cuda else ["baseline", "ours", "ours-relu"]
        if args.compile and (shape != "150m" or cuda):
            impls.append("ours-compile")
        if args.bf16 and not cuda:
            impls.append("ours-bf16")
        results: dict[str, list[dict]] = {i: [] for i in impls}
        for _ in range(args.repeats):
            for impl in impls:
                extra = ["--device", args.device] + (["--batch", str(args.batch)] if args.batch else [])
                out = subprocess.run([sys.executable, __file__, "--worker", impl, shape, str(steps), *extra],
                                     capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
                if out.returncode != 0:
                    raise SystemExit(f"{impl} {shape} failed:\n{out.stderr[-2000:]}")
                results[impl].append(json.loads(out.stdout.strip().splitlines()[-1]))
        med = {i: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for i, rs in results.items()}
        for impl in impls:
            m = med[impl]
            mfu = cfg.flops_per_token() * m["tokens_per_s"] / peak
            base = "baseline" if "baseline" in med else "ours"
            ratio = f"{m['tokens_per_s'] / med[base]['tokens_per_s']:.2f}x vs {base}" if impl != base else ""
            print(f"{shape:<6} {impl:<12} {s['batch_size']:>5} {m['ms_per_step']:>9.1f} {m['tokens_per_s']:>10,.0f} "
                  f"{mfu:>6.1%} {m['peak_memory_gib']:>8.2f}G   {ratio}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
