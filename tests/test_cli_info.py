"""`gpt-small info` and the CLI shell: JSON output, the same defaults and config resolution as `train`,
one-line errors with exit code 2, `--help` listing every verb, and no torch import for a command that
only does arithmetic on a config."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpt_small.cli import VERBS, main
from gpt_small.config import PRESETS, GPTConfig
from gpt_small.config_sources import resolve_configs
from gpt_small.data import prepare


def test_info_json_gpt2(capsys):
    assert main(["info", "--preset", "gpt2-124m", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["preset"] == "gpt2-124m"
    assert out["params"] == 124_439_808
    assert out["non_embedding_params"] == 85_056_000
    assert out["config"] == GPTConfig.from_preset("gpt2-124m").to_dict()
    assert out["train_flops_per_token"] == GPTConfig.from_preset("gpt2-124m").flops_per_token()


def test_info_text(capsys):
    assert main(["info", "--preset", "gpt2-124m"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808" in out and "gelu" in out


def test_info_overrides(capsys):
    assert main(["info", "--preset", "tiny", "--pos", "rope", "--vocab-size", "100",
                 "--set", "n_layer=3", "--set", "qk_norm=true", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    cfg = GPTConfig.from_preset("tiny", pos_encoding="rope", vocab_size=100, n_layer=3, qk_norm=True)
    assert out["config"] == cfg.to_dict()
    assert out["params"] == cfg.num_params()


def test_info_defaults_are_trains(capsys):
    """No flags: the preset train picks without flags, with that preset's vocabulary."""
    assert main(["info", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    name, model, _ = resolve_configs()
    assert out["preset"] == name == "poem-cpu"
    assert out["config"] == model.to_dict()


def test_info_shows_the_model_train_builds(tmp_path, verse, capsys):
    """The same flags on `info` and `train` give the same model config: vocabulary from --data, the
    TOML file's preset and [model] table, flags, then --set."""
    (tmp_path / "poems.txt").write_text(verse(300), encoding="utf-8")
    prepare(out=tmp_path / "data", text=tmp_path / "poems.txt", tokenizer="char")
    (tmp_path / "c.toml").write_text('preset = "tiny"\n[model]\nn_embd = 48\n[train]\nbatch_size = 2\n'
                                     "threads = 1\nmax_steps = 1\nfinal_eval = false\n")
    flags = ["--data", str(tmp_path / "data"), "--config", str(tmp_path / "c.toml"), "--pos", "rope",
             "--set", "n_head=3"]
    assert main(["info", *flags, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert main(["train", *flags, "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    trained = json.loads((tmp_path / "run" / "run_config.json").read_text())["model"]
    assert info["preset"] == "tiny"
    assert info["config"] == trained
    assert trained["vocab_size"] != GPTConfig.from_preset("tiny").vocab_size  # it came from the data
    assert (trained["n_embd"], trained["n_head"], trained["pos_encoding"]) == (48, 3, "rope")


def _shows(cell: str, value: int) -> bool:
    """'151,798,784' exactly, or '21.8M' rounded to the digits shown."""
    number, millions = re.match(r"\s*\**([\d,.]+)(M?)", cell).groups()
    if millions:
        return f"{value / 1e6:.{len(number.partition('.')[2])}f}" == number
    return int(number.replace(",", "")) == value


def test_readme_presets_table_is_what_info_prints(capsys):
    """README's table: vocabulary 115 (eng-poem's characters, `--data data/eng-poem-char`), except
    `tiny` and `gpt2-124m` at their own."""
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    rows = [line.split("|")[1:-1] for line in readme.splitlines() if line.startswith("| `")]
    seen = set()
    for cells in rows:
        name = re.match(r"\s*`([^`]+)`", cells[0]).group(1)
        vocab = [] if name in ("tiny", "gpt2-124m") else ["--vocab-size", "115"]
        assert main(["info", "--preset", name, *vocab, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        c = out["config"]
        assert cells[1].strip() == f"{c['n_layer']} x {c['n_head']} x {c['n_embd']}", name
        assert int(cells[2]) == c["block_size"] and cells[3].strip() == c["pos_encoding"], name
        assert _shows(cells[5], out["params"]) and _shows(cells[6], out["train_flops_per_token"]), name
        seen.add(name)
    assert seen == set(PRESETS)


@pytest.mark.parametrize("argv, words", [
    (["info", "--preset", "nope"], ["nope", "tiny"]),
    (["info", "--preset", "tiny", "--set", "bogus=1"], ["bogus"]),
    (["info", "--preset", "tiny", "--set", "n_layer"], ["key=value"]),
    (["info", "--preset", "tiny", "--pos", "alibi"], ["pos_encoding", "alibi"]),
    (["info", "--preset", "tiny", "--set", "n_head=5"], ["n_embd"]),
    (["info", "--data", "no/such/folder"], ["no/such/folder", "does not exist"]),
])
def test_info_errors_are_one_line(capsys, argv, words):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("gpt-small info: error: ")
    assert all(w in lines[0] for w in words), lines[0]
    assert "Traceback" not in captured.err


def test_help_lists_every_verb(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "info" in out
    for verb in VERBS:
        assert verb in out, verb


def test_verb_help_and_usage_errors(capsys):
    with pytest.raises(SystemExit) as info:
        main(["info", "--help"])
    assert info.value.code == 0 and "--preset" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main([])  # a verb is required: argparse's usage error
    assert info.value.code == 2


def test_info_does_not_import_torch():
    code = ("import sys; from gpt_small.cli import main; rc = main(['info', '--preset', 'tiny', '--json']); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["params"] == GPTConfig.from_preset("tiny").num_params()
