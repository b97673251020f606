"""Wall time of whole commands under the two window rules: the default (keep half) and the exact
per-token slide of older versions (`--window-keep slide`).

Not a test. Runs the real CLI (a fresh process each time, as a user would), alternating the two
rules (half, slide, half, ...) so a change in machine load hits both, and prints the median wall
time of each and their ratio:
- a sonnet: `generate --rhyme sonnet --syllables 10 --seed S`;
- with --report-samples N (0 skips it; slow: minutes per run), `report --samples N`.

    python benchmarks/window_wall.py [--checkpoint runs/poem-cpu] [--data data/eng-poem-char]
        [--reps 3] [--report-samples 0] [--report-reps 1] [--threads N]

--threads sets OMP_NUM_THREADS for the commands: on a machine shared with other jobs, one thread
per command keeps OpenMP's threads from waiting on each other's cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date

ENV = dict(os.environ)


def wall(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=ENV)
    return time.perf_counter() - t


def compare(name: str, make_cmd, reps: int) -> None:
    times: dict[str, list[float]] = {"half": [], "slide": []}
    for _ in range(reps):
        for rule in times:
            times[rule].append(wall(make_cmd(rule)))
    half, slide = (statistics.median(times[r]) for r in ("half", "slide"))
    print(f"{name}: half {half:.1f} s, slide {slide:.1f} s (medians of {reps}); "
          f"slide / half = {slide / half:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="runs/poem-cpu")
    p.add_argument("--data", default="data/eng-poem-char")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--report-samples", type=int, default=0)
    p.add_argument("--report-reps", type=int, default=1)
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the commands (default: as set)")
    args = p.parse_args()
    if args.threads:
        ENV["OMP_NUM_THREADS"] = str(args.threads)
    cli = [sys.executable, "-m", "gpt_small"]
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {date.today()}, "
          f"OMP_NUM_THREADS={ENV.get('OMP_NUM_THREADS', 'unset')}")

    compare("sonnet (generate --rhyme sonnet --syllables 10)", lambda rule: [
        *cli, "generate", "--checkpoint", args.checkpoint, "--rhyme", "sonnet", "--syllables", "10",
        "--seed", str(args.seed), "--window-keep", rule], args.reps)
    if args.report_samples:
        with tempfile.TemporaryDirectory() as out:
            compare(f"report --samples {args.report_samples}", lambda rule: [
                *cli, "report", "--checkpoint", args.checkpoint, "--data", args.data,
                "--samples", str(args.report_samples), "--eval-tokens", "2000",
                "--out", os.path.join(out, rule), "--window-keep", rule], args.report_reps)


if __name__ == "__main__":
    main()
