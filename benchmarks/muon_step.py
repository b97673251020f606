"""Muon step time: gpt-small's `optim.Muon` against `torch.optim.Muon`, same matrices, same run.

    python benchmarks/muon_step.py [--preset poem-cpu] [--reps 30]

Times one optimizer step over the hidden matrices of a preset (what Muon trains: the blocks' 2-D
weights), with fixed random gradients, median of --reps after warm-up, ours and torch's
alternating. Ours batches the matrices of one shape into one Newton-Schulz call and runs it in
fp32 or bf16 (the trainer picks bf16 only where a bf16 matmul measured faster); torch's runs
each matrix alone, always in bf16. Both: Nesterov momentum 0.95, five quintic iterations, the
sqrt(max(1, rows/cols)) scale, no weight decay. Also prints how far one step of each lands
from the other (relative difference of the updated weights' change).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gpt_small import GPT, GPTConfig
from gpt_small.device import bf16_matmul_is_faster
from gpt_small.optim import Muon, is_hidden_matrix


def _params(preset: str, seed: int) -> list[torch.nn.Parameter]:
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_preset(preset))
    ps = [p for n, p in model.named_parameters() if is_hidden_matrix(n, p)]
    g = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * 1e-2
    return ps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="poem-cpu")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    bf16 = bf16_matmul_is_faster(torch.device("cpu"))
    ns_dtype = torch.bfloat16 if bf16 else torch.float32
    impls = {
        "ours": lambda ps: Muon(ps, lr=0.005, momentum=0.95, ns_dtype=ns_dtype),
        "ours-fp32": lambda ps: Muon(ps, lr=0.005, momentum=0.95, ns_dtype=torch.float32),
        "torch.optim.Muon": lambda ps: torch.optim.Muon(ps, lr=0.005, momentum=0.95, weight_decay=0.0),
    }
    opts = {name: (make(ps := _params(args.preset, 0)), ps) for name, make in impls.items()}
    before = [p.detach().clone() for p in opts["ours"][1]]
    deltas = {}
    for name, (opt, ps) in opts.items():
        opt.step()
        deltas[name] = torch.cat([(p.detach() - b).flatten() for p, b in zip(ps, before)])
    times: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(args.reps):
        for name, (opt, _) in opts.items():
            t = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset}, "
          f"{len(before)} matrices; ours in {str(ns_dtype).removeprefix('torch.')} here")
    base = statistics.median(times["torch.optim.Muon"])
    for name, ts in times.items():
        ms = statistics.median(ts) * 1000
        diff = ((deltas[name] - deltas["ours-fp32"]).norm() / deltas["ours-fp32"].norm()).item()
        print(f"{name:<18} {ms:8.2f} ms/step  {base * 1000 / ms:5.2f}x torch's speed  "
              f"first step vs ours-fp32: {diff:.4f} relative")


if __name__ == "__main__":
    main()
