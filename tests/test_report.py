"""The poem report: memorisation finds a planted copy exactly, form and language figures on known
poems, and the whole report (JSON, Markdown, PNG, cached n-gram index) from a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gpt_small.checkpoint import save_checkpoint
from gpt_small.config import GPTConfig
from gpt_small.data import PreparedData, prepare
from gpt_small.model import GPT
from gpt_small.report import NGramIndex, form_stats, language_stats, make_report, memorisation, split_texts

from conftest import verse as verse_text


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    src = root / "poems.txt"
    src.write_text(verse_text(1500, seed=4), encoding="utf-8")
    prepare(out=root / "data", text=src, tokenizer="char")
    return PreparedData(root / "data")


@pytest.fixture(scope="module")
def run(prepared, tmp_path_factory):
    """A tiny char model trained for 60 steps, saved as a run that records its data folder."""
    tok = prepared.tokenizer
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=tok.vocab_size, block_size=64))
    ids = torch.from_numpy(prepared.train.astype("int64"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        s = torch.randint(0, len(ids) - 65, (16,), generator=g)
        _, loss = model(torch.stack([ids[i:i + 64] for i in s]), torch.stack([ids[i + 1:i + 65] for i in s]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("run")
    save_checkpoint(out, step=60, model=model, tokenizer=tok, config={"model": model.config.to_dict()},
                    links=("last", "best"))
    (out / "run_config.json").write_text(json.dumps({"data": str(prepared.directory)}))
    return out


def test_split_texts_are_the_prepared_split(prepared):
    train, val = split_texts(prepared)
    assert len(train) == prepared.meta["train_chars"] and len(val) == prepared.meta["val_chars"]
    assert prepared.tokenizer.decode(prepared.val[:200].tolist()) == val[:200]


def test_memorisation_finds_a_planted_copy(prepared):
    train, _ = split_texts(prepared)
    lines = train.split("\n")
    index = NGramIndex.build(train)
    k = next(i for i in range(100, 200) if len(lines[i].split()) >= 5 and len(lines[i + 1].split()) >= 5)
    planted = [lines[k], lines[k + 1]]  # two whole training lines: at least 10 words
    n_words = len((planted[0] + " " + planted[1]).split())
    foreign = ["zebra quantum lattice bicycle", "marmalade telescope xylophone", "seven bright orbiting moons"]
    poems = [foreign + planted + ["quasar marmalade zebra"], foreign]
    mem = memorisation(poems, index, lines)
    assert mem["longest_copy_words"] == n_words
    assert mem["longest_copy_poem"] == 1 and mem["source_line_number"] == k + 1 and mem["source_line"] == lines[k]
    # the copy's 8-grams are found, and only they: n_words - 7 of the poem's n-grams
    assert mem["ngrams_found"] == n_words - 7
    clean = memorisation([foreign], index, lines)
    assert clean["ngrams_found"] == 0 and clean["longest_copy_words"] == 0 and clean["ngrams"] > 0


def test_form_and_language_figures():
    poems = [["The night is long and dark,", "I hear a distant lark,", "", "The day is bright", "and full of light",
              "and full of light"]]
    f = form_stats(poems)
    assert f["stanza_lines"] == [2, 3]
    assert f["line_syllables"][:2] == [6, 6]
    # distance 1 among the non-blank lines: dark/lark yes, lark/bright no, bright/light yes, light/light no
    assert f["rhyme_share_distance_1"] == pytest.approx(2 / 4)
    lang = language_stats(poems + [["glorp the snurfle"]])
    assert lang["repeated_line_share"] == pytest.approx(1 / 6)
    assert lang["oov_share"] == pytest.approx(2 / lang["words"])


def test_report_end_to_end(run, prepared, tmp_path):
    out = tmp_path / "rep"
    r = make_report(run, samples=4, lines=6, out=out, seed=1)  # data folder from run_config.json
    for name in ("report.json", "report.md", "report.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    j = json.loads((out / "report.json").read_text())
    assert len(j["poems"]["model"]) == len(j["poems"]["corpus"]) == 4
    assert all(len(p) == 6 for p in j["poems"]["corpus"])
    assert j["model_eval"]["whole_split"] and j["model_eval"]["tokens"] == len(prepared.val) - 1
    for side in ("model", "corpus"):
        assert 0 <= j[side]["memorisation"]["share_found"] <= 1
        assert len(j[side]["form"]["line_syllables"]) > 0
    md = (out / "report.md").read_text()
    assert "| word 8-grams found in the training text |" in md and "bits/char" in md
    cached = list(prepared.directory.glob("ngrams8-*.npz"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    r2 = make_report(run, samples=4, lines=6, out=tmp_path / "rep2", seed=1)
    assert cached[0].stat().st_mtime_ns == mtime  # built once, then read
    assert r2["model"]["memorisation"] == r["model"]["memorisation"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt_small", *args], capture_output=True, text=True, timeout=300)


def test_cli_report(run, tmp_path):
    r = _cli("report", "--checkpoint", str(run), "--samples", "2", "--lines", "3", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert "8-grams copied" in r.stdout and (tmp_path / "o" / "report.md").is_file()
    bad = _cli("report", "--checkpoint", str(run), "--samples", "0")
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and "samples must be" in bad.stderr
