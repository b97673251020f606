"""Where gpt-small keeps files of its own outside a run folder: one cache for the whole package.

`cache_dir()` is `$GPT_SMALL_CACHE`, else `~/.cache/gpt-small`. The built-in corpora (corpus.py)
and the compiled CPU kernels keep their files under it; nothing here creates the folder.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("GPT_SMALL_CACHE") or Path.home() / ".cache" / "gpt-small")
