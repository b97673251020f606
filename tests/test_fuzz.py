"""Property-based fuzzing of every verb's flags and of every file gpt-small reads (hypothesis).

The promise under test: bad input gets exit code 2 and one line on stderr, never a traceback, and
nothing of the user's changes. Two families:

- flags: each numeric flag of each verb gets random and boundary values (negative, 0, C long +- 1,
  1e12, 1e400, nan, digits by the thousand, text). The verb points at a missing checkpoint or data
  folder, so a value the flag's check lets through ends at that missing path: a value outside the
  flag's documented range must be refused by name *before* (checks before work).
- files: a small real world (prepared data, a trained tiny run, a transformers-style folder) is
  copied, one file damaged (random JSON, a valid document with one field replaced or removed,
  random TOML, random bytes for token files) and read by the verb that reads it. A damage that
  leaves the file valid may succeed (exit 0); anything else must be exit 2 and one line, and the
  world's files must be byte-identical afterwards.

Calls are in-process (`cli.main`) for speed; a few run as real processes. The number of examples
per property is GPT_SMALL_FUZZ_EXAMPLES (default 12, derandomized, for `make test`); `make fuzz`
runs many more, randomized.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt_small import limits
from gpt_small.cli import main

EXAMPLES = int(os.environ.get("GPT_SMALL_FUZZ_EXAMPLES", "12"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 12, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
TINY = ["--preset", "tiny", "--block-size", "16", "--batch-size", "2", "--max-steps", "2", "--eval-interval", "2",
        "--eval-batches", "1", "--threads", "1", "--no-progress"]


def run(argv: list[str]) -> tuple[int, str, str]:
    """`gpt-small ARGV` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own errors
            code = e.code
    return code, out.getvalue(), err.getvalue()


def assert_one_line(code: int, err: str, argv: list[str]) -> str:
    lines = err.strip().splitlines()
    assert "Traceback" not in err, (argv, err)
    assert code == 2, (argv, code, err)
    assert len(lines) == 1, (argv, err)
    assert lines[0].startswith("gpt-small"), lines[0]
    return lines[0]


def tree(root: Path) -> dict[str, str]:
    """Every file under root with its sha256 (links as their targets)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = "-> " + os.readlink(p)
        elif p.is_file() and p.name != ".lock":
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ---------------------------------------------------------------- values

BOUNDARY = ["-1", "0", "1", "2", "-5", "255", "256", "65536", "2147483648", str(2**63 - 1), str(2**63), str(2**64),
            "1e12", "1e8", "1e400", "-1e400", "1e-300", "nan", "inf", "-inf", "", " ", "0x10", "1_000", "+3",
            "9" * 5000, "1.5", "true", "\u0663", "1e-5", "0.01", "100", "100.0001"]
VALUES = st.one_of(st.sampled_from(BOUNDARY), st.integers(min_value=-2**70, max_value=2**70).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=12))


def parse_number(raw: str, kind: type) -> float | int | None:
    """What argparse's type=int / type=float makes of raw, or None where it refuses it."""
    try:
        return kind(raw)
    except (ValueError, OverflowError):
        return None


def in_range(raw: str, kind: type, lo: float, hi: float, lo_open: bool = False) -> bool:
    v = parse_number(raw, kind)
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return False
    return (lo < v if lo_open else lo <= v) and v <= hi


