"""pytest plugin for tools/mutate.py's runs: a mutant's tests run fastest first.

mutmut runs, per mutant, the tests that reach the mutated function, with `-x`, in no particular
order. Most mutants fail a direct, fast test; run first, it ends the run before the slow tests
(a report written, a model sampled) that reach the same function. The durations are mutmut's
own, from its clean run (mutants/mutmut-stats.json, in the folder the tests run from)."""

from __future__ import annotations

import json
from pathlib import Path


def pytest_collection_modifyitems(session, config, items):
    path = Path("mutmut-stats.json")
    if not path.is_file():
        return
    durations = json.loads(path.read_text()).get("duration_by_test", {})
    items.sort(key=lambda item: durations.get(item.nodeid, float("inf")))  # stable: unknown ones keep their order
