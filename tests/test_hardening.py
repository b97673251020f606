"""The hardening promises, one test each at its exact edge: bounds (limits.py), schemas
(schemas.py), sampling that cannot make NaN, and writes that lose nothing."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gpt_small import limits
from gpt_small.errors import ConfigError, GPTSmallError
from tests.test_fuzz import TINY, assert_one_line, run, tree


@pytest.fixture(scope="module")
def world(tmp_path_factory, verse) -> dict[str, str]:
    from gpt_small.data import prepare

    tmp = tmp_path_factory.mktemp("hardening")
    (tmp / "poems.txt").write_text(verse(300))
    prepare(out=tmp / "data", text=tmp / "poems.txt")
    assert run(["train", "--data", str(tmp / "data"), "--out", str(tmp / "run"), *TINY])[0] == 0
    return {"tmp": str(tmp), "data": str(tmp / "data"), "run": str(tmp / "run")}


# ---------------------------------------------------------------- bounds

@pytest.mark.parametrize("value, ok", [(0, False), (1, True), (limits.MAX_NEW_TOKENS, True),
                                       (limits.MAX_NEW_TOKENS + 1, False), (True, False), (1.0, False)])
def test_positive_int_at_its_edges(value, ok):
    if ok:
        assert limits.positive_int(value, "n", limits.MAX_NEW_TOKENS) == value
    else:
        with pytest.raises(ConfigError, match=r"n must be an integer >= 1 and <= 1,000,000"):
            limits.positive_int(value, "n", limits.MAX_NEW_TOKENS)


def test_a_seed_beyond_a_c_long_is_refused_and_the_largest_one_works():
    assert limits.check_seed(limits.MAX_SEED) == 2**63 - 1
    torch.Generator().manual_seed(limits.MAX_SEED)  # the maximum really reaches C
    with pytest.raises(ConfigError, match="seed must be an integer >= 0"):
        limits.check_seed(2**63)
    with pytest.raises(ConfigError, match="an integer of ~5,000 digits"):  # the message stays one short line
        limits.check_seed(10**4999)


def test_the_python_api_bounds_a_stop_string_as_the_cli_and_the_server_do():
    from gpt_small.generate import generate_text
    from serve_util import make_model

    model, tok = make_model()
    assert len(generate_text(model, tok, "a", stop="x" * limits.MAX_STOP_CHARS, max_new_tokens=1)) == 1
    with pytest.raises(ConfigError, match=f"stop must be a non-empty text of at most {limits.MAX_STOP_CHARS} "):
        generate_text(model, tok, "a", stop="x" * (limits.MAX_STOP_CHARS + 1), max_new_tokens=1)


def test_memory_check_names_need_and_have():
    limits.check_fits(10 * limits.GiB, "x", available=10 * limits.GiB)
    with pytest.raises(ConfigError, match=r"x needs ~10.0 GiB of memory; this machine has 1.0 GiB available"):
        limits.check_fits(10 * limits.GiB, "x", available=limits.GiB)


def test_a_checkpoint_config_too_big_for_memory_is_refused_before_the_model_is_built(world, tmp_path):
    ckpt = tmp_path / "big"
    shutil.copytree(Path(world["run"], "last").resolve(), ckpt)
    meta = json.loads((ckpt / "config.json").read_text())
    meta["model"].update(n_embd=65536, n_head=1024, n_layer=1024)
    (ckpt / "config.json").write_text(json.dumps(meta))
    code, out, err = run(["generate", "--checkpoint", str(ckpt)])
    line = assert_one_line(code, err, ["big"])
    assert "GiB of memory" in line and out == ""


# ---------------------------------------------------------------- schemas

@pytest.mark.parametrize("meta, phrase", [
    ([1], "expected a JSON object"),
    ({"dtype": None}, "field 'dtype'"),
    ({"dtype": "float64"}, "field 'dtype'"),
    ({"vocab_size": "65"}, "field 'vocab_size'"),
    ({"train_tokens": -1}, "field 'train_tokens'"),
], ids=["list", "null-dtype", "float-dtype", "string-vocab", "negative-tokens"])
def test_a_damaged_meta_json_names_the_field(world, tmp_path, meta, phrase):
    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    valid = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps(meta if isinstance(meta, list) else {**valid, **meta}))
    code, _, err = run(["info", "--data", str(data)])
    line = assert_one_line(code, err, [phrase])
    assert "meta.json" in line and phrase in line


def test_token_ids_beyond_the_vocabulary_are_refused(world, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    meta = json.loads((data / "meta.json").read_text())
    import numpy as np

    ids = np.fromfile(data / "val.bin", dtype=np.dtype(meta["dtype"]).newbyteorder("<"))
    ids[-1] = meta["vocab_size"]  # one id past the last
    ids.tofile(data / "val.bin")
    code, _, err = run(["info", "--data", str(data)])
    assert f"token id {meta['vocab_size']}, beyond the vocabulary" in assert_one_line(code, err, ["ids"])


@pytest.mark.parametrize("tok, phrase", [
    ({"type": "char", "version": 1}, "field 'chars': missing"),
    ({"type": "char", "version": 1, "chars": 5, "unk_id": 0}, "field 'chars'"),
    ({"type": "char", "version": 1, "chars": ["a", "a"], "unk_id": 2}, "distinct"),
    ({"model": {"type": "BPE"}}, "field 'model.vocab': missing"),
])
def test_a_damaged_tokenizer_names_the_field(tmp_path, tok, phrase):
    from gpt_small.tokenizer import load_tokenizer

    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(GPTSmallError, match=phrase):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("model", ["x", None, [1]])
def test_a_checkpoint_config_whose_model_is_not_an_object(world, tmp_path, model):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(Path(world["run"], "last").resolve(), ckpt)
    meta = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**meta, "model": model}))
    code, _, err = run(["generate", "--checkpoint", str(ckpt)])
    assert "field 'model'" in assert_one_line(code, err, [model])


@pytest.mark.parametrize("key, value, phrase", [("n_embd", "32", "n_embd must be an integer, got the string '32'"),
                                                ("dropout", "0.1", "dropout must be a number"),
                                                ("bias", "true", "bias must be true or false")])
def test_a_checkpoint_config_value_written_as_a_string_is_refused(world, tmp_path, key, value, phrase):
    """A file's numbers are typed: "32" is a damaged file, not a flag's text to parse."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(Path(world["run"], "last").resolve(), ckpt)
    meta = json.loads((ckpt / "config.json").read_text())
    meta["model"][key] = value
    (ckpt / "config.json").write_text(json.dumps(meta))
    code, _, err = run(["generate", "--checkpoint", str(ckpt), "--max-new-tokens", "5"])
    line = assert_one_line(code, err, [key])
    assert phrase in line and "config.json" in line