# (verb, flag, type, lo, hi, lo open) with the verb's other arguments; every range is the documented one
MISSING = "/nonexistent/gpt-small-fuzz"
FLAGS = [
    ("generate", "--max-new-tokens", int, 1, limits.MAX_NEW_TOKENS, False),
    ("generate", "--lines", int, 1, limits.MAX_LINES, False),
    ("generate", "--num-samples", int, 1, limits.MAX_NUM_SAMPLES, False),
    ("generate", "--seed", int, 0, limits.MAX_SEED, False),
    ("generate", "--temperature", float, 0, limits.MAX_TEMPERATURE, False),
    ("generate", "--top-k", int, 1, limits.MAX_TOP_K, False),
    ("generate", "--top-p", float, 0, 1, True),
    ("generate", "--repetition-penalty", float, limits.MIN_REPETITION_PENALTY, limits.MAX_REPETITION_PENALTY, False),
    ("generate", "--syllables", int, 1, limits.MAX_SYLLABLES, False),
    ("generate", "--stanzas", int, 1, limits.MAX_STANZAS, False),
    ("eval", "--batch-size", int, 1, limits.MAX_BATCH_SIZE, False),
    ("eval", "--context", int, 1, limits.MAX_BLOCK_SIZE, False),
    ("eval", "--threads", int, 0, limits.MAX_THREADS, False),
    ("serve", "--threads", int, 0, limits.MAX_THREADS, False),
    ("serve", "--max-batch", int, 1, limits.MAX_SERVE_BATCH, False),
    ("serve", "--prefill-batch", int, 1, limits.MAX_SERVE_BATCH, False),
    ("serve", "--max-queue", int, 0, limits.MAX_SERVE_QUEUE, False),
    ("serve", "--max-new-tokens", int, 1, limits.MAX_NEW_TOKENS, False),
    ("serve", "--port", int, 0, 65535, False),
    ("export", "--threads", int, 0, limits.MAX_THREADS, False),
    ("report", "--samples", int, 1, limits.MAX_REPORT_SAMPLES, False),
    ("report", "--lines", int, 1, limits.MAX_LINES, False),
    ("report", "--seed", int, 0, limits.MAX_SEED, False),
    ("report", "--temperature", float, 0, limits.MAX_TEMPERATURE, False),
    ("compare", "--seeds", int, 1, limits.MAX_NUM_SAMPLES, False),
]
BASE = {"generate": ["--checkpoint", MISSING], "eval": ["--checkpoint", MISSING, "--text", MISSING],
        "serve": ["--checkpoint", MISSING], "export": ["--checkpoint", MISSING, "--out", MISSING + "-out"],
        "report": ["--checkpoint", MISSING], "compare": ["--data", MISSING]}


def _names(flag: str) -> set[str]:
    bare = flag.lstrip("-")
    return {flag, bare.replace("-", "_"), bare.replace("-", " ")}


@pytest.mark.parametrize("verb, flag, kind, lo, hi, lo_open", FLAGS, ids=[f"{v}{f}" for v, f, *_ in FLAGS])
@FUZZ
@given(raw=VALUES)
def test_a_flag_out_of_range_is_refused_by_name_before_any_work(verb, flag, kind, lo, hi, lo_open, raw):
    argv = [verb, *BASE[verb], flag, raw]
    code, out, err = run(argv)
    line = assert_one_line(code, err, argv)
    assert out == ""
    if not in_range(raw, kind, lo, hi, lo_open):
        assert any(name in line for name in _names(flag)), (raw, line)
    assert not Path(MISSING + "-out").exists()


CONFIG_FLAGS = ["--n-layer", "--n-head", "--n-embd", "--block-size", "--mlp-ratio", "--ngram", "--ngram-buckets",
                "--dropout", "--rope-theta", "--batch-size", "--grad-accum", "--lr", "--max-steps", "--seed",
                "--threads", "--max-time", "--warmup-steps", "--beta2", "--eval-interval", "--device", "--dtype"]


@FUZZ
@given(flags=st.lists(st.tuples(st.sampled_from(CONFIG_FLAGS), VALUES), min_size=1, max_size=3))
def test_config_flags_resolve_or_fail_in_one_line(flags):
    """`info` resolves the flags exactly as train does (one code path), without training."""
    argv = ["info", *[f"{flag}={value}" for flag, value in flags]]
    code, out, err = run(argv)
    assert "Traceback" not in err
    if code != 0:
        assert_one_line(code, err, argv)


@pytest.mark.parametrize("flags", [
    ["--n-embd", "65536", "--n-head", "1024", "--n-layer", "1024"],
    ["--batch-size", "65536", "--n-embd", "4096", "--n-head", "8", "--block-size", "16"],
], ids=["huge-model", "huge-batch"])
def test_train_refuses_a_size_beyond_memory_before_building_it(world, flags):
    out = Path(world["tmp"]) / "never"
    code, _, err = run(["train", "--data", world["data"], "--out", str(out), "--preset", "tiny", *flags])
    line = assert_one_line(code, err, flags)
    assert "GiB" in line and "this machine has" in line
    assert not (out / "checkpoints").exists()


# ---------------------------------------------------------------- files

