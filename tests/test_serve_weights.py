"""`gpt-small serve --weights bfloat16|int8` as a real process: greedy completions equal
generate_text on the same checkpoint converted the same way, the weights show in the startup
line, /healthz and the model object, and a bad value is refused in one line before anything loads."""

from __future__ import annotations

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
from starlette.testclient import TestClient  # noqa: E402

from gpt_small.checkpoint import load_checkpoint  # noqa: E402
from gpt_small.cli import main  # noqa: E402
from gpt_small.generate import generate_text  # noqa: E402
from gpt_small.ops import kernels  # noqa: E402
from gpt_small.ops.quantize import convert_weights  # noqa: E402
from gpt_small.serve import create_app  # noqa: E402
from serve_util import live_server, make_checkpoint, make_model  # noqa: E402

NAME = "tiny-poet"
needs_kernel = pytest.mark.skipif(not kernels.available(), reason=f"exact only with the C kernel; {kernels.describe()}")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve-weights") / NAME)


@pytest.fixture(scope="module", params=["bfloat16", "int8"])
def server(request, run_dir):
    banner: list[str] = []
    with live_server(run_dir, "--weights", request.param, banner=banner) as (url, _, _):
        yield request.param, url, banner[0]


def generated(run_dir, weights: str, prompt: str, n_tokens: int) -> str:
    """What `gpt-small generate --weights W --temperature 0` writes after the prompt: the same
    load, conversion and decoding, at the server's one thread (a prompt of more than 8 tokens, and
    the re-prefill past block_size, go through torch's GEMM, whose rounding can follow the threads)."""
    ckpt = load_checkpoint(run_dir, device="cpu")
    convert_weights(ckpt.model, weights)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        text = generate_text(ckpt.model, ckpt.tokenizer, prompt, max_new_tokens=n_tokens, temperature=0)[0]
        return text[len(prompt):]
    finally:
        torch.set_num_threads(threads)


def complete(url: str, prompt: str | list[str], max_tokens: int) -> list[str]:
    r = httpx.post(f"{url}/v1/completions", timeout=60,
                   json={"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return [c["text"] for c in r.json()["choices"]]


@pytest.mark.slow
def test_greedy_completion_equals_generate_with_the_same_weights(server, run_dir):
    """Exact, not a bound: a lone request runs generate_text's steps (prefill alone, one row per
    step, the same sliding re-prefill past block_size) through the same ops.linear; 90 tokens after
    a 7-token prompt cross the 64-token window, so the dequantized path for many rows runs too."""
    weights, url, _ = server
    assert complete(url, "The sea", 90) == [generated(run_dir, weights, "The sea", 90)]


@pytest.mark.slow
@needs_kernel
def test_batched_rows_equal_generate_with_the_same_weights(server, run_dir):
    """Four prompts decode as one batch; the kernel's bf16/int8 products are row-independent as
    its fp32 ones are, so each row equals its prompt alone (40 tokens stay inside the window)."""
    weights, url, _ = server
    prompts = ["The sea", "O moon", "When I", "a"]
    assert complete(url, prompts, 40) == [generated(run_dir, weights, p, 40) for p in prompts]
    assert httpx.get(f"{url}/healthz").json()["peak_batch"] >= len(prompts)


@pytest.mark.slow
def test_weights_shown_to_clients(server):
    """The startup line, /healthz and the model object; /healthz's parameter count is the
    checkpoint's (an int8 Linear's weight is a buffer, which num_params would not count)."""
    weights, url, banner = server
    params = make_model()[0].num_params()
    assert banner.startswith(f"serving {NAME} ({params:,} parameters, {weights} weights) on http://127.0.0.1:")
    health = httpx.get(f"{url}/healthz").json()
    assert health["weights"] == weights and health["params"] == params
    listed = httpx.get(f"{url}/v1/models").json()["data"]
    assert [(m["id"], m["object"], m["weights"]) for m in listed] == [(NAME, "model", weights)]
    assert httpx.get(f"{url}/v1/models/{NAME}").json()["weights"] == weights


@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8"])
def test_app_reads_the_weights_off_the_model(weights):
    """create_app over a model converted in-process says what it decodes with, untold, and the
    model's parameter count as it was before conversion."""
    model, tok = make_model()
    params = model.num_params()
    with TestClient(create_app(model=convert_weights(model, weights), tokenizer=tok, model_name=NAME)) as client:
        health = client.get("/healthz").json()
        assert health["weights"] == weights and health["params"] == params
        assert client.get(f"/v1/models/{NAME}").json()["weights"] == weights


def test_bad_weights_refused_in_one_line_before_loading(tmp_path, capsys):
    assert main(["serve", "--checkpoint", str(tmp_path / "nowhere"), "--port", "0", "--weights", "int4"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "gpt-small serve: error: weights must be one of float32, bfloat16, int8, got 'int4'\n"
