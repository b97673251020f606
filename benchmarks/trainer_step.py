"""One number: the median ms of `Trainer.train_step` at nanoGPT's "baby" shape, for A/B runs of two trees.

    OMP_NUM_THREADS=1 PYTHONPATH=<tree> python benchmarks/trainer_step.py --data <prepared char data>

Run it alternately with PYTHONPATH at the code before and after a change (same machine, same
minute); compare the medians. 10 warm-up steps, then 40 timed; one thread.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from gpt_small import GPTConfig, TrainConfig
from gpt_small.data import PreparedData
from gpt_small.train import Trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="a prepared char-level data folder")
    args = ap.parse_args()
    try:  # trees from before configure_process set threads in Trainer.setup instead
        from gpt_small.device import configure_process

        configure_process(device="cpu", threads=1)
    except ImportError:
        pass
    data = PreparedData(args.data)
    model = GPTConfig(vocab_size=data.tokenizer.vocab_size, block_size=64, n_layer=4, n_head=4, n_embd=128,
                      bias=False)
    train = TrainConfig(batch_size=12, max_steps=10**6, warmup_steps=10, device="cpu", threads=1)
    t = Trainer(model, train, data, Path(tempfile.mkdtemp()) / "run", show_progress=False)
    t.setup()
    for _ in range(10):
        t.train_step()
    times = []
    for _ in range(40):
        start = time.perf_counter()
        t.train_step()
        times.append(time.perf_counter() - start)
    print(f"{statistics.median(times) * 1000:.2f} ms/step")


if __name__ == "__main__":
    main()