@pytest.mark.parametrize("toml, phrase", [('preset = ["tiny"]', "preset must be one of"),
                                          ("model = 3", "[model] must be a table")])
def test_a_toml_preset_or_section_of_the_wrong_type(tmp_path, toml, phrase):
    (tmp_path / "c.toml").write_text(toml + "\n")
    code, _, err = run(["info", "--config", str(tmp_path / "c.toml")])
    assert phrase in assert_one_line(code, err, [toml])


# ---------------------------------------------------------------- sampling

def test_sampling_below_the_temperature_floor_is_greedy_and_never_nan():
    from gpt_small.generate import sample

    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, -1e30, 4.999]])
    for t in (1e-300, limits.TEMPERATURE_FLOOR / 2):
        assert sample(logits, temperature=t).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    ids = sample(torch.tensor([[3e38, -3e38, 0.0]]), temperature=limits.TEMPERATURE_FLOOR, generator=g)
    assert ids.tolist() == [0]  # just above the floor: the extreme logits still give a finite softmax


def test_nan_logits_are_one_line_not_a_torch_error():
    from gpt_small.generate import sample

    with pytest.raises(GPTSmallError, match="NaN scores"):
        sample(torch.tensor([[0.0, math.nan]]), temperature=1.0)


def test_a_tiny_repetition_penalty_is_refused_at_its_floor():
    from gpt_small.generate import check_sampling_args

    check_sampling_args(1.0, None, None, limits.MIN_REPETITION_PENALTY)
    with pytest.raises(GPTSmallError, match="repetition_penalty"):
        check_sampling_args(1.0, None, None, limits.MIN_REPETITION_PENALTY / 2)


