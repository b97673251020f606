"""`make_report` on a run folder, on a model whose every figure can be recomputed: the report's
poems are the ones `generate_text` samples with the report's settings and the validation
split's evenly spaced stretches; each figure is its function's value on those poems; the files
(report.json, report.md, report.png) hold that result; the defaults are the documented ones
(50 poems of 14 lines, temperature 0.8, seed 0, `<run>/report`, the run's data folder); each
refusal is one line, before any work.

The model is an untrained tiny one whose last LayerNorm is set so that it ends a line every few
characters: its poems cost a few steps each, even fifty of fourteen lines.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt_small import limits
from gpt_small.checkpoint import load_checkpoint, save_checkpoint
from gpt_small.config import LINE_TOKEN_BUDGET, GPTConfig
from gpt_small.data import PreparedData, prepare
from gpt_small.errors import GPTSmallError
from gpt_small.evaluate import evaluate_tokens
from gpt_small.generate import generate_text
from gpt_small.model import GPT
from gpt_small.report import (NGramIndex, _summary, corpus_poems, form_stats, format_markdown, language_stats,
                              make_report, memorisation, split_texts)


def _model(vocab_size: int, newline: int, newline_logit: float = 2.0, context: float = 0.0) -> GPT:
    """logits = wte . (context * normed input + bias): the newline's bias is newline_logit, the
    others' near 0; with context 0 every step has the same distribution."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=vocab_size))
    with torch.no_grad():
        wte = model.transformer.wte.weight
        model.transformer.ln_f.weight.fill_(context)
        model.transformer.ln_f.bias.copy_(newline_logit * wte[newline] / wte[newline].dot(wte[newline]))
    return model.eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory, verse) -> PreparedData:
    root = tmp_path_factory.mktemp("report_data")
    (root / "poems.txt").write_text(verse(200, seed=3) * 2)  # the validation split's lines are in the training one
    prepare(out=root / "data", text=root / "poems.txt", tokenizer="char")
    return PreparedData(root / "data")


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    """A run folder (checkpoints/, last, run_config.json naming the data folder)."""
    tok = data.tokenizer
    model = _model(tok.vocab_size, tok.encode("\n")[0])
    out = tmp_path_factory.mktemp("report_run") / "run"
    save_checkpoint(out, step=7, model=model, tokenizer=tok, config={"model": model.config.to_dict()})
    (out / "run_config.json").write_text(json.dumps({"data": str(data.directory)}))
    return out


def test_every_figure_is_its_function_of_the_poems_and_the_files_hold_them(run, data, tmp_path):
    out = tmp_path / "reports" / "of" / "rep"  # folders made with their parents
    r = make_report(run, samples=3, lines=2, out=out, seed=5, temperature=0.7, window_keep="slide")
    ckpt = load_checkpoint(run)
    assert (r["checkpoint"], r["step"], r["data"]) == (str(ckpt.path), 7, str(data.directory))
    assert (r["samples"], r["lines"], r["seed"], r["temperature"], r["window_keep"]) == (3, 2, 5, 0.7, 31)
    assert r["out"] == str(out)

    train, val = split_texts(data)
    texts = generate_text(ckpt.model, ckpt.tokenizer, "", max_new_tokens=LINE_TOKEN_BUDGET * 2, lines=2,
                          num_samples=3, temperature=0.7, seed=5, keep="slide")
    assert r["poems"] == {"model": [t.split("\n")[:2] for t in texts], "corpus": corpus_poems(val, 3, 2)}
    index, train_lines = NGramIndex.build(train), train.split("\n")
    for side in ("model", "corpus"):
        poems = r["poems"][side]
        form = form_stats(poems)
        assert r[side] == {"memorisation": memorisation(poems, index, train_lines), "form": form,
                           "language": language_stats(poems), "line_chars": _summary(form["line_chars"]),
                           "line_syllables": _summary(form["line_syllables"]),
                           "stanza_lines": _summary(form["stanza_lines"])}
    assert r["corpus"]["memorisation"]["longest_copy_words"] >= 8

    ctx = ckpt.model_config.block_size
    e = evaluate_tokens(ckpt.model, data.val, context=ctx, stride=ctx, chars_per_token=data.chars_per_token("val"))
    assert r["model_eval"] == {"loss": pytest.approx(e.loss), "bits_per_char": pytest.approx(e.bits_per_char),
                               "tokens": e.tokens, "whole_split": True}
    assert e.tokens == len(data.val) - 1  # non-overlapping windows cover the whole split

    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "report.png"]  # no temporaries
    saved = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps({k: v for k, v in r.items() if k != "out"}))
    assert (out / "report.json").read_text(encoding="utf-8").endswith("}\n")
    assert (out / "report.md").read_text(encoding="utf-8") == format_markdown(r)
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    key = hashlib.sha256(train.encode()).hexdigest()[:16]
    assert [p.name for p in data.directory.glob("ngrams8-*.npz")] == [f"ngrams8-{key}.npz"]  # beside the data