@pytest.fixture(scope="module")
def world(tmp_path_factory, verse) -> dict[str, str]:
    """Prepared data and a trained tiny run (two steps), the things damaged copies are made of."""
    from gpt_small.data import prepare

    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "poems.txt").write_text(verse(300))
    prepare(out=tmp / "data", text=tmp / "poems.txt")
    run_dir = tmp / "run"
    assert run(["train", "--data", str(tmp / "data"), "--out", str(run_dir), *TINY])[0] == 0
    return {"tmp": str(tmp), "data": str(tmp / "data"), "run": str(run_dir),
            "ckpt": str((run_dir / "last").resolve())}


JSON = st.recursive(st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
                    | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children,
                                                                                         max_size=3),
                    max_leaves=8)
EXTREME = st.sampled_from([0, -1, 2**63, 10**30, 1e308, "32", None, [], {}, "", True, 1.5])


def damaged(valid: dict, draw_value, draw_choice) -> object:
    """A valid document with one key replaced (or removed, at any depth) -- or something else entirely."""
    kind = draw_choice(["replace", "remove", "replace-nested", "whole"])
    doc = json.loads(json.dumps(valid))
    if kind == "whole" or not doc:
        return draw_value(JSON)
    key = draw_choice(sorted(doc))
    if kind == "remove":
        del doc[key]
    elif kind == "replace-nested" and isinstance(doc[key], dict) and doc[key]:
        inner = draw_choice(sorted(doc[key]))
        doc[key][inner] = draw_value(st.one_of(EXTREME, JSON))
    else:
        doc[key] = draw_value(st.one_of(EXTREME, JSON))
    return doc


def _copy(world: dict[str, str], name: str, n: int) -> Path:
    dst = Path(world["tmp"]) / f"{name}-{n}"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(world[name], dst, symlinks=True)
    return dst


_counter = iter(range(10**9))

# (file, which folder, the verb that reads it)
FILES = [
    ("meta.json", "data", lambda d, w: ["eval", "--checkpoint", w["ckpt"], "--data", str(d), "--threads", "1"]),
    ("tokenizer.json", "data", lambda d, w: ["eval", "--checkpoint", w["ckpt"], "--data", str(d), "--threads", "1"]),
    ("config.json", "ckpt", lambda d, w: ["generate", "--checkpoint", str(d), "--max-new-tokens", "4", "--seed", "1"]),
    ("tokenizer.json", "ckpt", lambda d, w: ["generate", "--checkpoint", str(d), "--max-new-tokens", "4",
                                             "--seed", "1"]),
]


@pytest.mark.parametrize("name, where, argv", FILES, ids=[f"{w}-{n}" for n, w, _ in FILES])
@FUZZ
@given(data=st.data())
def test_a_damaged_json_file_is_one_line(world, name, where, argv, data):
    folder = _copy(world, where, next(_counter))
    valid = json.loads((folder / name).read_text())
    doc = damaged(valid, data.draw, lambda xs: data.draw(st.sampled_from(xs)))
    text = json.dumps(doc) if data.draw(st.booleans()) else data.draw(st.sampled_from(
        [json.dumps(doc)[:-1], "", "\x00", "[1]", '{"a": ' * 5000, '{"n": 1' + "0" * 5000 + "}", "\udcff"]
    ), label="broken text")
    (folder / name).write_bytes(text.encode("utf-8", "surrogatepass"))
    before = tree(folder)
    args = argv(folder, world)
    code, _, err = run(args)
    assert "Traceback" not in err
    if code != 0:
        assert_one_line(code, err, args)
    assert tree(folder) == before
    shutil.rmtree(folder)


