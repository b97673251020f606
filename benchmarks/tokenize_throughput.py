"""Character tokenizer speed: CharTokenizer.encode_to_array against a Python loop per character.

Not a test. Encodes the same text both ways in one process (median of --reps, alternating) and
prints MB/s and the ratio; the two must give the same ids. eng-poem's 20 MB are encoded this way
by `gpt-small prepare`.

    python benchmarks/tokenize_throughput.py [--mb 3] [--reps 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import numpy as np

from gpt_small.tokenizer import CharTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=3.0, help="megabytes of text")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(0)
    words = "the night wind sings of silver rain upon a lonely shore where willows weep".split()
    text = ""
    while len(text) < args.mb * 1e6:
        text += " ".join(rng.choice(words) for _ in range(8)).capitalize() + ",\n"
    tok = CharTokenizer.train(text)
    index = {c: i for i, c in enumerate(tok.chars)}
    methods = {"encode_to_array": lambda: tok.encode_to_array(text),
               "Python loop": lambda: np.array([index.get(c, tok.unk_id) for c in text], dtype=np.int32)}
    assert np.array_equal(methods["encode_to_array"](), methods["Python loop"]())
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.reps):
        for name, fn in methods.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["Python loop"])
    print(f"{len(text) / 1e6:.1f} MB of text, median of {args.reps}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:<16} {m * 1000:8.1f} ms  {len(text) / m / 1e6:8.1f} MB/s  {base / m:6.1f}x the loop")


if __name__ == "__main__":
    main()