def test_the_defaults_are_the_documented_ones(run, data, tmp_path, monkeypatch):
    """docs/poetry.md: 50 poems of 14 lines, temperature 0.8, seed 0, to <run>/report; the data
    folder from the run's run_config.json; the window keeps half its tokens."""
    monkeypatch.setenv("GPT_SMALL_CACHE", str(tmp_path / "cache"))
    r = make_report(run)
    assert (r["samples"], r["lines"], r["seed"], r["temperature"]) == (50, 14, 0, 0.8)
    assert r["window_keep"] == GPTConfig.from_preset("tiny").block_size // 2
    assert r["out"] == str(run / "report") and (run / "report" / "report.md").is_file()
    assert r["data"] == str(data.directory)
    assert len(r["poems"]["model"]) == len(r["poems"]["corpus"]) == 50
    assert {len(p) for p in r["poems"]["corpus"]} == {14}
    ckpt = load_checkpoint(run)
    texts = generate_text(ckpt.model, ckpt.tokenizer, "", max_new_tokens=LINE_TOKEN_BUDGET * 14, lines=14,
                          num_samples=50, temperature=0.8, seed=0)
    assert r["poems"]["model"] == [t.split("\n")[:14] for t in texts]


def test_a_checkpoint_folder_reports_beside_itself_and_finds_its_runs_data(run, data, tmp_path, monkeypatch):
    """Given a checkpoint folder (runs/x/checkpoints/step-N), the report goes to step-N/report and
    the data folder is the one its run records (two folders up)."""
    step = tmp_path / "cöpy" / "checkpoints" / "step-000007"
    shutil.copytree((run / "last").resolve(), step)
    shutil.copy(run / "run_config.json", tmp_path / "cöpy" / "run_config.json")
    r = make_report(step, samples=1, lines=1)
    assert r["out"] == str(step / "report") and r["data"] == str(data.directory)
    # report.json is readable as it is: indented by one space, characters as they are, UTF-8
    text = (step / "report" / "report.json").read_text(encoding="utf-8")
    assert text.startswith('{\n "checkpoint": "') and f'"checkpoint": "{step}",' in text and "cöpy" in text


