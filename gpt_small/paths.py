"""Where gpt-small keeps files it makes for itself: one cache folder for the built-in corpus text
and the compiled CPU kernels. `$GPT_SMALL_CACHE`, default `~/.cache/gpt-small`; nothing is created
here, callers make the subfolders they write."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("GPT_SMALL_CACHE") or Path.home() / ".cache" / "gpt-small")
