"""bf16 and int8 decoding weights (gpt_small/ops/quantize.py, the kernels in ops/csrc/decode.c):
exact to fp32 rounding against a float64 reference, close to fp32 decoding, fallbacks that work,
bad choices refused in one line."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt_small.cli import main
from gpt_small.config import GPTConfig
from gpt_small.errors import GPTSmallError
from gpt_small.model import GPT
from gpt_small.ops import kernels
from gpt_small.ops.quantize import Int8Linear, convert_weights, quantize_int8

needs_kernel = pytest.mark.skipif(not kernels.available(), reason=kernels.describe())


def _weights(kind: str, n: int, k: int, g: torch.Generator):
    """A weight of the kind, its scale (int8) and its dequantized float64 value."""
    w = torch.randn(n, k, generator=g)
    if kind == "int8":
        q, scale = quantize_int8(w)
        return q, scale, q.double() * scale.double()[:, None]
    w = w.bfloat16()
    return w, None, w.double()


@needs_kernel
@pytest.mark.parametrize("kind", ["bf16", "int8"])
@pytest.mark.parametrize("rows", [*range(1, kernels.MAX_ROWS + 1), 9, 16, 21])  # beyond 4: 4 at a time
@pytest.mark.parametrize("k, n", [(1, 1), (7, 5), (17, 33), (31, 3), (33, 65), (101, 7), (768, 300)])
def test_kernel_equals_float64_reference_of_the_dequantized_product(kind, rows, k, n):
    g = torch.Generator().manual_seed(rows * 10_000 + k * 100 + n)
    w, scale, w64 = _weights(kind, n, k, g)
    x, bias = torch.randn(rows, k, generator=g), torch.randn(n, generator=g)
    expected = x.double() @ w64.T + bias.double()
    for b in (bias, None):
        got = kernels.skinny_linear(x, w, b, scale).double()
        want = expected if b is not None else expected - bias.double()
        # fp32 accumulation over k terms: a few ulps of the sum of |terms|
        bound = 1e-6 * (k ** 0.5) * (x.double().abs() @ w64.abs().T) + 1e-6
        assert ((got - want).abs() <= bound).all(), (got - want).abs().max()


@needs_kernel
@pytest.mark.parametrize("kind", ["bf16", "int8"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_kernel_splits_rows_over_threads(kind, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(threads)
        for n in (2, 5, 97):  # fewer weight rows than some thread counts, and an odd split
            w, scale, w64 = _weights(kind, n, 40, g)
            for rows in (3, 11):  # one pass, and 4 rows at a time
                x = torch.randn(rows, 40, generator=g)
                torch.testing.assert_close(kernels.skinny_linear(x, w, None, scale).double(), x.double() @ w64.T,
                                           rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_kernel_refuses_what_it_cannot_take():
    x = torch.randn(2, 16)
    q, scale = quantize_int8(torch.randn(8, 16))
    for args in ((x, q, None, None), (x, q.bfloat16(), None, scale), (x, q, None, scale[:4]),
                 (x, q.to(torch.int16), None, None), (x.bfloat16(), q, None, scale)):
        with pytest.raises(ValueError, match="skinny_linear"):
            kernels.skinny_linear(*args)


def test_int8_round_trip_is_within_half_a_scale_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 301, generator=g) * torch.logspace(-3, 1, 64)[:, None]  # rows of every size
    w[5] = 0.0  # an all-zero row
    w[6, 7] = -w[6].abs().max() * 2  # the absmax on the negative side
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (64,) and q.abs().max() <= 127
    err = (q.double() * scale.double()[:, None] - w.double()).abs()
    assert (err <= scale.double()[:, None] / 2 * (1 + 1e-6)).all()
    assert (q[5] == 0).all() and q[6, 7] == -127


def _decoding_model() -> GPT:
    """The tiny preset with weights large enough for logits of a few units (random init gives
    near-uniform logits, where any rounding would flip greedy choices)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=50, activation="gelu", n_embd=64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.5 / p.shape[1] ** 0.5)
    return model