def test_data_given_is_read_and_a_run_without_a_data_folder_is_refused(run, data, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree((run / "last").resolve(), bare / "checkpoints" / "step-000007")
    (bare / "last").symlink_to("checkpoints/step-000007")
    with pytest.raises(GPTSmallError) as e:
        make_report(bare, samples=1, lines=1)
    assert str(e.value) == f"no --data given and {bare} records no data folder; pass --data"
    (bare / "run_config.json").write_text(json.dumps({"model": {}}))  # a run_config without its data
    with pytest.raises(GPTSmallError, match="records no data folder"):
        make_report(bare, samples=1, lines=1)
    r = make_report(bare, samples=1, lines=1, data=data.directory, out=tmp_path / "o")
    assert r["data"] == str(data.directory) and r["out"] == str(tmp_path / "o")


def test_data_of_another_tokenizer_is_refused(run, tmp_path, verse):
    (tmp_path / "other.txt").write_text(verse(60, seed=1) + "zqxj\n")  # other characters
    prepare(out=tmp_path / "other", text=tmp_path / "other.txt", tokenizer="char")
    with pytest.raises(GPTSmallError) as e:
        make_report(run, samples=1, lines=1, data=tmp_path / "other")
    assert str(e.value) == f"{tmp_path / 'other'} was prepared with another tokenizer than the checkpoint's"


@pytest.mark.parametrize("k, whole", [("len", True), ("len-1", False), (2, False)])
def test_eval_tokens_scores_the_start_of_the_split(run, data, tmp_path, k, whole):
    n = {"len": len(data.val), "len-1": len(data.val) - 1}.get(k, k)
    r = make_report(run, samples=1, lines=1, eval_tokens=n, out=tmp_path)
    assert r["model_eval"]["whole_split"] is whole
    assert r["model_eval"]["tokens"] == (len(data.val) if n is None else n) - 1
    part = f"over {r['model_eval']['tokens']:,} tokens ({'the whole split' if whole else 'the start of the split'})."
    assert part in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("kw, message", [
    (dict(samples=0), "samples must be"), (dict(samples=limits.MAX_REPORT_SAMPLES + 1), "samples must be"),
    (dict(lines=0), "lines must be"), (dict(lines=limits.MAX_LINES + 1), "lines must be"),
    (dict(seed=-1), "seed must be"), (dict(temperature=-0.5), "temperature"),
    (dict(eval_tokens=1), "eval_tokens must be"),
])
def test_each_setting_is_checked_before_any_work(tmp_path, kw, message):
    """A bad setting is refused in one line before the checkpoint is read; its edge value passes
    on to the checkpoint (which does not exist here)."""
    with pytest.raises(GPTSmallError, match=message) as e:
        make_report(tmp_path / "missing", **kw)
    assert "\n" not in str(e.value)
    edge = {"samples": {0: 1, limits.MAX_REPORT_SAMPLES + 1: limits.MAX_REPORT_SAMPLES},
            "lines": {0: 1, limits.MAX_LINES + 1: limits.MAX_LINES}, "seed": {-1: 0}, "temperature": {-0.5: 0.0},
            "eval_tokens": {1: 2}}
    (name, bad), = kw.items()
    with pytest.raises(GPTSmallError) as e:
        make_report(tmp_path / "missing", **{name: edge[name][bad]})
    assert str(tmp_path / "missing") in str(e.value) and message not in str(e.value)


def test_a_poem_line_gets_the_documented_token_budget(data, tmp_path):
    """A model that never ends a line: each poem stops at LINE_TOKEN_BUDGET (200) tokens per line
    asked for, one line of 200 characters for --lines 1 and of 400 for --lines 2."""
    tok = data.tokenizer
    model = _model(tok.vocab_size, tok.encode("\n")[0], newline_logit=-200.0)
    run = tmp_path / "run"
    save_checkpoint(run, step=1, model=model, tokenizer=tok, config={"model": model.config.to_dict()})
    assert LINE_TOKEN_BUDGET == 200
    for lines in (1, 2):
        r = make_report(run, samples=2, lines=lines, data=data.directory, out=tmp_path / "o", eval_tokens=40)
        assert [[len(line) for line in poem] for poem in r["poems"]["model"]] == [[200 * lines]] * 2


def test_the_window_keeps_what_window_keep_says(data, tmp_path):
    """Poems longer than the model's window (32 tokens) are sampled with the window kept as asked."""
    tok = data.tokenizer
    model = _model(tok.vocab_size, tok.encode("\n")[0], newline_logit=0.0, context=5.0)  # reads its context
    run = tmp_path / "run"
    save_checkpoint(run, step=1, model=model, tokenizer=tok, config={"model": model.config.to_dict()})
    r = make_report(run, samples=2, lines=14, data=data.directory, out=tmp_path / "o", eval_tokens=40, window_keep=5)
    assert r["window_keep"] == 5
    ckpt = load_checkpoint(run)
    sample = dict(max_new_tokens=LINE_TOKEN_BUDGET * 14, lines=14, num_samples=2, seed=0)
    texts = generate_text(ckpt.model, ckpt.tokenizer, "", keep=5, **sample)
    assert min(len(t) for t in texts) > 64  # the window moved on
    assert r["poems"]["model"] == [t.split("\n")[:14] for t in texts]
    assert generate_text(ckpt.model, ckpt.tokenizer, "", **sample) != texts  # the default keep samples others


def test_sampling_stops_at_the_last_line(run, tmp_path, monkeypatch):
    """The report samples only the lines it keeps: a poem of 2 short lines takes a few steps, not
    the 400 of its token budget."""
    import gpt_small.generate as generate

    steps = []
    real = generate.generate_tokens

    def counted(*a, **k):
        for step in real(*a, **k):
            steps.append(1)
            yield step

    monkeypatch.setattr(generate, "generate_tokens", counted)
    r = make_report(run, samples=2, lines=2, out=tmp_path / "o")
    longest = max(sum(len(line) + 1 for line in poem) for poem in r["poems"]["model"])  # tokens, newlines included
    assert len(steps) == longest < 100


def test_bits_per_char_use_the_datas_characters_per_token(tmp_path, verse):
    """With a byte-level BPE (several characters a token), bits/char = loss / ln 2 / characters per token."""
    import math

    (tmp_path / "poems.txt").write_text(verse(200, seed=5) * 2)
    prepare(out=tmp_path / "data", text=tmp_path / "poems.txt", tokenizer="bpe", vocab_size=300)
    data = PreparedData(tmp_path / "data")
    assert data.chars_per_token("val") > 1.5
    tok = data.tokenizer
    model = _model(tok.vocab_size, tok.encode("\n")[0])
    save_checkpoint(tmp_path / "run", step=1, model=model, tokenizer=tok, config={"model": model.config.to_dict()})
    r = make_report(tmp_path / "run", samples=1, lines=1, data=data.directory, out=tmp_path / "o")
    e = r["model_eval"]
    assert e["bits_per_char"] == pytest.approx(e["loss"] / math.log(2) / data.chars_per_token("val"))


def test_window_keep_is_checked_before_the_data_is_read(run, tmp_path):
    """The window of the tiny model is 32 tokens: 31 kept is the most, 32 is refused at once."""
    with pytest.raises(GPTSmallError, match="window keep must be half, slide or a number of tokens from 0 to 31"):
        make_report(run, samples=1, lines=1, window_keep=32, data=tmp_path / "none")
    with pytest.raises(GPTSmallError) as e:
        make_report(run, samples=1, lines=1, window_keep=31, data=tmp_path / "none")
    assert str(tmp_path / "none") in str(e.value) and "window keep" not in str(e.value)


def test_a_failed_plot_leaves_the_previous_report_whole(run, tmp_path, monkeypatch):
    out = tmp_path / "rep"
    make_report(run, samples=1, lines=1, out=out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(r, f):
        raise GPTSmallError("no room for the plot")

    monkeypatch.setattr("gpt_small.report.plot_report", broken)
    with pytest.raises(GPTSmallError, match="no room for the plot"):
        make_report(run, samples=1, lines=1, out=out, seed=9)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing replaced, no temporaries


def test_a_file_that_cannot_be_replaced_is_named_and_no_temporary_is_left(run, tmp_path):
    out = tmp_path / "rep"
    (out / "report.md").mkdir(parents=True)  # a folder where the Markdown goes: the rename fails
    (out / "report.md" / "x").write_text("")
    with pytest.raises(GPTSmallError) as e:
        make_report(run, samples=1, lines=1, out=out)
    assert str(out / "report.md") in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]


def test_the_index_goes_to_the_cache_folder_when_the_data_folder_cannot_hold_it(run, data, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT_SMALL_CACHE", str(tmp_path / "cache"))
    train, _ = split_texts(data)
    name = f"ngrams8-{hashlib.sha256(train.encode()).hexdigest()[:16]}.npz"
    copy = tmp_path / "data"
    shutil.copytree(data.directory, copy)
    for p in copy.glob("ngrams8-*.npz"):
        p.unlink()
    (copy / name).mkdir()  # the index's name is taken by a folder: it cannot be written there
    (copy / name / "x").write_text("")
    make_report(run, samples=1, lines=1, data=copy, out=tmp_path / "o")
    assert (tmp_path / "cache" / "ngrams" / name).is_file()
    assert np.load(tmp_path / "cache" / "ngrams" / name)["sorted_hash"].dtype == np.uint64
