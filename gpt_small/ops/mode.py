"""The ops layer's one piece of state: row-invariant mode, per thread.

Inside `with row_invariant():` every op computes each token row the same way whatever other rows
or sequences run beside it, and wherever it sits in the batch: a prompt prefilled alone and the
same prompt inside a batched prefill give the same bits (gpt_small/serve promises a seeded request
the same text whatever else the server is doing). generate.py's `prefill` and the serve engine's
batched prefill enter it; training, evaluation and scoring never do, so their speed and results
do not change. Thread-local: the serve engine runs on its own worker thread, and a mode entered
there does not leak into the event loop or another caller's thread.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_state = threading.local()


def is_row_invariant() -> bool:
    return getattr(_state, "on", False)


@contextmanager
def row_invariant() -> Iterator[None]:
    """Within the block (this thread only), every op is row-invariant (module docstring)."""
    before = is_row_invariant()
    _state.on = True
    try:
        yield
    finally:
        _state.on = before