def _teacher_forced_logits(model: GPT, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of each position, one token at a time through the KV cache (the decoding path)."""
    B, T = tokens.shape
    out = []
    with torch.no_grad():
        model.setup_kv_cache(B, T)
        for t in range(T):
            out.append(model(tokens[:, t:t + 1], input_pos=torch.tensor([t]))[:, -1])
        model.clear_kv_cache()
    return torch.stack(out, 1)


@pytest.mark.parametrize("weights, tolerance", [("bfloat16", 0.02), ("int8", 0.05)])
def test_decoding_with_fewer_bytes_stays_close_to_fp32(weights, tolerance):
    from gpt_small.generate import generate_tokens

    model = _decoding_model()
    prompt = torch.randint(0, 50, (3, 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        greedy = torch.stack(list(generate_tokens(model, prompt, max_new_tokens=24, temperature=0)), 1)
    tokens = torch.cat((prompt, greedy), 1)
    reference = _teacher_forced_logits(model, tokens)
    quantized = convert_weights(copy.deepcopy(model), weights)
    got = _teacher_forced_logits(quantized, tokens)
    diff = (got - reference).abs().max() / reference.abs().max()
    assert diff < tolerance, f"logits differ by {diff:.4f} of their largest"
    with torch.no_grad():  # and greedy decoding keeps (almost all of) the same tokens
        again = torch.stack(list(generate_tokens(quantized, prompt, max_new_tokens=24, temperature=0)), 1)
    assert (again[:, :8] == greedy[:, :8]).all()


def test_convert_weights_changes_the_linears_only():
    model = _decoding_model()
    tied = GPT(GPTConfig.from_preset("tiny", vocab_size=50, tie_embeddings=True))
    for m in (model, tied):
        wte = m.transformer.wte.weight.clone()
        convert_weights(m, "int8")
        assert isinstance(m.lm_head, Int8Linear) and isinstance(m.transformer.h[0].mlp.c_fc, Int8Linear)
        assert m.transformer.wte.weight.dtype == torch.float32 and torch.equal(m.transformer.wte.weight, wte)
    bf = convert_weights(_decoding_model(), "bfloat16")
    assert bf.transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16
    assert bf.transformer.h[0].attn.c_attn.bias.dtype == torch.float32 and not bf.training
    with pytest.raises(GPTSmallError, match="weights must be one of float32, bfloat16, int8, got 'int4'"):
        convert_weights(bf, "int4")


_FALLBACK = """
import json, torch
from gpt_small import ops
from gpt_small.ops import kernels
from gpt_small.ops.quantize import convert_weights
import tests.test_quantize as t
model = convert_weights(t._decoding_model(), "{weights}")
tokens = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(2))
print(json.dumps(dict(describe=ops.describe(), logits=t._teacher_forced_logits(model, tokens).tolist())))
"""


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
@pytest.mark.parametrize("env", [{"GPT_SMALL_KERNELS": "0"}, {"GPT_SMALL_OPS": "torch"}, {"CC": "/no/such/cc"}])
def test_fallbacks_give_the_same_logits(weights, env, tmp_path):
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "GPT_SMALL_CACHE": str(tmp_path), "PYTHONPATH": str(root), **env}
    out = subprocess.run([sys.executable, "-c", _FALLBACK.format(weights=weights)], capture_output=True,
                         text=True, env=env, check=True, cwd=root).stdout
    result = json.loads(out)
    assert "decoding kernels: on" not in result["describe"]
    model = convert_weights(_decoding_model(), weights)
    tokens = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(torch.tensor(result["logits"]), _teacher_forced_logits(model, tokens),
                               rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("weights")
    (root / "poems.txt").write_text("".join(f"the sea and the moon {i % 7} over night\n" for i in range(400)))
    assert main(["prepare", "--text", str(root / "poems.txt"), "--tokenizer", "char", "--out",
                 str(root / "data")]) == 0
    (root / "tiny.toml").write_text(
        'preset = "tiny"\n[model]\nblock_size = 32\n[train]\nbatch_size = 4\nthreads = 1\n'
        "eval_interval = 10\neval_batches = 1\nwarmup_steps = 2\nmax_steps = 10\nfinal_eval = false\n")
    assert main(["train", "--data", str(root / "data"), "--out", str(root / "run"), "--config",
                 str(root / "tiny.toml"), "--no-progress"]) == 0
    return root


@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
def test_cli_generate_and_eval_take_weights(run, weights, capsys):
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run / "run"), "--prompt", "the ", "--max-new-tokens", "20",
                 "--seed", "1", "--weights", weights]) == 0
    assert capsys.readouterr().out.startswith("the ")
    assert main(["eval", "--checkpoint", str(run / "run"), "--data", str(run / "data"), "--json",
                 "--weights", weights]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["weights"] == weights and result["tokens"] > 0
    assert main(["eval", "--checkpoint", str(run / "run"), "--data", str(run / "data"), "--json"]) == 0
    fp32 = json.loads(capsys.readouterr().out)
    assert abs(result["loss"] - fp32["loss"]) < 0.05 and result["loss"] != fp32["loss"]


@pytest.mark.parametrize("verb", ["generate", "eval"])
def test_bad_weights_refused_in_one_line(verb, tmp_path, capsys):
    args = ["--checkpoint", str(tmp_path / "nowhere"), "--weights", "int4"]
    assert main([verb, *args] + (["--data", str(tmp_path)] if verb == "eval" else [])) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err == (f"gpt-small {verb}: error: weights must be one of float32, bfloat16, int8, "
                            "got 'int4'\n")