def test_nan_weights_give_one_line_in_generate(world, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "nan"
    shutil.copytree(Path(world["run"], "last").resolve(), ckpt)
    sd = load_file(str(ckpt / "model.safetensors"))
    sd = {k: torch.full_like(v, math.nan) if v.is_floating_point() else v for k, v in sd.items()}
    save_file(sd, str(ckpt / "model.safetensors"), metadata={"format_version": "1"})
    code, _, err = run(["generate", "--checkpoint", str(ckpt), "--no-stream", "--max-new-tokens", "3"])
    assert "NaN" in assert_one_line(code, err, ["nan"])


# ---------------------------------------------------------------- nothing lost

def test_train_refuses_a_run_whose_last_link_is_broken(world, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(world["run"], run_dir, symlinks=True)
    target = os.readlink(run_dir / "last")
    shutil.rmtree(run_dir / target)  # `last` now points nowhere; other checkpoints and files remain
    before = tree(run_dir)
    code, _, err = run(["train", "--data", world["data"], "--out", str(run_dir), *TINY])
    line = assert_one_line(code, err, ["broken last"])
    assert "already holds a run" in line and "--resume" in line
    assert tree(run_dir) == before


def test_form_meta_in_a_missing_folder_fails_before_any_poem(world, tmp_path):
    code, out, err = run(["generate", "--checkpoint", world["run"], "--lines", "2", "--rhyme", "AA",
                          "--form-meta", str(tmp_path / "nodir" / "x.json")])
    assert "does not exist" in assert_one_line(code, err, ["form-meta"])
    assert out == ""


def test_a_refused_pickle_is_one_line_in_our_words(world, tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran code",))

    ckpt = tmp_path / "evil"
    shutil.copytree(Path(world["run"], "last").resolve(), ckpt)
    with open(ckpt / "trainer_state.pt", "wb") as f:
        pickle.dump(Evil(), f)
    from gpt_small.checkpoint import load_trainer_state

    with pytest.raises(GPTSmallError) as e:
        load_trainer_state(ckpt)
    msg = str(e.value)
    assert "\n" not in msg and "weights_only=False" not in msg and "refuses to load" in msg


def test_poem_outside_the_checkout_names_the_default_config(tmp_path):
    p = subprocess.run([sys.executable, "-m", "gpt_small", "poem"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "default configs/poem-cpu.toml" in p.stderr and str(tmp_path) in p.stderr


def test_prepare_force_waits_for_a_training_run_reading_the_data(world, tmp_path):
    """A real second process reads the data folder (as a training run does); prepare --force is
    refused while it does, and goes ahead once it is gone."""
    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    reader = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from gpt_small.data import PreparedData
        d = PreparedData({str(data)!r})
        print("reading", flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "reading"
        before = tree(data)
        code, _, err = run(["prepare", "--text", str(Path(world["tmp"]) / "poems.txt"), "--out", str(data),
                            "--force"])
        assert "in use by another gpt-small process" in assert_one_line(code, err, ["prepare"])
        assert tree(data) == before
    finally:
        reader.communicate("", timeout=60)
    code, _, err = run(["prepare", "--text", str(Path(world["tmp"]) / "poems.txt"), "--out", str(data), "--force"])
    assert code == 0, err


def test_the_same_process_may_read_and_then_prepare_its_data(world, tmp_path):
    from gpt_small.data import PreparedData, prepare

    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    reading = PreparedData(data)
    prepare(out=data, text=Path(world["tmp"]) / "poems.txt", force=True)
    assert PreparedData(data).vocab_size == reading.vocab_size


def test_a_report_that_fails_leaves_the_old_report_whole(tmp_path, monkeypatch):
    from gpt_small import report

    out = tmp_path / "report"
    out.mkdir()
    for name in ("report.json", "report.md", "report.png"):
        (out / name).write_text("old " + name)

    def fail(f):
        raise GPTSmallError(f"cannot write {out / 'report.png'}: no space left on device")

    with pytest.raises(GPTSmallError, match="no space left"):
        report._write_together(out, {"report.json": "new", "report.md": "new", "report.png": fail})
    assert {p.name: p.read_text() for p in out.iterdir()} == {n: "old " + n for n in
                                                              ("report.json", "report.md", "report.png")}


def test_the_bounds_and_schemas_import_without_torch():
    """The server's request decoding imports limits.py; `info` and config checks stay instant."""
    code = "import sys, gpt_small.limits, gpt_small.schemas; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
