"""Evaluation: strided windows cover every target once, the loss equals a hand computation, units, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt_small import GPT, GPTConfig, TrainConfig
from gpt_small.checkpoint import load_checkpoint
from gpt_small.cli import main
from gpt_small.data import PreparedData, prepare
from gpt_small.errors import GPTSmallError
from gpt_small.evaluate import bits_per_char, evaluate_checkpoint, evaluate_tokens, strided_windows, unknown_note
from gpt_small.train import Trainer

def _train(data_dir: Path, out: Path, **model) -> Path:
    vocab = PreparedData(data_dir).tokenizer.vocab_size
    cfg = GPTConfig.from_preset("tiny", vocab_size=vocab, **model)
    tcfg = TrainConfig(batch_size=4, max_steps=3, warmup_steps=1, eval_interval=3, eval_batches=1,
                       log_interval=1, final_eval=True, threads=1)
    with Trainer(cfg, tcfg, data_dir, out, show_progress=False) as trainer:
        trainer.fit()
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory, verse) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    (root / "poems.txt").write_text(verse(400))
    prepare(out=root / "char", text=root / "poems.txt", tokenizer="char")
    prepare(out=root / "bpe", text=root / "poems.txt", tokenizer="bpe", vocab_size=300)
    return {
        "root": root, "char": root / "char", "bpe": root / "bpe",
        "learned": _train(root / "char", root / "run-learned", pos_encoding="learned"),
        "rope": _train(root / "char", root / "run-rope", pos_encoding="rope"),
        "bpe_run": _train(root / "bpe", root / "run-bpe", pos_encoding="learned"),
    }


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- windows

@pytest.mark.parametrize("n", [2, 3, 17, 32, 33, 64, 65, 100, 129])
@pytest.mark.parametrize("context,stride", [(1, 1), (4, 1), (4, 2), (4, 4), (32, 1), (32, 16), (32, 31), (32, 32)])
def test_strided_windows_score_every_target_once(n, context, stride):
    windows = strided_windows(n, context, stride)
    scored = []
    for i, (start, end, first) in enumerate(windows):
        assert 0 <= start < end <= n - 1 and end - start <= context
        targets = [p for p in range(start + 1, end + 1) if p >= first]
        assert targets, "a window that scores nothing is wasted work"
        for p in targets:
            # inputs start..p-1 predict p: at least context - stride + 1 tokens once the text allows it
            assert p - start >= min(p, context - stride + 1)
        scored += targets
    assert scored == list(range(1, n))


def test_strided_windows_reject_bad_arguments():
    with pytest.raises(GPTSmallError, match="at least 2 tokens"):
        strided_windows(1, 4, 4)
    with pytest.raises(GPTSmallError, match="stride"):
        strided_windows(10, 4, 5)


# ---------------------------------------------------------------- the loss itself

def _hand_loss(model: GPT, tokens: np.ndarray, context: int, stride: int) -> float:
    """Per target p: run the model on exactly the left context its window gives it, in float64."""
    n = len(tokens)
    ends, e = [], min(context, n - 1)
    while True:  # window ends: context, then + stride, clipped to the last token
        ends.append(e)
        if e == n - 1:
            break
        e = min(e + stride, n - 1)
    total = 0.0
    for p in range(1, n):
        end = next(e for e in ends if e >= p)
        start = max(0, end - context)
        x = torch.tensor(tokens[start:p], dtype=torch.long)[None]
        logits = model(x)[0, -1].double()
        total += float(-F.log_softmax(logits, dim=-1)[int(tokens[p])])
    return total / (n - 1)


@pytest.mark.parametrize("enc", ["learned", "rope"])
@pytest.mark.parametrize("stride", [16, 5])  # 16 = context: non-overlapping windows
def test_loss_equals_hand_computation(enc, stride):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", pos_encoding=enc, block_size=16)).double().eval()
    tokens = np.random.default_rng(1).integers(0, 64, size=77).astype(np.uint16)
    res = evaluate_tokens(model, tokens, context=16, stride=stride, batch_size=3)
    with torch.no_grad():
        expected = _hand_loss(model, tokens, 16, stride)
    assert res.tokens == 76
    assert abs(res.loss - expected) < 1e-9


def test_loss_is_deterministic_and_units_agree(env):
    a = evaluate_checkpoint(env["learned"], data=env["char"], device="cpu")
    b = evaluate_checkpoint(env["learned"], data=env["char"], device="cpu")
    for key in ("loss", "perplexity", "bits_per_char", "tokens", "chars_per_token"):
        assert a[key] == b[key]
    assert a["tokens"] == len(PreparedData(env["char"]).val) - 1
    assert a["context"] == 32 and a["stride"] == 16  # defaults: block_size and half of it
    assert a["perplexity"] == pytest.approx(math.exp(a["loss"]))
    assert a["chars_per_token"] == 1.0 and a["bits_per_char"] == pytest.approx(a["loss"] / math.log(2))


def test_stride_equal_to_context_matches_the_trainers_final_eval(env):
    summary = json.loads((env["learned"] / "summary.json").read_text())
    r = evaluate_checkpoint(env["learned"] / "last", data=env["char"], stride=32, device="cpu")
    assert r["tokens"] == summary["final_val"]["tokens"]
    assert r["loss"] == pytest.approx(summary["final_val"]["loss"], rel=1e-6)


def test_bits_per_char_with_bpe(env, verse):
    data = PreparedData(env["bpe"])
    r = evaluate_checkpoint(env["bpe_run"], data=env["bpe"], device="cpu")
    assert data.tokenizer.kind == "bpe" and r["chars_per_token"] == data.chars_per_token("val") > 1.2
    assert r["bits_per_char"] == pytest.approx(r["loss"] / math.log(2) / r["chars_per_token"])
    assert r["bits_per_char"] == pytest.approx(bits_per_char(r["loss"], r["chars_per_token"]))
    text = env["root"] / "bpe-text.txt"
    text.write_text(verse(30, seed=5))
    t = evaluate_checkpoint(env["bpe_run"], text=text, device="cpu")
    n_tokens = len(data.tokenizer.encode(text.read_text()))
    assert t["tokens"] == n_tokens - 1
    assert t["chars_per_token"] == pytest.approx(len(text.read_text()) / n_tokens)
    assert t["bits_per_char"] == pytest.approx(t["loss"] / math.log(2) / t["chars_per_token"])


def test_text_outside_the_char_vocabulary_is_reported(env, capsys, verse):
    path = env["root"] / "odd.txt"
    text = verse(20, seed=3) + "§ the sea § moon § Ω Ω\n"
    path.write_text(text)
    r = evaluate_checkpoint(env["learned"], text=path, device="cpu")
    assert r["tokens"] == len(text) - 1  # nothing dropped: unknown characters are scored as <unk>
    assert r["unknown_chars"] == 5 and r["unknown_top"] == {"§": 3, "Ω": 2}
    assert r["unknown_note"] == "5 characters outside the vocabulary (mapped to <unk>): '§' x3, 'Ω' x2"
    code, out, err = _cli(["eval", "--checkpoint", str(env["learned"]), "--text", str(path), "--threads", "1"], capsys)
    assert code == 0 and "5 characters outside the vocabulary" in out and "bits/char" in out
    assert unknown_note({}) == ""


def test_rope_evaluates_past_its_training_context(env, capsys):
    code, out, err = _cli(["eval", "--checkpoint", str(env["rope"]), "--data", str(env["char"]),
                           "--context", "64", "--stride", "64", "--json", "--threads", "1"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["context"] == 64 and r["context_over_block_size"] == 2 and math.isfinite(r["loss"])
    # the same weights in a model whose block_size is 64 give the same number
    ckpt = load_checkpoint(env["rope"])
    longer = GPT(GPTConfig.from_dict({**ckpt.model_config.to_dict(), "block_size": 64})).eval()
    longer.load_state_dict(ckpt.model.state_dict())
    ref = evaluate_tokens(longer, PreparedData(env["char"]).val, context=64, stride=64)
    assert r["loss"] == pytest.approx(ref.loss, rel=1e-6)


def test_cli_json_matches_the_api(env, capsys):
    code, out, _ = _cli(["eval", "--checkpoint", str(env["learned"]), "--data", str(env["char"]), "--split", "train",
                         "--context", "16", "--stride", "8", "--batch-size", "5", "--json", "--threads", "1"], capsys)
    assert code == 0
    r = json.loads(out)
    api = evaluate_checkpoint(env["learned"], data=env["char"], split="train", context=16, stride=8, device="cpu")
    assert r["loss"] == api["loss"] and r["tokens"] == len(PreparedData(env["char"]).train) - 1


@pytest.mark.parametrize("argv,message", [
    (["--data", "{bpe}"], "prepared with another tokenizer"),
    (["--data", "{char}", "--context", "64"], r"context 64 is longer than the learned position table \(32\)"),
    (["--data", "{char}", "--context", "0"], "context must be an integer >= 1"),
    (["--data", "{char}", "--stride", "40"], "stride must be between 1 and the context"),
    (["--data", "{char}", "--split", "test"], "split must be val or train"),
    (["--data", "{char}", "--dtype", "int8"], "--dtype must be one of float32, bfloat16, float16"),
    (["--data", "{root}/missing"], "does not exist"),
    ([], "give exactly one thing to evaluate"),
    (["--data", "{char}", "--text", "{root}/poems.txt"], "give exactly one thing to evaluate"),
    (["--text", "{root}/missing.txt"], "does not exist"),
])
def test_bad_input_is_one_line(env, capsys, argv, message):
    argv = [a.format(**{k: str(v) for k, v in env.items()}) for a in argv]
    code, out, err = _cli(["eval", "--checkpoint", str(env["learned"]), "--threads", "1", *argv], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("gpt-small eval: error: ")
    import re

    assert re.search(message, err), err


def test_missing_checkpoint_is_one_line(env, capsys):
    code, _, err = _cli(["eval", "--checkpoint", str(env["root"] / "nope"), "--data", str(env["char"])], capsys)
    assert code == 2 and err.count("\n") == 1 and "checkpoint not found" in err
