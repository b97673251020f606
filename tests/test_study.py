"""The positional-encoding study: identical initial weights, a tiny end-to-end comparison, one-line errors."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest
import torch

from gpt_small import GPT, GPTConfig, TrainConfig
from gpt_small.cli import main
from gpt_small.data import PreparedData
from gpt_small.study import copy_shared_weights, extrapolation_plan, parse_encodings, verdict
from gpt_small.train import Trainer

ENCODINGS = ("learned", "sinusoidal", "rope")


@pytest.fixture(scope="module")
def data_dir(verse_data) -> Path:
    return verse_data


def initial_model(config: GPTConfig, seed: int) -> GPT:
    """The step-0 model of a study run: what the trainer builds, with the shared weights copied in."""
    torch.manual_seed(seed)
    model = GPT(config)
    copy_shared_weights(model, seed)
    return model


def _shared(model: GPT) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "wpe" not in n}


# ---------------------------------------------------------------- identical initial weights

@pytest.mark.parametrize("tie", [True, False])
def test_shared_weights_identical_at_step_0(tie):
    models = {e: initial_model(GPTConfig.from_preset("tiny", pos_encoding=e, tie_embeddings=tie), seed=7)
              for e in ENCODINGS}
    ref = _shared(models["rope"])
    assert ("lm_head.weight" in ref) == (not tie)
    for enc in ENCODINGS:
        shared = _shared(models[enc])
        assert shared.keys() == ref.keys()
        for name in ref:
            assert torch.equal(shared[name], ref[name]), f"{enc}: {name}"
    # without the study's copy, an untied head of the learned model starts elsewhere: the reason for it
    torch.manual_seed(7)
    plain = GPT(GPTConfig.from_preset("tiny", pos_encoding="learned", tie_embeddings=tie))
    assert torch.equal(plain.lm_head.weight, ref["lm_head.weight" if not tie else "transformer.wte.weight"]) == tie
    other = initial_model(GPTConfig.from_preset("tiny", pos_encoding="rope", tie_embeddings=tie), seed=8)
    assert not torch.equal(other.transformer.wte.weight, ref["transformer.wte.weight"])


def test_trainer_starts_from_the_shared_weights_and_keeps_its_rng(data_dir, tmp_path):
    vocab = PreparedData(data_dir).tokenizer.vocab_size
    cfg = GPTConfig.from_preset("tiny", vocab_size=vocab, pos_encoding="learned", tie_embeddings=False)
    tcfg = TrainConfig(batch_size=2, max_steps=1, threads=1, seed=11)
    trainer = Trainer(cfg, tcfg, data_dir, tmp_path / "run", show_progress=False,
                      init_weights=lambda model: copy_shared_weights(model, 11))
    trainer.setup()
    after_setup = torch.get_rng_state()
    torch.manual_seed(11)  # Trainer.setup leaves the stream seeded by seed + rank: the copy did not move it
    assert torch.equal(after_setup, torch.get_rng_state())
    expected = _shared(initial_model(cfg, seed=11))
    for name, value in _shared(trainer.model).items():
        assert torch.equal(value, expected[name]), name


# ---------------------------------------------------------------- pieces

def test_parse_encodings():
    assert parse_encodings("learned, rope") == ["learned", "rope"]
    assert parse_encodings(["sinusoidal"]) == ["sinusoidal"]
    for bad, message in [("", "at least one"), ([], "at least one"), ("learned,alibi", "unknown positional"),
                         ("rope,rope", "listed 2 times"), ("learned,,rope", "unknown positional")]:
        with pytest.raises(Exception, match=message):
            parse_encodings(bad)


def test_extrapolation_plan():
    assert extrapolation_plan(1000, 32, (1, 2, 4), budget=300) == (257, {})  # two windows of 128
    assert extrapolation_plan(1000, 32, (1, 2, 4), budget=50) == (129, {})  # at least one longest window
    n, too_long = extrapolation_plan(100, 32, (1, 2, 4), budget=16384)
    assert n == 65 and list(too_long) == [4] and "shorter than one window of 128" in too_long[4]


def _fake(losses: dict[str, list[float]]) -> dict:
    res = {}
    for enc, values in losses.items():
        stat = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
                "values": values}
        ex = {"1x": {"loss": stat, "reason": None}}
        res[enc] = {"final_val_loss": stat, "extrapolation": ex}
    return {"results": res, "seeds": list(range(len(next(iter(losses.values()))))),
            "extrapolation": {"factors": [1]}}


def test_verdict_words_follow_the_numbers():
    one = verdict(_fake({"learned": [2.5], "rope": [2.4]}))
    assert one.startswith("rope has the lowest validation loss") and "single seed" in one
    clear = verdict(_fake({"learned": [2.50, 2.51, 2.49], "rope": [2.30, 2.31, 2.29]}))
    assert "rope has the lowest mean" in clear and "real difference" in clear
    noisy = verdict(_fake({"learned": [2.50, 2.30, 2.40], "rope": [2.45, 2.35, 2.38]}))
    assert "cannot separate" in noisy
    # the rule is twice the larger standard deviation: a gap of 1.5 of them (0.015 against 0.01) is not enough
    close = verdict(_fake({"learned": [2.500, 2.510, 2.490], "rope": [2.485, 2.495, 2.475]}))
    assert "cannot separate" in close and "(0.0100)" in close


# ---------------------------------------------------------------- end to end

def test_compare_three_encodings_two_seeds(data_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", "--pos", "learned,sinusoidal,rope", "--preset", "tiny", "--data", str(data_dir),
                 "--max-steps", "6", "--seeds", "2", "--out", str(out), "--threads", "1", "--batch-size", "4",
                 "--eval-interval", "3", "--eval-batches", "1", "--warmup-steps", "2", "--log-interval", "3",
                 "--extrapolation-tokens", "300", "--no-progress"])
    stdout = capsys.readouterr().out
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["encodings"] == list(ENCODINGS) and results["seeds"] == [1337, 1338]
    n_ex = results["extrapolation"]["tokens"]
    vocab = PreparedData(data_dir).vocab_size
    assert n_ex == 257 and results["extrapolation"]["contexts"] == [32, 64, 128]  # 2 windows of 4 x 32
    for enc in ENCODINGS:
        r = results["results"][enc]
        assert r["params"] == GPTConfig.from_preset("tiny", pos_encoding=enc, vocab_size=vocab).num_params()
        assert len(r["runs"]) == 2
        for run in r["runs"]:
            summary = json.loads((Path(run["run_dir"]) / "summary.json").read_text())
            assert run["final_val_loss"] == summary["final_val"]["loss"]
            assert run["final_val_bpc"] == summary["final_val"]["bits_per_char"]
            assert run["steps"] == summary["steps"] == 6
            assert run["tokens"] == summary["tokens"] == 6 * 4 * 32
        assert r["final_val_loss"]["values"] == [run["final_val_loss"] for run in r["runs"]]
        assert r["final_val_loss"]["mean"] == pytest.approx(statistics.fmean(r["final_val_loss"]["values"]))
        assert r["final_val_loss"]["std"] == pytest.approx(statistics.stdev(r["final_val_loss"]["values"]))
        ex = r["extrapolation"]
        assert ex["1x"]["loss"]["mean"] > 0 and ex["1x"]["reason"] is None
        if enc == "learned":
            assert ex["2x"]["loss"] is None and ex["4x"]["loss"] is None
            assert "learned positions end at block_size (32)" in ex["4x"]["reason"]
        else:
            assert ex["4x"]["loss"]["mean"] > 0 and len(ex["4x"]["loss"]["values"]) == 2
    # the seeds differ, and the same seed gives every encoding the same data: losses differ only by model
    learned = results["results"]["learned"]["final_val_loss"]["values"]
    assert learned[0] != learned[1]
    assert "| learned |" in md and "n/a" in md and "**Verdict.**" in md and results["verdict"] in md
    assert "mean" in results["verdict"] and results["verdict"] in stdout
    # a second study into the same folder is refused before training anything
    code = main(["compare", "--preset", "tiny", "--data", str(data_dir), "--out", str(out), "--max-steps", "1"])
    assert code == 2 and "not empty" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--pos", ""], "at least one positional encoding"),
    (["--pos", "learned,alibi"], "unknown positional encoding 'alibi'"),
    (["--pos", "rope,learned,rope"], "'rope' is listed 2 times"),
    (["--seeds", "0"], "--seeds must be an integer >= 1"),
    (["--data", "/nonexistent/data"], "does not exist"),
    (["--n-embd", "30", "--n-head", "6", "--pos", "rope"], "rope needs an even head size"),
])
def test_bad_input_is_one_line(data_dir, tmp_path, capsys, argv, message):
    base = ["compare", "--preset", "tiny", "--data", str(data_dir), "--out", str(tmp_path / "x"), "--max-steps", "1",
            "--threads", "1", "--no-progress"]
    code = main(base + argv)
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and err.startswith("gpt-small compare: error: ")
    assert re.search(re.escape(message), err), err
    assert not (tmp_path / "x").exists()  # nothing trained, nothing written
