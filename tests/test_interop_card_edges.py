"""The model card (README.md of an export) line by line, from hand-made run records: which
validation figure it quotes (the run's, for the exported step only; else evaluated; else why not),
the training command (recorded, made portable, or rebuilt from the configs: nearest preset and
`--set` for the rest), the data line, the snippet's length at the context's edge, and the
portable form of every path. No training: each case writes the records a run would leave.

Documented in docs/interop.md ("Export to transformers") and gpt_small/interop/model_card.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from gpt_small.checkpoint import Checkpoint
from gpt_small.config import GPTConfig
from gpt_small.interop.model_card import (
    equivalent_command,
    model_card,
    portable,
    portable_command,
    snippet_length,
)
from gpt_small.model import GPT
from gpt_small.tokenizer import CharTokenizer, gpt2_tokenizer

TEXT = "The sea, the moon and the stars.\nO wind that blows!\n"


@pytest.fixture(scope="module")
def char_tok() -> CharTokenizer:
    return CharTokenizer.train(TEXT)


def ckpt_in(run: Path, tok, step: int = 5, meta: dict | None = None, **overrides) -> Checkpoint:
    """A checkpoint at run/checkpoints/step-N (only the path matters to the card; nothing is written)."""
    cfg = GPTConfig(**{"block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 8, **overrides,
                       "vocab_size": tok.vocab_size})
    torch.manual_seed(0)
    return Checkpoint(path=run / "checkpoints" / f"step-{step:06d}", meta={"step": step, **(meta or {})},
                      model=GPT(cfg), tokenizer=tok)


def card(ckpt: Checkpoint, architecture: str = "gpt2", **kw) -> str:
    return model_card(ckpt, architecture=architecture, reason="why", dtype="float32", **{"evaluate": False, **kw})


def section(text: str, title: str) -> str:
    return text.split(f"## {title}\n\n")[1].split("\n\n## ")[0]


def write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------- the validation figure

FIG_A = {"loss": 1.23456, "bits_per_char": 1.78123, "tokens": 12345}
FIG_B = {"loss": 2.5, "bits_per_char": 3.6, "tokens": 999, "step": 5}


@pytest.mark.parametrize("summary, want", [
    ({"steps": 5, "final_val": FIG_A, "best_checkpoint_val": FIG_B}, FIG_A),  # the last step exported
    ({"steps": 9, "final_val": FIG_A, "best_checkpoint_val": FIG_B}, FIG_B),  # best (step 5) exported
    ({"steps": 9, "final_val": FIG_A, "best_checkpoint_val": {**FIG_B, "step": 4}}, None),  # neither is step 5
    ({"steps": 5, "final_val": None, "best_checkpoint_val": None}, None),
])
def test_the_card_quotes_the_runs_figure_for_the_exported_step_only(tmp_path, char_tok, summary, want):
    run = tmp_path / "runs" / "r"
    write(run / "summary.json", summary)
    text = section(card(ckpt_in(run, char_tok)), "Validation")
    if want:
        assert text == (f"Whole validation split, every token predicted once: {want['loss']:.4f} nats/token, "
                        f"perplexity {math.exp(want['loss']):.2f}, **{want['bits_per_char']:.4f} bits/char** over "
                        f"{want['tokens']:,} tokens (recorded by the training run (summary.json)).")
    else:
        assert text == ("Whole validation split: not measured: the run recorded no whole-split figure for this "
                        "step and export ran with --no-eval.")


def test_without_a_figure_the_card_says_why(tmp_path, char_tok):
    ckpt = ckpt_in(tmp_path / "runs" / "r", char_tok, meta={"data": {"directory": str(tmp_path / "gone")}})
    assert section(card(ckpt, evaluate=True), "Validation") == (
        "Whole validation split: not measured: the run recorded no whole-split figure for this step and its "
        "data folder is absent.")


# ---------------------------------------------------------------- how it was trained

def test_the_recorded_command_is_quoted_with_portable_paths_and_the_runs_figures(tmp_path, char_tok):
    run = tmp_path / "runs" / "r"
    write(run / "run_config.json", {"model": {}, "train": {}, "device": "cpu",
                                    "command": f"gpt-small train --data={tmp_path}/data/d --out {run} --text ~/p.txt"})
    write(run / "summary.json", {"steps": 1234, "tokens": 5678901, "wall_seconds": 61.6, "stopped_by": "max_steps"})
    assert section(card(ckpt_in(run, char_tok)), "How it was trained") == (
        "Command:\n\n```sh\ngpt-small train --data=data/d --out runs/r --text p.txt\n```\n\n"
        "1,234 steps, 5,678,901 tokens, 62 s, stopped by max_steps; device cpu.")


def test_an_equivalent_command_is_rebuilt_where_none_was_recorded(tmp_path, char_tok):
    run = tmp_path / "runs" / "r"
    tiny = {**GPTConfig().to_dict(), **GPTConfig.from_preset("tiny").to_dict()}
    write(run / "run_config.json", {"model": {**tiny, "vocab_size": 40, "qk_norm": True},
                                    "train": {"lr": 0.001, "max_steps": 7, "compile": True}, "data": "data/d"})
    assert section(card(ckpt_in(run, char_tok)), "How it was trained") == (
        "An equivalent command (rebuilt from run_config.json):\n\n```sh\n"
        f"gpt-small train --data data/d --out runs/r --preset tiny --set model.qk_norm=true "
        "--set train.max_steps=7 --set train.compile=true\n```")


def test_no_run_records_beside_a_checkpoint_folder(tmp_path, char_tok):
    ckpt = Checkpoint(path=tmp_path / "ckpt", meta={"step": 1}, model=ckpt_in(tmp_path, char_tok).model,
                      tokenizer=char_tok)
    text = card(ckpt)
    assert "\n# ckpt (gpt-small)\n" in text
    assert section(text, "How it was trained") == "No run folder records (run_config.json) beside this checkpoint."


@pytest.mark.parametrize("record, want", [
    ({"train": {"max_steps": 7}}, "--preset tiny --set train.max_steps=7"),  # no model section: the preset's own
    ({"model": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64}}, "--preset baby"),  # no train section
    ({"model": {"n_layer": 12}, "train": {}, "init_from": "runs/base"}, "--init-from runs/base"),  # no dropout recorded
])
def test_a_run_config_missing_a_section_is_rebuilt_from_what_it_holds(tmp_path, char_tok, record, want):
    run = tmp_path / "runs" / "r"
    write(run / "run_config.json", {**record, "data": "data/d"})
    assert section(card(ckpt_in(run, char_tok)), "How it was trained") == (
        f"An equivalent command (rebuilt from run_config.json):\n\n```sh\n"
        f"gpt-small train --data data/d --out runs/r {want}\n```")


@pytest.mark.parametrize("model, want", [
    ({}, "--preset tiny"),  # every field the preset's (or the default's)
    ({"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64}, "--preset baby"),
    ({"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128}, "--preset baby --set model.block_size=128"),
    ({"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256},  # shakespeare-char but its dropout
     "--preset shakespeare-char --set model.dropout=0.0"),
    ({"dropout": 0.1, "bias": False}, "--preset tiny --set model.dropout=0.1 --set model.bias=false"),
])
def test_the_rebuilt_command_takes_the_nearest_preset_and_sets_the_rest(model, want):
    base = {**GPTConfig().to_dict(), **GPTConfig.from_preset("tiny").to_dict()}
    got = equivalent_command({"model": {**base, "vocab_size": 99, **model}, "train": {}}, "/home/me/runs/x")
    assert got == f"gpt-small train --data DATA --out runs/x {want}"


def test_a_fine_tuned_run_is_rebuilt_with_init_from_and_its_dropout_only():
    got = equivalent_command({"model": {"n_layer": 12, "dropout": 0.2}, "train": {"seed": 1337, "lr": 0.0003},
                              "data": "/data/p", "init_from": "/home/me/runs/gpt2"}, "runs/ft")
    assert got == ("gpt-small train --data data/p --out runs/ft --init-from runs/gpt2 --set model.dropout=0.2 "
                   "--set train.lr=0.0003")


# ---------------------------------------------------------------- paths made portable

@pytest.mark.parametrize("path, folder, want", [
    ("data/d", "data", "data/d"),  # relative: as it is
    ("/srv/x/data/d", "data", "data/d"),
    ("/srv/x/d", "", "d"),
    ("~/corpora/poems.txt", "", "poems.txt"),
    ("/srv/runs/r/checkpoints/step-000005", "runs", "runs/r/checkpoints/step-000005"),
    ("/", "runs", "runs//"),
])
def test_portable_paths(path, folder, want):
    assert portable(path, folder) == want


@pytest.mark.parametrize("command, want", [
    ("gpt-small train --data /a/d --out=/b/runs/r --init-from /c/base --checkpoint /c/runs/x/checkpoints/step-000002",
     "gpt-small train --data data/d --out=runs/r --init-from runs/base --checkpoint runs/x/checkpoints/step-000002"),
    ("gpt-small prepare --text /home/me/p.txt", "gpt-small prepare --text p.txt"),
    ("gpt-small train --set train.lr=0.001 /abs/loose", "gpt-small train --set train.lr=0.001 loose"),
    ("gpt-small train --data 'unclosed", "gpt-small train --data 'unclosed"),  # not shell words: left as recorded
    ("gpt-small train --data=/srv/a=b/d --out=/srv/runs/x=y", "gpt-small train --data=data/d --out=runs/x=y"),
    ("/home/me/.venv/bin/gpt-small train --out /srv/r", "gpt-small train --out runs/r"),  # the program's own path
])
def test_portable_commands(command, want):
    assert portable_command(command) == want


# ---------------------------------------------------------------- the snippet at the context's edge

@pytest.mark.parametrize("block, architecture, want", [
    (100, "gpt2", ("The sea", 60)),  # room for all 60
    (67, "gpt2", ("The sea", 60)),  # exactly prompt + 60
    (66, "gpt2", ("The sea", 59)),
    (8, "gpt_neox", ("The sea", 1)),
    (7, "gpt2", ("The se", 1)),  # the prompt must leave one token to generate
    (2, "gpt2", ("T", 1)),
    (1, "gpt2", ("T", 1)),  # nothing shorter than one character
    (2, "gpt_small", ("The sea", 60)),  # the remote code slides past the context
])
def test_the_snippet_asks_for_what_the_context_holds(tmp_path, char_tok, block, architecture, want):
    assert snippet_length(ckpt_in(tmp_path, char_tok, block_size=block), architecture) == want


# ---------------------------------------------------------------- data, tokenizer, header

def test_the_data_line_from_the_data_folders_meta(tmp_path, char_tok):
    data = tmp_path / "data" / "d"
    meta = {"source_kind": "text", "source": "/home/me/poems.txt", "source_bytes": 123456, "source_lines": 7890,
            "source_sha256": "ab12", "val_fraction": 0.05, "train_tokens": 100000, "val_tokens": 5000,
            "val_chars_per_token": 1.0}
    write(data / "meta.json", meta)
    ckpt = ckpt_in(tmp_path / "runs" / "r", char_tok, meta={"data": {"directory": str(data)}})
    assert section(card(ckpt), "Training data") == (
        "`poems.txt` (123,456 bytes, 7,890 lines, sha256 ab12), split by lines, validation the last 5% of the lines "
        "(val_fraction 0.05): 100,000 training and 5,000 validation tokens (1.000 characters per token).")
    write(data / "meta.json", {**meta, "source_kind": "corpus", "source": "eng-poem", "val_fraction": None})
    text = card(ckpt)
    assert section(text, "Training data").startswith("`eng-poem` (123,456 bytes, 7,890 lines, sha256 ab12), split by "
                                                     "lines, validation by lines: ")
    assert "tags: [gpt-small, text-generation, char-tokenizer, poetry, english]\n" in text
    (data / "meta.json").unlink()
    assert section(card(ckpt), "Training data") == (
        "Prepared data folder `data/d` (its meta.json is not on this machine).")


def test_the_header_architecture_and_tokenizer_lines(tmp_path, char_tok):
    ckpt = ckpt_in(tmp_path / "runs" / "poem", char_tok, step=7, ngram=3, qk_norm=True, bias=False)
    text = model_card(ckpt, architecture="gpt_small", reason="QK-norm: why", dtype="bfloat16", evaluate=False)
    n = ckpt.model.num_params()
    assert text.startswith(
        "---\nlibrary_name: transformers\npipeline_tag: text-generation\nlicense: other\n"
        "tags: [gpt-small, text-generation, char-tokenizer]\n---\n\n# poem (gpt-small)\n\n"
        f"A 1-layer, 2-head, 8-wide decoder-only transformer ({n:,} parameters, 16-token context), trained with "
        "gpt-small and exported with `gpt-small export` at step 7; weights in bfloat16.\n\n## Architecture\n\n"
        "- transformers class: GPTSmallForCausalLM, from this folder's modeling_gpt_small.py (QK-norm: why)\n"
        "- positions learned, activation relu, biases False, tied head True, QK-norm True, n-gram tables 3\n")
    assert 'from_pretrained("DIR", trust_remote_code=True)' in text
    assert section(text, "Tokenizer") == (
        f"Characters: {char_tok.vocab_size} ids, one per character of the training split and one for unknown "
        "characters (U+FFFD, never generated).")
    assert "n-gram tables none" in card(ckpt_in(tmp_path / "runs" / "p2", char_tok))
    assert "n-gram tables 2\n" in card(ckpt_in(tmp_path / "runs" / "p3", char_tok, ngram=2), "gpt_small")  # bigrams
    gpt2 = card(ckpt_in(tmp_path / "runs" / "g", gpt2_tokenizer()))
    assert section(gpt2, "Tokenizer").startswith("OpenAI's GPT-2 byte-level BPE (50,257 tokens); `<|endoftext|>` is ")
    assert 'from_pretrained("DIR")' in gpt2 and "trust_remote_code" not in gpt2
    assert "- Generation stops at `<|endoftext|>` (id 50256, the EOS in config.json" in gpt2
    assert f"- A small model ({ckpt.model.num_params():,} parameters) trained on one text" in text


# ---------------------------------------------------------------- the snippet, limitations and licence as written

@pytest.mark.parametrize("architecture, trust, new_tokens", [
    ("gpt2", "", 14), ("gpt_neox", "", 14), ("gpt_small", ", trust_remote_code=True", 60)])
def test_the_snippet_as_written(tmp_path, char_tok, architecture, trust, new_tokens):
    text = card(ckpt_in(tmp_path / "runs" / "r", char_tok, block_size=21), architecture)
    assert section(text, "Architecture").split("\n\n", 1)[1] == (
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline\n"
        f'model = AutoModelForCausalLM.from_pretrained("DIR"{trust})\n'
        f'tokenizer = AutoTokenizer.from_pretrained("DIR"{trust})\n'
        'print(pipeline("text-generation", model=model, tokenizer=tokenizer)(\'The sea\', '
        f'max_new_tokens={new_tokens})[0]["generated_text"])\n'
        "```")


COMMON_LIMITS = (
    "- Sampling by default at temperature 0.8, no top-k or top-p (generation_config.json); pass `do_sample=False` "
    "for greedy text.\n"
    "- A small model ({n:,} parameters) trained on one text: it continues text in that text's manner, knows nothing "
    "reliable and follows no instructions. Not evaluated for bias or safety.\n"
    "- Other runtimes: see gpt-small's docs/interop.md; `gpt-small export --target vllm|llama.cpp` refuses a model "
    "that runtime would compute differently.")
CONTEXT = {
    "gpt2": ("- **Context: 21 tokens, prompt included.** GPT-2's position table ends there: transformers raises "
             "`IndexError` when it must read more than 21 tokens, i.e. when prompt + `max_new_tokens` exceeds 22 (the "
             "last token is generated, never read); `gpt-small generate` slides its window instead. Without "
             "`max_new_tokens`, generation_config.json stops at 21 tokens (`max_length`). For a longer prompt, pass "
             "`handle_long_generation=\"hole\"` to the pipeline: it keeps the prompt's last 21 - `max_new_tokens` "
             "tokens."),
    "gpt_neox": ("- **Context: 21 tokens, prompt included.** Past it GPT-NeoX keeps rotating into positions the model "
                 "never trained on (`gpt-small generate` slides its window instead); keep prompt + `max_new_tokens` "
                 "within 21. Without `max_new_tokens`, generation_config.json stops at 21 tokens (`max_length`)."),
    "gpt_small": ("- **Context: 21 tokens.** Past it this folder's code slides its window one token at a time (each "
                  "new token sees the last 21), as `gpt-small generate --window-keep slide` does; it has no KV cache "
                  "and no padding."),
}


@pytest.mark.parametrize("architecture", CONTEXT)
@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_the_limitations_as_written_for_each_architecture_and_end_of_text(tmp_path, char_tok, architecture, tokenizer):
    tok = char_tok if tokenizer == "char" else gpt2_tokenizer()
    ckpt = ckpt_in(tmp_path / "runs" / "r", tok, block_size=21)
    stop = ("- No end-of-text token (the tokenizer has none): generation runs to `max_new_tokens`."
            if tokenizer == "char" else
            "- Generation stops at `<|endoftext|>` (id 50256, the EOS in config.json, generation_config.json and the "
            "tokenizer files; `gpt-small generate` does not stop there).")
    assert section(card(ckpt, architecture), "Limitations") == "\n".join(
        [CONTEXT[architecture], stop, COMMON_LIMITS.format(n=ckpt.model.num_params())])


def test_the_licence_section_as_written(tmp_path, char_tok):
    text = card(ckpt_in(tmp_path / "runs" / "r", char_tok))
    assert text.endswith(
        "\n\n## Licence\n\ngpt-small, the code that trained and exported this model, is MIT-licensed. The weights "
        "carry no licence chosen by gpt-small (`license: other` above): whoever trained them sets one before sharing, "
        "within the terms of the training text.\n")
    assert text.count("\n## ") == 7  # Architecture, Tokenizer, Training data, Validation, trained, Limitations, Licence


@pytest.mark.parametrize("tokenizer, line, tag", [
    ("gpt2", "OpenAI's GPT-2 byte-level BPE (50,257 tokens); `<|endoftext|>` is the EOS token, while the same text "
             "inside a prompt is encoded as ordinary characters, as gpt-small does.", "gpt2-tokenizer"),
    ("bpe", "A byte-level BPE of {n:,} tokens learned on the training split.", "bpe-tokenizer"),
])
def test_the_tokenizer_line_and_tag_of_each_bpe(tmp_path, tokenizer, line, tag):
    from gpt_small.tokenizer import train_bpe

    tok = gpt2_tokenizer() if tokenizer == "gpt2" else train_bpe(TEXT * 50, vocab_size=300)
    text = card(ckpt_in(tmp_path / "runs" / "r", tok))
    assert section(text, "Tokenizer") == line.format(n=tok.vocab_size)
    assert f"tags: [gpt-small, text-generation, {tag}]\n" in text


# ---------------------------------------------------------------- tags, data lines at their edges

@pytest.mark.parametrize("meta, poetry", [
    ({"source_kind": "corpus", "source": "eng-poem"}, True),
    ({"source_kind": "corpus", "source": "gutenberg-poetry"}, True),
    ({"source_kind": "corpus", "source": "tinyshakespeare"}, False),  # a corpus, not of verse
    ({"source_kind": "text", "source": "eng-poem"}, False),  # a user's file that happens to be named so
    ({"source": "eng-poem"}, False),
    (None, False),
])
def test_poetry_tags_only_for_the_built_in_verse_corpora(meta, poetry):
    from gpt_small.interop.model_card import tags

    assert tags(meta, "char") == ["gpt-small", "text-generation", "char-tokenizer"] + (
        ["poetry", "english"] if poetry else [])


def test_the_data_line_of_a_meta_json_missing_its_figures(tmp_path, char_tok):
    """An older or hand-made meta.json: each missing figure read as none, never a crash."""
    data = tmp_path / "data" / "d"
    write(data / "meta.json", {"source_kind": "text"})
    ckpt = ckpt_in(tmp_path / "runs" / "r", char_tok, meta={"data": {"directory": str(data)}})
    assert section(card(ckpt), "Training data") == (
        "`?` (0 bytes, 0 lines, sha256 ?), split by lines, validation by lines: 0 training and 0 validation tokens "
        "(nan characters per token).")
    write(data / "meta.json", {"source_kind": "corpus"})
    assert section(card(ckpt), "Training data").startswith("`?` (0 bytes")


def test_an_imported_and_a_fine_tuned_checkpoint_name_where_they_came_from(tmp_path, char_tok):
    data = tmp_path / "data" / "d"
    write(data / "meta.json", {"source_kind": "corpus", "source": "eng-poem"})
    imported = ckpt_in(tmp_path / "runs" / "r", char_tok, meta={"imported_from": "/home/me/hub/gpt2-medium",
                                                                 "data": {"directory": str(data)}})
    assert section(card(imported), "Training data") == (
        "Imported from the transformers folder `gpt2-medium` (`gpt-small import`); its training data is that model's.")
    tuned = ckpt_in(tmp_path / "runs" / "ft", char_tok, meta={"init_from": "/home/me/runs/base/checkpoints/step-000009"})
    assert section(card(tuned), "Training data") == (
        "Prepared data folder `unknown` (its meta.json is not on this machine).\n"
        "Fine-tuned from `runs/base/checkpoints/step-000009`.")
    assert section(card(ckpt_in(tmp_path / "runs" / "x", char_tok, meta={"data": {"directory": "/srv/data/gone"}})),
                   "Training data") == "Prepared data folder `data/gone` (its meta.json is not on this machine)."


@pytest.mark.parametrize("recorded", ["absolute", "relative"])
def test_the_data_folder_is_found_as_recorded_or_beside_the_runs_folder(tmp_path, char_tok, monkeypatch, recorded):
    """A relative data path is read from the working folder first, else from the folder that holds
    the run's runs/ (a run recorded `--data data/d` in its project folder, exported from elsewhere)."""
    project = tmp_path / "project"
    write(project / "data" / "d" / "meta.json", {"source_kind": "corpus", "source": "eng-poem"})
    monkeypatch.chdir(tmp_path)  # holds no data/d
    directory = str(project / "data" / "d") if recorded == "absolute" else "data/d"
    ckpt = ckpt_in(project / "runs" / "r", char_tok, meta={"data": {"directory": directory}})
    assert section(card(ckpt), "Training data").startswith("`eng-poem` (0 bytes")
    write(tmp_path / "data" / "d" / "meta.json", {"source_kind": "corpus", "source": "gutenberg-poetry"})
    want = "`gutenberg-poetry` (" if recorded == "relative" else "`eng-poem` ("  # the working folder's first
    assert section(card(ckpt), "Training data").startswith(want)
    alone = Checkpoint(path=tmp_path / "elsewhere" / "ckpt", meta={"step": 1, "data": {"directory": "data/e"}},
                       model=ckpt.model, tokenizer=char_tok)  # a checkpoint folder outside any run
    write(tmp_path / "elsewhere" / "data" / "e" / "meta.json", {"source_kind": "text"})
    assert section(card(alone), "Training data") == (
        "Prepared data folder `data/e` (its meta.json is not on this machine).")


