"""pytest plugin that tools/mutate.py loads in its mutmut runs: a mutant's tests run fastest first.

mutmut runs each mutant's tests with -x, so a killed mutant stops at its first failing test. Its
fork runner orders them by the time each took in the clean run, but its forkserver mode (the one
tools/mutate.py uses) passes them in no set order, so a mutant that a 0.01 s test kills could first
run a 10 s round trip through transformers. This restores the fast-first order from the durations
mutmut recorded (mutmut-stats.json in the folder the tests run from); a test it has no time for
runs last. Outside a mutmut run (no such file) it does nothing.
"""

from __future__ import annotations

import json
from pathlib import Path


def pytest_collection_modifyitems(session, config, items) -> None:
    try:
        durations = json.loads(Path("mutmut-stats.json").read_text())["duration_by_test"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    items.sort(key=lambda item: durations.get(item.nodeid, float("inf")))  # stable: ties keep their order
