"""Shared fixtures: a small deterministic verse text, the built-in corpus cache made once, and the
in-process server of the serve tests (`model_tok`, `reference`, `client`; serve_util.py).

The built-in corpus lives in the shared cache (`$GPT_SMALL_CACHE` or ~/.cache/gpt-small), not in
tmp_path: making it reads a 56 MB pickle, so every test session after the first finds it ready.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import torch

_WORDS = ("the night wind sings of silver rain upon a lonely shore where ancient willows weep "
          "and golden morning breaks o'er hill and dale while dreaming roses fade").split()
# AWKWARD strings every tokenizer must round-trip (where it knows the characters)
AWKWARD = [
    "", " ", "  leading spaces", "trailing  ", "\n", "\n\n", "a\n\n\nb", "\ttab\r\nCRLF",
    "emoji 😀👍🏽 flags 🇫🇷", "e\u0301 combining accent", "日本語の詩", "naïve café — «quotes»",
    "<|endoftext|>", "'s 've 're", "1234567890", "\u00a0non-breaking\u3000space",
]


def verse(n_lines: int, seed: int = 0) -> str:
    """n_lines of pseudo-verse, each ending with a newline; some blank lines and indents."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        if i % 9 == 8:
            lines.append("")
            continue
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 8)))
        lines.append(("  " if i % 5 == 4 else "") + words.capitalize() + rng.choice([",", ".", ";", "", "!  "]))
    return "".join(line + "\n" for line in lines)


@pytest.fixture(name="verse", scope="session")
def verse_fixture():
    """The `verse(n_lines, seed)` text maker."""
    return verse


@pytest.fixture(scope="session")
def awkward() -> list[str]:
    return list(AWKWARD)


@pytest.fixture
def bad_text_sources(tmp_path: Path) -> list[tuple[Path, str]]:
    """(path, message regex) for each bad user text; used by the corpus, API and CLI tests."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.txt").write_bytes(b"")
    (bad / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    (bad / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (bad / "no-txt").mkdir()
    (bad / "no-txt" / "poem.md").write_text("verse\n")
    return [
        (bad / "missing.txt", "does not exist"),
        (bad / "empty.txt", "is empty"),
        (bad / "latin1.txt", "not UTF-8 text: invalid byte 0xe9 at byte offset 3"),
        (bad / "binary.txt", r"binary file \(NUL byte at offset 8\)"),
        (bad / "no-txt", "holds no .txt files"),
    ]


@pytest.fixture
def poem_file(tmp_path: Path) -> Path:
    """A 200-line UTF-8 verse text (~8 KB)."""
    path = tmp_path / "poem.txt"
    path.write_text(verse(200), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def builtin_corpora() -> dict[str, Path]:
    """Paths of the cached built-in corpora (made on the first run, about 5 s)."""
    from gpt_small.corpus import CORPORA, corpus_path

    return {name: corpus_path(name) for name in CORPORA}


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One torch thread for the whole suite: the test models are tiny, extra OpenMP threads only add
    synchronisation, and on a busy 2-core machine their spin-waits made tests 10x slower.
    Subprocesses started by tests get OMP_NUM_THREADS=1 or --threads 1 for the same reason."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def verse_data(tmp_path_factory, verse) -> Path:
    """A char-level prepared-data folder of 1,500 verse lines, shared by the training-side tests."""
    from gpt_small.data import prepare

    root = tmp_path_factory.mktemp("verse_data")
    (root / "poems.txt").write_text(verse(1500))
    prepare(out=root / "data", text=root / "poems.txt", tokenizer="char")
    return root / "data"


# ---------------------------------------------------------------- the serve tests' in-process app

@pytest.fixture(scope="module")
def model_tok():
    """serve_util.make_model(): the served model and its tokenizer, one per test module."""
    from serve_util import make_model

    return make_model()


@pytest.fixture(scope="module")
def reference(model_tok):
    """A copy of the served model for generate_text (the engine owns the served model's KV cache)."""
    return copy.deepcopy(model_tok[0])


@pytest.fixture(scope="module")
def client(model_tok):
    """Starlette's TestClient over the real app, engine and model: batches of 8, 300 new tokens and
    200 prompt tokens at most. A test module that needs other limits defines its own `client`."""
    pytest.importorskip("starlette")
    pytest.importorskip("httpx")
    from starlette.testclient import TestClient

    from gpt_small.serve import create_app
    from serve_util import NAME

    model, tok = model_tok
    app = create_app(model=model, tokenizer=tok, model_name=NAME, max_batch=8, max_new_tokens=300,
                     max_prompt_tokens=200)
    with TestClient(app) as c:
        yield c