# ---------------------------------------------------------------- records the card can go without

@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "null"])
def test_a_damaged_summary_or_run_config_is_read_as_absent(tmp_path, char_tok, content):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(content)
    (run / "run_config.json").write_text(content)
    text = card(ckpt_in(run, char_tok))
    assert section(text, "Validation") == ("Whole validation split: not measured: the run recorded no whole-split "
                                           "figure for this step and export ran with --no-eval.")
    assert section(text, "How it was trained") == "No run folder records (run_config.json) beside this checkpoint."


def test_a_run_config_without_a_summary_quotes_the_command_alone(tmp_path, char_tok):
    run = tmp_path / "runs" / "r"
    write(run / "run_config.json", {"model": {}, "train": {}, "command": "gpt-small train --data data/d"})
    assert section(card(ckpt_in(run, char_tok)), "How it was trained") == (
        "Command:\n\n```sh\ngpt-small train --data data/d\n```")
    write(run / "summary.json", {"stopped_by": "max_time"})  # a summary without figures: each read as 0
    assert section(card(ckpt_in(run, char_tok)), "How it was trained").endswith(
        "\n\n0 steps, 0 tokens, 0 s, stopped by max_time; device ?.")


# ---------------------------------------------------------------- evaluated at export

@pytest.fixture(scope="module")
def gpt2_data(tmp_path_factory) -> Path:
    """A small prepared-data folder of the gpt2 tokenizer (several characters per token)."""
    from gpt_small.data import prepare

    root = tmp_path_factory.mktemp("gpt2-data")
    (root / "poems.txt").write_text("".join(f"The sea, line {i}, and the moon above it.\n" for i in range(60)))
    prepare(out=root / "data", text=root / "poems.txt", tokenizer="gpt2")
    return root / "data"