@FUZZ
@given(blob=st.binary(max_size=64), keep_length=st.booleans())
def test_damaged_token_files_are_one_line(world, blob, keep_length):
    folder = _copy(world, "data", next(_counter))
    path = folder / "val.bin"
    size = path.stat().st_size
    raw = (blob * (size // max(len(blob), 1) + 1))[:size] if keep_length and blob else blob
    path.write_bytes(raw)
    before = tree(folder)
    args = ["eval", "--checkpoint", world["ckpt"], "--data", str(folder), "--threads", "1"]
    code, _, err = run(args)
    assert "Traceback" not in err
    if code != 0:
        assert_one_line(code, err, args)
    assert tree(folder) == before
    shutil.rmtree(folder)


def _toml_value(v: object) -> str:
    return json.dumps(v) if not isinstance(v, bool) else str(v).lower()


TOML_SCALARS = st.one_of(st.integers(min_value=-2**70, max_value=2**70), st.floats(allow_nan=False, allow_infinity=False),
                         st.booleans(), st.text(max_size=6), st.sampled_from(["tiny", "poem-cpu", "nope"]))


@FUZZ
@given(preset=st.one_of(st.none(), TOML_SCALARS, st.lists(TOML_SCALARS, max_size=2)),
       model=st.dictionaries(st.sampled_from(["n_layer", "n_embd", "n_head", "block_size", "dropout", "bogus"]),
                             st.one_of(TOML_SCALARS, st.lists(TOML_SCALARS, max_size=2)), max_size=3),
       train=st.dictionaries(st.sampled_from(["lr", "batch_size", "seed", "threads", "max_time", "device"]),
                             st.one_of(TOML_SCALARS, st.lists(TOML_SCALARS, max_size=2)), max_size=3),
       junk=st.one_of(st.just(""), st.text(max_size=20)))
def test_a_damaged_toml_config_is_one_line(world, preset, model, train, junk):
    path = Path(world["tmp"]) / f"fuzz-{next(_counter)}.toml"
    lines = [] if preset is None else [f"preset = {_toml_value(preset)}"]
    lines += ["[model]", *(f"{k} = {_toml_value(v)}" for k, v in model.items())]
    lines += ["[train]", *(f"{k} = {_toml_value(v)}" for k, v in train.items()), junk]
    path.write_text("\n".join(lines) + "\n")
    code, _, err = run(["info", "--config", str(path)])
    assert "Traceback" not in err
    if code != 0:
        assert_one_line(code, err, [path.read_text()])
    path.unlink()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A transformers-style GPT-2 folder: config.json and a two-shard index (shards of random bytes)."""
    d = tmp_path_factory.mktemp("hf")
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                               "n_embd": 8, "n_layer": 1, "n_head": 2, "n_positions": 16}))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors",
                                                                               "b": "s2.safetensors"}}))
    for s in ("s1", "s2"):
        (d / f"{s}.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    return d


@FUZZ
@given(data=st.data())
def test_a_damaged_imported_folder_is_one_line_and_reads_nothing_outside(hf_folder, tmp_path_factory, data):
    root = tmp_path_factory.mktemp("hfcase")
    folder = root / "model"
    shutil.copytree(hf_folder, folder)
    (root / "outside.safetensors").write_bytes(b"not read")
    name = data.draw(st.sampled_from(["config.json", "model.safetensors.index.json"]))
    valid = json.loads((folder / name).read_text())
    doc = damaged(valid, data.draw, lambda xs: data.draw(st.sampled_from(xs)))
    if name.startswith("model") and data.draw(st.booleans()):
        doc = {"weight_map": {"a": data.draw(st.sampled_from(["../outside.safetensors", "/etc/passwd",
                                                              "sub/../../outside.safetensors", "", "."]))}}
    (folder / name).write_text(json.dumps(doc))
    before = tree(root)
    out = root / "out"
    code, _, err = run(["import", "--hf", str(folder), "--out", str(out)])
    line = assert_one_line(code, err, [name, json.dumps(doc)[:200]])
    shards = doc.get("weight_map") if isinstance(doc, dict) and name.startswith("model") else None
    if isinstance(shards, dict) and shards and all(isinstance(v, str) for v in shards.values()) and any(
            v.startswith("/") or ".." in Path(v).parts for v in shards.values()):
        assert "inside the model folder" in line or "lies outside" in line, line  # refused, never read
    assert tree(root) == before or not out.exists()


# ---------------------------------------------------------------- a few as real processes

@pytest.mark.parametrize("argv", [
    ["generate", "--checkpoint", MISSING, "--max-new-tokens", "1000000000000"],
    ["generate", "--checkpoint", MISSING, "--seed", str(2**64)],
], ids=["max-new-tokens", "seed"])
def test_real_processes_give_the_same_line(argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "gpt_small", *argv], capture_output=True, text=True, env=env,
                       timeout=120)
    code, _, err = run(argv)
    assert p.returncode == code == 2
    assert p.stderr == err and len(err.strip().splitlines()) == 1, p.stderr
