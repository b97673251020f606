"""The user documentation (README.md, docs/*.md) checked as a reader would find it.

- every relative link points at a file that exists, and a `#anchor` at a heading of that file;
- every table of measured figures has a command in the same section, so a reader can reproduce it;
- the pages speak about the project, not about how its work was organised.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")
# A measured figure in a table cell: a number with a unit or a ratio.
FIGURE = re.compile(r"\d[\d,.]*\s*(x\b|%|ms\b|s\b|GiB|MiB|GB|MB|tok|tokens/s|GFLOP|nats|bits|/s\b)", re.I)
# What counts as a command beside a table: a fenced block, or inline code that runs something.
RUNS = r"(?:[A-Z_]+=\S+\s+)*(?:gpt-small|python|make|bash|\.venv/bin/|pytest|/usr/bin/time|uv|pip)\b"
INLINE_COMMAND = re.compile(rf"`{RUNS}[^`]*`|^(?:    |\t){RUNS}")
# Words about how the work was organised, which users have no use for.
ORGANISATION = re.compile(r"\b(agents?|helpers?|the lead|sessions?|deadline|issue \d+|commit [0-9a-f]{7,40})\b", re.I)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading).strip().lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def lines_outside_code(text: str) -> list[tuple[int, str]]:
    out, in_code = [], False
    for i, line in enumerate(text.splitlines()):
        if FENCE.match(line):
            in_code = not in_code
            continue
        if not in_code:
            out.append((i, line))
    return out


@lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, line in lines_outside_code(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return frozenset(found)


def sections(text: str) -> list[list[str]]:
    """The page cut at its headings (fenced code kept inside its section)."""
    parts: list[list[str]] = [[]]
    in_code = False
    for line in text.splitlines():
        if FENCE.match(line):
            in_code = not in_code
        if not in_code and HEADING.match(line):
            parts.append([])
        parts[-1].append(line)
    return parts


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    dead = []
    for _, line in lines_outside_code(page.read_text(encoding="utf-8")):
        for m in LINK.finditer(line):
            target = m.group(1) or m.group(2)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("//"):
                continue  # a URL, not a file of the project
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            if not dest.exists():
                dead.append(f"{target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                dead.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not dead, f"{page.name}: dead links: {dead}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_table_of_figures_has_its_command(page: Path) -> None:
    orphans = []
    for section in sections(page.read_text(encoding="utf-8")):
        table_rows = [l for l in section if l.lstrip().startswith("|") and FIGURE.search(l)]
        if not table_rows:
            continue
        has_block = any(FENCE.match(l) for l in section)
        has_inline = any(INLINE_COMMAND.search(l) for l in section)
        if not (has_block or has_inline):
            orphans.append(section[0].strip() or "(top of page)")
    assert not orphans, f"{page.name}: tables of figures with no command in their section: {orphans}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_pages_speak_to_users(page: Path) -> None:
    hits = [f"line {i + 1}: {line.strip()[:80]}"
            for i, line in lines_outside_code(page.read_text(encoding="utf-8")) if ORGANISATION.search(line)]
    assert not hits, f"{page.name} tells how the work was organised: {hits}"


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """The three checks above catch what they are for (a page written to fail each one)."""
    page = tmp_path / "page.md"
    page.write_text("# Speed\n\n| shape | ms/step |\n|---|---|\n| A | 31.7 ms |\n\n"
                    "See [there](missing.md) and [here](#nowhere). The lead re-runs it next session.\n")
    assert not any(INLINE_COMMAND.search(l) or FENCE.match(l) for l in sections(page.read_text())[1])
    assert ORGANISATION.search(page.read_text())
    assert "nowhere" not in anchors(page) and "speed" in anchors(page)
    assert [m.group(1) for m in LINK.finditer(page.read_text())] == ["missing.md", "#nowhere"]
    assert slug("`make poem`: ten minutes on two CPU cores") == "make-poem-ten-minutes-on-two-cpu-cores"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_curl_with_a_body_sends_json(page: Path) -> None:
    """The server refuses a body that is not Content-Type: application/json (415), and curl's -d
    sends form encoding: a command copied from the docs must name the JSON type."""
    text = page.read_text()
    commands = re.findall(r"curl\b(?:[^\n]|\\\n)*", text)  # a command, its continued lines included
    bad = [c for c in commands if re.search(r"\s(-d|--data)\b", c) and "application/json" not in c]
    assert not bad, bad