@pytest.mark.parametrize("kind", ["char", "gpt2"])
def test_the_card_evaluates_the_exported_step_on_the_whole_validation_split(tmp_path, verse_data, gpt2_data, kind):
    """No figure recorded for the step: the card scores the validation split with the model's own
    context, and quotes bits per character of that split (its own characters per token)."""
    from gpt_small.data import PreparedData
    from gpt_small.evaluate import evaluate_tokens

    folder = verse_data if kind == "char" else gpt2_data
    data = PreparedData(folder)
    assert (data.chars_per_token("val") == 1.0) == (kind == "char")
    ckpt = ckpt_in(tmp_path / "runs" / "r", data.tokenizer, block_size=32, meta={"data": {"directory": str(folder)}})
    write(tmp_path / "runs" / "r" / "summary.json", {"steps": 9, "final_val": FIG_A})  # another step's figure
    want = evaluate_tokens(ckpt.model, data.val, context=32, chars_per_token=data.chars_per_token("val"))
    assert want.tokens == len(data.val) - 1
    assert section(card(ckpt, evaluate=True), "Validation") == (
        f"Whole validation split, every token predicted once: {want.loss:.4f} nats/token, perplexity "
        f"{math.exp(want.loss):.2f}, **{want.bits_per_char:.4f} bits/char** over {want.tokens:,} tokens (evaluated at "
        f"export on data/{folder.name}/val.bin).")


def test_a_data_folder_of_another_tokenizer_is_not_evaluated_and_the_card_says_so(tmp_path, char_tok, verse_data):
    ckpt = ckpt_in(tmp_path / "runs" / "r", char_tok, meta={"data": {"directory": str(verse_data)}})
    assert section(card(ckpt, evaluate=True), "Validation") == (
        "Whole validation split: not measured: the run recorded no whole-split figure for this step and its data "
        f"folder (data/{verse_data.name}) now holds another tokenizer's tokens.")
