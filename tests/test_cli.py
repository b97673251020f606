"""The CLI as a user meets it: generate from a checkpoint, the `poem` job end to end, bad input."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from gpt_small.cli import main
from gpt_small.data import prepare

WORDS = "The sea O moon When I night star love heart dream rose wind song light over under and, the".split()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    rng = random.Random(1)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) for _ in range(1200)]
    (root / "poems.txt").write_text("\n".join(lines) + "\n")
    prepare(out=root / "data", text=root / "poems.txt", tokenizer="char")
    (root / "tiny.toml").write_text(
        'preset = "tiny"\n[model]\nblock_size = 32\n[train]\nbatch_size = 4\nthreads = 1\n'
        "eval_interval = 20\neval_batches = 2\nwarmup_steps = 5\nmax_steps = 40\nfinal_eval = false\n")
    assert main(["train", "--data", str(root / "data"), "--out", str(root / "run"), "--config",
                 str(root / "tiny.toml"), "--no-progress"]) == 0
    return root


def test_generate_streams_and_stops_after_lines(workspace, capsys):
    code = main(["generate", "--checkpoint", str(workspace / "run"), "--prompt", "The sea", "--lines", "2",
                 "--seed", "3", "--max-new-tokens", "400"])
    captured = capsys.readouterr()
    assert code == 0 and captured.err == ""  # no note: the two lines came before the token cap
    assert captured.out.startswith("The sea")
    sample = captured.out[len("The sea"):-1]  # print() ends the streamed sample with one more newline
    # exactly two verse lines: the rest of the prompt's line and one more, each ended by its newline
    assert sample.endswith("\n") and sample.count("\n") == 2
    assert sample.replace("\n", "").strip()  # text was generated, not only line breaks
    assert "\ufffd" not in sample  # the <unk> id is never sampled


def test_generate_says_when_max_new_tokens_cut_the_lines_short(workspace, capsys):
    code = main(["generate", "--checkpoint", str(workspace / "run"), "--prompt", "The sea", "--lines", "3",
                 "--seed", "3", "--max-new-tokens", "5"])
    captured = capsys.readouterr()
    assert code == 0 and captured.out.startswith("The sea")
    assert captured.err == ("note: the sample reached --max-new-tokens 5 before its 3 lines; "
                            "pass a larger --max-new-tokens\n")


@pytest.mark.parametrize("flags, cap", [([], 500), (["--lines", "12"], 2400), (["--lines", "12", "--max-new-tokens", "30"], 30)])
def test_generate_token_cap_leaves_room_for_the_lines(workspace, capsys, monkeypatch, flags, cap):
    """A 12-line poem of a char model runs past 500 tokens: --lines raises the default cap."""
    import gpt_small.generate

    seen = {}

    def fake_generate_text(model, tokenizer, prompt, *, max_new_tokens, **kw):
        seen["cap"] = max_new_tokens
        return [prompt + "\n" * 12]

    monkeypatch.setattr(gpt_small.generate, "generate_text", fake_generate_text)
    assert main(["generate", "--checkpoint", str(workspace / "run"), "--no-stream", *flags]) == 0
    assert seen["cap"] == cap
    assert capsys.readouterr().err == ""


def test_generate_same_seed_same_text(workspace, capsys):
    args = ["generate", "--checkpoint", str(workspace / "run"), "--max-new-tokens", "60", "--seed", "5",
            "--num-samples", "2"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first
    assert "--- sample 2 ---" in first


def _one_line_error(capsys, verb: str) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"gpt-small {verb}: error:") and captured.err.count("\n") == 1
    return captured.err


def test_generate_unknown_prompt_character(workspace, capsys):
    assert main(["generate", "--checkpoint", str(workspace / "run"), "--prompt", "The §"]) == 2
    assert "'§'" in _one_line_error(capsys, "generate")


def test_generate_missing_checkpoint(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "not found" in _one_line_error(capsys, "generate")


def test_generate_corrupt_checkpoint(workspace, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree((workspace / "run" / "last").resolve(), bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["generate", "--checkpoint", str(bad)]) == 2
    assert "corrupt" in _one_line_error(capsys, "generate")


def test_checkpoint_of_another_format_version(workspace, tmp_path, capsys):
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree((workspace / "run" / "last").resolve(), old)
    meta = json.loads((old / "config.json").read_text())
    meta["format_version"] = 99
    (old / "config.json").write_text(json.dumps(meta))
    assert main(["generate", "--checkpoint", str(old)]) == 2
    assert "format 99" in _one_line_error(capsys, "generate")


def test_bad_sampling_flags(workspace, capsys):
    assert main(["generate", "--checkpoint", str(workspace / "run"), "--temperature", "-1"]) == 2
    assert "temperature" in _one_line_error(capsys, "generate")


def test_poem_job_trains_once_then_reuses(workspace, tmp_path, capsys):
    args = ["poem", "--data", str(workspace / "data"), "--out", str(tmp_path / "poem"), "--config",
            str(workspace / "tiny.toml"), "--minutes", "0.05"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[1/3] prepared data: reusing" in out
    assert "--- poem 3 ---" in out and "gpt-small generate --checkpoint" in out
    assert (tmp_path / "poem" / "last").exists()
    assert main(args) == 0
    assert "reusing the finished run" in capsys.readouterr().out


def test_poem_rejects_a_non_positive_budget(workspace, tmp_path, capsys):
    assert main(["poem", "--data", str(workspace / "data"), "--out", str(tmp_path / "p"), "--minutes", "0"]) == 2
    assert "--minutes" in _one_line_error(capsys, "poem")


def test_poem_on_text_without_the_prompt_characters_starts_from_a_new_line(workspace, tmp_path, capsys):
    (tmp_path / "lower.txt").write_text("\n".join(["the sea and the moon over the night"] * 400) + "\n")
    prepare(out=tmp_path / "data", text=tmp_path / "lower.txt", tokenizer="char")
    args = ["poem", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "poem"), "--config",
            str(workspace / "tiny.toml"), "--minutes", "0.02"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "has characters this model never saw; starting from a new line" in out
    assert "--- poem 3 ---" in out


@pytest.mark.parametrize("flags", [["--syllable-tolerance", "-1"], ["--candidates", "0"], ["--budget", "3"],
                                   ["--form-meta", "meta.json"]])
def test_verse_form_flag_without_a_form_is_refused(workspace, flags, capsys):
    # alone these once ran a plain sample and ignored the flag (and its bad value) without a word
    assert main(["generate", "--checkpoint", str(workspace / "run"), "--max-new-tokens", "5", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flags[0] in err[0] and "verse forms only" in err[0]


def test_verse_form_max_new_tokens_below_two_names_the_flag(workspace, capsys):
    assert main(["generate", "--checkpoint", str(workspace / "run"), "--rhyme", "AA", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-new-tokens" in err[0] and "got 1" in err[0]
