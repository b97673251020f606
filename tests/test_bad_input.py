"""Every verb's bad input in one table: (argv, exit code, a phrase of the one-line message).

The promise tested: bad input gets ONE line on stderr naming the problem and exit code 2, never a
traceback, and nothing on stdout before it (generate validates everything before printing). The
cases run in-process through `cli.main` (fast); `test_some_cases_as_real_processes` runs a few
through the installed `gpt-small` script to show the in-process runs stand for the real thing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt_small.cli import main

TINY = ["--preset", "tiny", "--block-size", "16", "--batch-size", "2", "--max-steps", "4", "--eval-interval", "2",
        "--eval-batches", "1", "--threads", "1", "--final-eval", "false", "--no-progress"]

# (id, argv with {placeholders}, exit code, phrase)
CASES: list[tuple[str, str, int, str]] = [
    # ---- prepare
    ("prepare-no-source", "prepare --out {tmp}/p", 2, "exactly one text source"),
    ("prepare-two-sources", "prepare --corpus eng-poem --text {poems} --out {tmp}/p", 2, "exactly one text source"),
    ("prepare-missing-text", "prepare --text {tmp}/nope.txt --out {tmp}/p", 2, "does not exist"),
    ("prepare-empty-text", "prepare --text {bad}/empty.txt --out {tmp}/p", 2, "is empty"),
    ("prepare-latin1-text", "prepare --text {bad}/latin1.txt --out {tmp}/p", 2, "not UTF-8"),
    ("prepare-binary-text", "prepare --text {bad}/binary.txt --out {tmp}/p", 2, "binary file"),
    ("prepare-folder-no-txt", "prepare --text {bad}/no-txt --out {tmp}/p", 2, "holds no .txt files"),
    ("prepare-unknown-tokenizer", "prepare --text {poems} --tokenizer word --out {tmp}/p", 2, "unknown tokenizer"),
    ("prepare-unknown-corpus", "prepare --corpus shakespeare --out {tmp}/p", 2, "unknown corpus"),
    ("prepare-val-fraction-0", "prepare --text {poems} --val-fraction 0 --out {tmp}/p", 2, "val_fraction"),
    ("prepare-val-fraction-1.5", "prepare --text {poems} --val-fraction 1.5 --out {tmp}/p", 2, "val_fraction"),
    ("prepare-val-fraction-nan", "prepare --text {poems} --val-fraction nan --out {tmp}/p", 2, "val_fraction"),
    ("prepare-val-fraction-text", "prepare --text {poems} --val-fraction half --out {tmp}/p", 2, "invalid float"),
    ("prepare-vocab-size-text", "prepare --text {poems} --tokenizer bpe --vocab-size many --out {tmp}/p", 2,
     "invalid int"),
    ("prepare-char-vocab-size", "prepare --text {poems} --vocab-size 100 --out {tmp}/p", 2, "for the bpe tokenizer"),
    ("prepare-gpt2-vocab-size", "prepare --text {poems} --tokenizer gpt2 --vocab-size 100 --out {tmp}/p", 2,
     "does not apply"),
    ("prepare-existing-no-force", "prepare --text {poems} --out {data}", 2, "use --force"),
    ("prepare-foreign-folder", "prepare --text {poems} --out {busy}", 2, "not empty and holds no prepared data"),
    ("prepare-out-is-file", "prepare --text {poems} --out {poems}", 2, "not a folder"),
    ("prepare-out-under-file", "prepare --text {poems} --out {poems}/sub", 2, "not a directory"),
    ("prepare-tiny-text", "prepare --text {tinytext} --out {tmp}/p", 2, "text too small"),
    ("prepare-unknown-flag", "prepare --text {poems} --colour red", 2, "unrecognized arguments"),
    # ---- train
    ("train-no-data", "train --out {tmp}/r", 2, "--data is required"),
    ("train-missing-data", "train --data {tmp}/nope --out {tmp}/r", 2, "does not exist"),
    ("train-unprepared-data", "train --data {bad} --out {tmp}/r", 2, "holds no meta.json"),
    ("train-lr-inf", "train --data {data} --out {tmp}/r --set lr=inf", 2, "lr must be a finite number"),
    ("train-lr-nan", "train --data {data} --out {tmp}/r --lr nan", 2, "lr must be a finite number"),
    ("train-rope-theta-inf", "train --data {data} --out {tmp}/r --rope-theta inf", 2, "rope_theta must be a finite"),
    ("train-max-time-neg-space", "train --data {data} --out {tmp}/r --max-time -5m", 2, "max_time must be >= 0"),
    ("train-max-time-neg-equals", "train --data {data} --out {tmp}/r --max-time=-5m", 2, "max_time must be >= 0"),
    ("train-max-time-garbage", "train --data {data} --out {tmp}/r --max-time 5x", 2, "max_time must look like"),
    ("train-max-time-set-neg", "train --data {data} --out {tmp}/r --set max_time=-1", 2, "max_time must be >= 0"),
    ("train-n-layer-0", "train --data {data} --out {tmp}/r --n-layer 0", 2, "n_layer must be an integer >= 1"),
    ("train-n-layer-neg", "train --data {data} --out {tmp}/r --n-layer -2", 2, "n_layer must be an integer >= 1"),
    ("train-heads-divide", "train --data {data} --out {tmp}/r --preset tiny --n-embd 33", 2, "must be divisible"),
    ("train-pos-unknown", "train --data {data} --out {tmp}/r --pos polar", 2, "pos_encoding must be one of"),
    ("train-device-tpu", "train --data {data} --out {tmp}/r --device tpu", 2, "device must be auto, cpu, mps"),
    ("train-threads-neg", "train --data {data} --out {tmp}/r --threads -1", 2, "threads must be an integer >= 0"),
    ("train-batch-float", "train --data {data} --out {tmp}/r --batch-size 1.5", 2, "batch_size must be an integer"),
    ("train-dropout-1", "train --data {data} --out {tmp}/r --dropout 1", 2, "dropout must be in [0, 1)"),
    ("train-dtype-unknown", "train --data {data} --out {tmp}/r --dtype float8", 2, "dtype must be one of"),
    ("train-bool-garbage", "train --data {data} --out {tmp}/r --compile maybe", 2, "compile must be true or false"),
    ("train-set-unknown", "train --data {data} --out {tmp}/r --set nope=1", 2, "unknown --set key"),
    ("train-set-no-equals", "train --data {data} --out {tmp}/r --set lr", 2, "--set expects key=value"),
    ("train-preset-unknown", "train --data {data} --out {tmp}/r --preset huge", 2, "unknown preset"),
    ("train-config-missing", "train --data {data} --out {tmp}/r --config {tmp}/nope.toml", 2, "config file not found"),
    ("train-config-latin1", "train --data {data} --out {tmp}/r --config {latin1_toml}", 2, "not UTF-8"),
    ("train-config-bad-toml", "train --data {data} --out {tmp}/r --config {bad_toml}", 2, "not valid TOML"),
    ("train-config-section", "train --data {data} --out {tmp}/r --config {section_toml}", 2, "unknown section"),
    ("train-block-too-big", "train --data {data} --out {tmp}/r --preset tiny --block-size 100000", 2,
     "fewer than one window"),
    ("train-existing-run", "train --data {data} --out {run} --preset tiny", 2, "already holds a run"),
    ("train-resume-empty", "train --data {data} --out {tmp}/empty --resume", 2, "holds no checkpoint to resume"),
    ("train-resume-n-layer", "train --out {run} --resume --n-layer 3", 2,
     "--n-layer would change n_layer from 2 (the run's) to 3"),
    ("train-resume-lr", "train --out {run} --resume --lr 0.5", 2, "--lr would change lr from"),
    ("train-resume-set-seed", "train --out {run} --resume --set seed=1", 2, "--set seed would change seed from"),
    ("train-resume-preset", "train --out {run} --resume --preset baby", 2, "--preset baby would change"),
    ("train-resume-other-tokenizer", "train --out {run} --resume --data {other_data}", 2, "tokenizer"),
    ("train-resume-other-data", "train --out {run} --resume --data {data_copy}", 2, "--data would change the data"),
    ("train-out-under-file", "train --data {data} --out {poems}/run", 2, "not a directory"),
    ("train-cuda-missing", "train --data {data} --out {tmp}/r --device cuda " + " ".join(TINY), 2, "no CUDA GPU"),
    # ---- generate
    ("generate-missing-ckpt", "generate --checkpoint {tmp}/nope", 2, "checkpoint not found"),
    ("generate-not-a-ckpt", "generate --checkpoint {bad}", 2, "holds no checkpoint"),
    ("generate-temperature-neg", "generate --checkpoint {run} --temperature -1", 2, "temperature must be"),
    ("generate-temperature-inf", "generate --checkpoint {run} --temperature inf", 2, "temperature must be a finite"),
    ("generate-top-p-2", "generate --checkpoint {run} --top-p 2", 2, "top_p must be a finite number in (0, 1]"),
    ("generate-top-k-0", "generate --checkpoint {run} --top-k 0", 2, "top_k must be an integer >= 1"),
    ("generate-penalty-0", "generate --checkpoint {run} --repetition-penalty 0", 2, "repetition_penalty must be"),
    ("generate-samples-0", "generate --checkpoint {run} --num-samples 0", 2, "--num-samples must be an integer >= 1"),
    ("generate-max-new-0", "generate --checkpoint {run} --max-new-tokens 0", 2, "--max-new-tokens must be an integer >= 1"),
    ("generate-lines-neg", "generate --checkpoint {run} --lines -1", 2, "--lines must be an integer >= 1"),
    ("generate-stop-empty", "generate --checkpoint {run} --stop=", 2, "--stop must be a non-empty"),
    ("generate-device-tpu", "generate --checkpoint {run} --device tpu", 2, "device must be auto, cpu, mps"),
    ("generate-device-cuda", "generate --checkpoint {run} --device cuda", 2, "no CUDA GPU"),
    ("generate-unknown-char", "generate --checkpoint {run} --prompt \u65e5\u672c", 2, "\u65e5"),
    ("generate-prompt-file-missing", "generate --checkpoint {run} --prompt-file {tmp}/nope.txt", 2, "does not exist"),
    ("generate-foreign-tokenizer", "generate --checkpoint {ckpt_tok}", 2, "tokenizer.json has"),
    ("generate-config-vocab", "generate --checkpoint {ckpt_vocab}", 2, "disagrees with itself"),
    ("generate-config-block", "generate --checkpoint {ckpt_block}", 2, "transformer.wpe.weight has shape"),
    ("generate-corrupt-config", "generate --checkpoint {ckpt_json}", 2, "not valid JSON"),
    ("generate-corrupt-weights", "generate --checkpoint {ckpt_weights}", 2, "unreadable or corrupt"),
    # ---- eval
    ("eval-threads-neg", "eval --checkpoint {run} --data {data} --threads -1", 2, "threads must be an integer >= 0"),
    ("eval-device-tpu", "eval --checkpoint {run} --data {data} --device tpu", 2, "device must be auto, cpu, mps"),
    ("eval-device-cuda", "eval --checkpoint {run} --data {data} --device cuda", 2, "no CUDA GPU"),
    ("eval-dtype", "eval --checkpoint {run} --data {data} --dtype float8", 2, "--dtype must be"),
    ("eval-no-source", "eval --checkpoint {run}", 2, "give exactly one thing to evaluate"),
    ("eval-split", "eval --checkpoint {run} --data {data} --split test", 2, "split must be"),
    ("eval-context-0", "eval --checkpoint {run} --data {data} --context 0", 2, "context must be an integer >= 1"),
    ("eval-batch-0", "eval --checkpoint {run} --data {data} --batch-size 0", 2, "--batch-size must be an integer >= 1"),
    ("eval-text-missing", "eval --checkpoint {run} --text {tmp}/nope.txt", 2, "does not exist"),
    ("eval-foreign-tokenizer", "eval --checkpoint {ckpt_tok} --data {data}", 2, "tokenizer.json has"),
    ("eval-other-data", "eval --checkpoint {run} --data {other_data}", 2, "another tokenizer"),
    # ---- compare
    ("compare-extrapolation-0", "compare --data {data} --out {tmp}/c --extrapolation-tokens 0", 2,
     "--extrapolation-tokens must be an integer >= 1"),
    ("compare-extrapolation-neg", "compare --data {data} --out {tmp}/c --extrapolation-tokens -5", 2,
     "--extrapolation-tokens must be an integer >= 1"),
    ("compare-seeds-0", "compare --data {data} --out {tmp}/c --seeds 0", 2, "--seeds must be an integer >= 1"),
    ("compare-pos-unknown", "compare --data {data} --out {tmp}/c --pos learned,polar", 2, "polar"),
    ("compare-missing-data", "compare --data {tmp}/nope --out {tmp}/c", 2, "does not exist"),
    ("compare-lr-inf", "compare --data {data} --out {tmp}/c --lr inf", 2, "lr must be a finite number"),
    ("compare-threads-neg", "compare --data {data} --out {tmp}/c --threads -1", 2, "threads must be an integer >= 0"),
    # ---- info
    ("info-preset-unknown", "info --preset huge", 2, "unknown preset"),
    ("info-vocab-0", "info --vocab-size 0", 2, "vocab_size must be an integer >= 1"),
    ("info-pos-unknown", "info --pos polar", 2, "pos_encoding must be one of"),
    ("info-rope-theta-inf", "info --set rope_theta=inf", 2, "rope_theta must be a finite"),
    ("info-heads", "info --set n_head=7", 2, "must be divisible"),
    ("info-set-unknown", "info --set nope=1", 2, "unknown --set key"),
    # ---- poem
    ("poem-minutes-neg", "poem --data {data} --out {tmp}/poem --minutes -1", 2, "--minutes must be a positive"),
    ("poem-minutes-nan", "poem --data {data} --out {tmp}/poem --minutes nan", 2, "--minutes must be a positive"),
    ("poem-config-latin1", "poem --data {data} --out {tmp}/poem --config {latin1_toml}", 2, "not UTF-8"),
    ("poem-lr-inf", "poem --data {data} --out {tmp}/poem --config {tiny_toml} --set lr=inf", 2, "lr must be a finite"),
    # ---- top level
    ("unknown-verb", "fly", 2, "invalid choice"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory, verse) -> dict[str, str]:
    """Everything the cases point at: prepared data, a short trained run, broken checkpoints."""
    from gpt_small.data import prepare

    tmp = tmp_path_factory.mktemp("bad_input")
    (tmp / "poems.txt").write_text(verse(300))
    prepare(out=tmp / "data", text=tmp / "poems.txt")
    shutil.copytree(tmp / "data", tmp / "data-copy")
    (tmp / "other.txt").write_text(verse(300).upper() + "\u00e9\u00e8\n" * 50)
    prepare(out=tmp / "other-data", text=tmp / "other.txt")
    bad = tmp / "bad"
    bad.mkdir()
    (bad / "empty.txt").write_bytes(b"")
    (bad / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    (bad / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (bad / "no-txt").mkdir()
    (tmp / "busy").mkdir()
    (tmp / "busy" / "notes.txt").write_text("mine")
    (tmp / "tiny.txt").write_text("a\nb\n")
    (tmp / "empty").mkdir()
    (tmp / "latin1.toml").write_bytes('preset = "tiny"\n# caf\xe9\n'.encode("latin-1"))
    (tmp / "bad.toml").write_text("preset = \n")
    (tmp / "section.toml").write_text("[optim]\nlr = 1\n")
    (tmp / "tiny.toml").write_text('preset = "tiny"\n[model]\nblock_size = 16\n[train]\nbatch_size = 2\n'
                                   "max_steps = 2\nthreads = 1\nfinal_eval = false\n")
    run = tmp / "run"
    assert main(["train", "--data", str(tmp / "data"), "--out", str(run), *TINY]) == 0
    ckpt = (run / "last").resolve()
    broken = {}
    for name, edit in {
        "tok": lambda d: shutil.copy(tmp / "other-data" / "tokenizer.json", d / "tokenizer.json"),
        "vocab": lambda d: _edit_config(d, vocab_size=lambda v: v + 3),
        "block": lambda d: _edit_config(d, block_size=lambda v: v * 2),
        "json": lambda d: (d / "config.json").write_text("{not json"),
        "weights": lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 10),
    }.items():
        d = tmp / f"ckpt-{name}"
        shutil.copytree(ckpt, d)
        edit(d)
        broken[f"ckpt_{name}"] = str(d)
    return {"tmp": str(tmp), "poems": str(tmp / "poems.txt"), "data": str(tmp / "data"), "bad": str(bad),
            "busy": str(tmp / "busy"), "tinytext": str(tmp / "tiny.txt"), "run": str(run),
            "other_data": str(tmp / "other-data"), "data_copy": str(tmp / "data-copy"),
            "latin1_toml": str(tmp / "latin1.toml"), "bad_toml": str(tmp / "bad.toml"),
            "section_toml": str(tmp / "section.toml"), "tiny_toml": str(tmp / "tiny.toml"), **broken}


def _edit_config(d: Path, **changes) -> None:
    meta = json.loads((d / "config.json").read_text())
    for key, change in changes.items():
        meta["model"][key] = change(meta["model"][key])
    (d / "config.json").write_text(json.dumps(meta))


def _run_in_process(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_the_table_is_big_enough():
    verbs = {argv.split()[0] for _, argv, _, _ in CASES}
    assert len(CASES) >= 60
    assert {"prepare", "train", "generate", "eval", "compare", "info", "poem"} <= verbs


@pytest.mark.parametrize("argv, code, phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(world, capsys, argv, code, phrase):
    args = [a.format(**world) for a in argv.split(" ")]
    run_before = sorted(p.name for p in Path(world["run"]).rglob("*"))
    got, out, err = _run_in_process(args, capsys)
    lines = err.strip().splitlines()
    assert got == code, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert phrase in lines[0], lines[0]
    assert lines[0].startswith("gpt-small"), lines[0]
    if args[0] == "generate":
        assert out == "", "generate printed before its error"
    assert sorted(p.name for p in Path(world["run"]).rglob("*")) == run_before  # nothing lost or added


def test_some_cases_as_real_processes(world):
    """The in-process runs stand for real ones: the same line and code from the installed script."""
    exe = Path(sys.executable).with_name("gpt-small")
    picked = [c for c in CASES if c[0] in ("train-max-time-neg-space", "generate-temperature-neg",
                                           "prepare-latin1-text", "eval-threads-neg", "unknown-verb")]
    for _, argv, code, phrase in picked:
        r = subprocess.run([str(exe), *[a.format(**world) for a in argv.split(" ")]], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == code, r.stderr
        assert r.stderr.count("\n") == 1 and phrase in r.stderr, r.stderr


def test_bpe_vocab_size_too_big_gets_a_note(world, capsys):
    code, out, err = _run_in_process(["prepare", "--text", world["poems"], "--tokenizer", "bpe", "--vocab-size",
                                      "100000", "--out", world["tmp"] + "/bpe"], capsys)
    assert code == 0
    assert "note: --vocab-size 100000 asked for" in err
    assert json.loads((Path(world["tmp"]) / "bpe" / "meta.json").read_text())["vocab_size"] < 100000


def test_metrics_are_strict_json_and_the_nan_stop_says_what_is_on_disk(world, capsys):
    # lr=inf is refused; a huge finite lr still diverges, which is the honest NaN stop to test
    out = Path(world["tmp"]) / "nan-run"
    code, _, err = _run_in_process(["train", "--data", world["data"], "--out", str(out), *TINY, "--lr", "1e30",
                                    "--min-lr", "0", "--warmup-steps", "0", "--grad-clip", "0"], capsys)
    assert code == 2
    assert "the loss became" in err
    assert "no checkpoint was saved" in err or "the last good checkpoint is step" in err
    if "no checkpoint was saved" in err:
        assert not (out / "last").exists()
    for line in (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in metrics.jsonl"))


def test_help_shows_meaning_unit_and_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--max-steps N optimizer steps (the schedule's length); 0 = no step limit: max_time ends the run (steps; default: 5000; may change at --resume)" in text
    assert "--lr X peak learning rate (default: 0.001)" in text
    assert "--pos NAME where positions come from [learned, sinusoidal, rope]" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU cases need a machine without CUDA")
def test_no_cuda_here():
    assert not torch.cuda.is_available()
