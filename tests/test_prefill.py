"""Batch-invariant prefill: a prompt prefilled alone (generate.py's `prefill`) and the same prompt
inside a batched prefill of other prompts of other lengths, padded to the longest (the serve
engine's), give the same bits: the logits of its last token, its KV cache rows up to its length,
and its n-gram history. For every weight kind, positional encoding, activation, QK-norm and
n-grams, on the CPU backend with its kernels, without them, and on the torch backend."""

from __future__ import annotations

import pytest
import torch

from gpt_small import ops
from gpt_small.generate import prefill
from gpt_small.model import GPT
from gpt_small.ops import cpu, kernels, reference
from test_decoder import CONFIGS, _model


@pytest.fixture(params=["cpu", "cpu-without-kernels", "torch"])
def backend(request, monkeypatch):
    if request.param == "cpu" and not kernels.available():
        pytest.skip(kernels.describe())
    if request.param == "cpu-without-kernels":
        monkeypatch.setattr(kernels, "available", lambda: False)
    if request.param == "torch":
        monkeypatch.setitem(ops._chosen, "cpu", reference)
    return request.param


def _state(model: GPT, row: int, n: int) -> list[torch.Tensor]:
    """Row `row`'s cached keys and values up to n in every layer, and its n-gram history."""
    cache = model.kv_cache
    out = [t for c in cache.layers for t in (c.k[row, :, :n].clone(), c.v[row, :, :n].clone())]
    return out + ([cache.history[row].clone()] if cache.history is not None else [])


def _alone(model: GPT, prompt: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    n = len(prompt)
    model.setup_kv_cache(1, 64)
    logits = prefill(model, prompt[None], torch.arange(n))[0]
    return logits, _state(model, 0, n)


def _batched(model: GPT, prompts: list[torch.Tensor]) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """One forward over the prompts padded to the longest (padding: token 0), each at 0..n-1."""
    B, T = len(prompts), max(len(p) for p in prompts)
    idx = torch.zeros(B, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, :len(p)] = p
    model.setup_kv_cache(B, 64)
    logits = prefill(model, idx, torch.arange(T).expand(B, T), torch.tensor([len(p) for p in prompts]))
    return logits, [_state(model, b, len(p)) for b, p in enumerate(prompts)]


@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("name", CONFIGS)
def test_a_prompt_prefills_to_the_same_bits_alone_and_in_any_batch(name, weights, backend):
    model = _model(name, weights).eval()
    g = torch.Generator().manual_seed(7)
    with torch.inference_mode():
        for rows in (2, 5, 8):
            lengths = torch.randint(1, 61, (rows,), generator=g).tolist()
            lengths[int(torch.randint(0, rows, (1,), generator=g))] = 1  # a one-token prompt among them
            prompts = [torch.randint(0, 97, (n,), generator=g) for n in lengths]
            logits, states = _batched(model, prompts)
            for b, p in enumerate(prompts):
                alone_logits, alone_state = _alone(model, p)
                assert torch.equal(logits[b], alone_logits), f"{rows} rows: row {b} (of {len(p)} tokens) logits differ"
                assert len(states[b]) == len(alone_state)
                assert all(torch.equal(x, y) for x, y in zip(states[b], alone_state)), \
                    f"{rows} rows: row {b}'s cache or n-gram history differs"
        model.clear_kv_cache()


@pytest.mark.skipif(not kernels.available(), reason=kernels.describe())
def test_prefill_takes_the_kernel_up_to_the_length_rule_and_the_library_beyond(monkeypatch):
    """The rule looks at one sequence's length (idx's T), never at how many run together: up to it
    every product of the prefill goes through the kernel; past it, outside the mode, as eval's."""
    calls = []
    real = kernels.skinny_linear
    monkeypatch.setattr(kernels, "skinny_linear", lambda x, *a: calls.append(x.shape[0]) or real(x, *a))
    model = _model("sinusoidal-relu", "float32").eval()  # a fixed encoding: past block_size too
    limit = cpu.PREFILL_KERNEL_MAX_T
    assert ops.row_invariant_max_t("cpu") == limit
    with torch.inference_mode():
        model.setup_kv_cache(3, limit + 1)
        for B, T in ((1, limit), (3, limit)):
            calls.clear()
            prefill(model, torch.randint(0, 97, (B, T)), torch.arange(T))
            assert calls.count(B * T) == 4 * model.config.n_layer  # c_attn, c_proj, c_fc, c_proj
        calls.clear()
        prefill(model, torch.randint(0, 97, (1, limit + 1)), torch.arange(limit + 1))
        assert calls == [1]  # only the head's one row: the rest through the library
        calls.clear()
        model(torch.randint(0, 97, (1, limit)))  # outside generation (eval, training): unchanged routing
        assert calls == []
        model.clear_kv_cache()


def test_padded_rows_run_packed():
    """Padding fills idx's (B, T) layout only: the products see the real tokens of all rows, packed."""
    model = _model("poem-cpu-like", "float32").eval()
    seen = []
    handle = model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    with torch.inference_mode():
        model.setup_kv_cache(3, 64)
        prefill(model, torch.randint(0, 97, (3, 9)), torch.arange(9).expand(3, 9), torch.tensor([9, 2, 5]))
    handle.remove()
    assert seen == [(1, 16, 64)]


def test_the_mode_is_per_thread():
    import threading

    seen = []
    with ops.row_invariant():
        t = threading.Thread(target=lambda: seen.append(ops.is_row_invariant()))
        t.start()
        t.join()
        assert ops.is_row_invariant()
    assert seen == [False] and not ops.is_row_invariant()
