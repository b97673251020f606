"""The one-call decoding step (gpt_small/ops/decoder.py, csrc/decode.c `decode_blocks`): what the
model's blocks compute, to fp32 rounding, for every configuration and weight kind, with rows at
one position or each at its own; and the block loop wherever it does not apply.

The reference is the same model in training mode (dropout 0, so the same function), where the
fused step never runs and model.py loops over its blocks."""

from __future__ import annotations

import pytest
import torch

from gpt_small.config import GPTConfig
from gpt_small.kv_cache import Placement, rows_of
from gpt_small.model import GPT
from gpt_small.ops import decoder, kernels
from gpt_small.ops.quantize import convert_weights

needs_kernel = pytest.mark.skipif(not kernels.available(), reason=kernels.describe())

CONFIGS = {
    "gpt2-like": dict(activation="gelu", pos_encoding="learned", bias=True, tie_embeddings=True),
    "poem-cpu-like": dict(activation="relu2", pos_encoding="rope", bias=False, qk_norm=True, ngram=3),
    "sinusoidal-relu": dict(activation="relu", pos_encoding="sinusoidal", bias=True, mlp_ratio=2),
}


def _model(name: str, weights: str, n_embd: int = 64, n_head: int = 4) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=97, block_size=64, n_layer=3, n_head=n_head, n_embd=n_embd, dropout=0.0,
                       **CONFIGS[name])
    model = GPT(config)
    for p in model.parameters():  # biases and norms away from their init, so that each one counts
        p.data.add_(torch.randn_like(p) * 0.05)
    return convert_weights(model, weights)


def _at(pos: int, B: int) -> Placement:
    """B rows of one token each, all at position pos."""
    return Placement(torch.tensor([pos]), None, B, 1)


def _decode(model: GPT, idx: torch.Tensor, starts: list[int], steps: int, *, fused: bool) -> torch.Tensor:
    """Prefill row b with idx[b, :starts[b]] alone, then decode `steps` greedy tokens a row at a
    time at per-row positions (as gpt_small/serve does), or in lockstep if all starts are equal."""
    model.train(not fused)
    B = idx.shape[0]
    logits = []
    with torch.inference_mode():
        model.setup_kv_cache(B, max(starts) + steps)
        last = []
        for b, s in enumerate(starts):
            with rows_of(model, b, b + 1):
                last.append(model(idx[b:b + 1, :s], input_pos=torch.arange(s), last_only=True)[:, -1])
        cur = torch.cat(last).argmax(-1)
        lockstep = len(set(starts)) == 1
        for t in range(steps):
            if lockstep:
                pos = torch.tensor([starts[0] + t])
            else:
                pos = torch.tensor([[s + t] for s in starts])
            out = model(cur[:, None], input_pos=pos, last_only=True)[:, -1]
            logits.append(out)
            cur = out.argmax(-1)
        model.clear_kv_cache()
    model.eval()
    return torch.stack(logits)


@needs_kernel
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("starts", [[5], [4, 4, 4], [3, 9, 1, 6, 2, 8, 5, 7], [4] * 11,
                                    [1 + i % 7 for i in range(17)]])  # beyond 8 rows: 8 at a time
def test_fused_step_equals_the_blocks(name, weights, starts):
    model = _model(name, weights)
    g = torch.Generator().manual_seed(len(starts))
    idx = torch.randint(0, 97, (len(starts), max(starts)), generator=g)
    fused = _decode(model, idx, starts, 12, fused=True)
    assert decoder._prepared[model][1] is not None, "the fused step did not run"
    reference = _decode(model, idx, starts, 12, fused=False)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_odd_widths_and_head_sizes():
    """A head size and widths that are no multiple of 16 take the kernels' scalar tails."""
    torch.manual_seed(1)
    for weights in ("float32", "int8"):
        config = GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=3, n_embd=54, dropout=0.0,
                           activation="gelu", pos_encoding="rope", qk_norm=True)
        model = convert_weights(GPT(config), weights)
        idx = torch.randint(0, 50, (2, 6))
        torch.testing.assert_close(_decode(model, idx, [6, 6], 10, fused=True),
                                   _decode(model, idx, [6, 6], 10, fused=False), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_new_caches_are_picked_up():
    """Each generation sets up new caches (another batch size, length): the step follows them."""
    model = _model("gpt2-like", "int8")
    for B, T in ((1, 7), (5, 3), (2, 11)):
        idx = torch.randint(0, 97, (B, T))
        torch.testing.assert_close(_decode(model, idx, [T] * B, 6, fused=True),
                                   _decode(model, idx, [T] * B, 6, fused=False), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_where_it_does_not_apply_the_blocks_run():
    model = _model("gpt2-like", "float32")
    x = torch.randn(1, 1, 64)
    too_many = decoder.MAX_ROWS + 1  # more rows than its first scratch space: it grows
    with torch.inference_mode():
        model.setup_kv_cache(too_many, 8)
        assert decoder.decode_blocks(model, x.expand(too_many, 1, 64).contiguous(), _at(0, too_many)) is not None
        assert decoder.decode_blocks(model, torch.randn(1, 2, 64), _at(0, 1)) is None  # a chunk, not one token
        model.setup_kv_cache(1, 8, dtype=torch.bfloat16)
        assert decoder.decode_blocks(model, x, _at(0, 1)) is None  # a bf16 cache
        model.setup_kv_cache(1, 8)
        assert decoder.decode_blocks(model, x, _at(0, 1)) is not None
        model.train()
        assert decoder.decode_blocks(model, x, _at(0, 1)) is None  # training mode
    # and through the model, that many rows decode as the blocks do
    model.eval()
    idx = torch.randint(0, 97, (too_many, 4))
    torch.testing.assert_close(_decode(model, idx, [4] * too_many, 3, fused=True),
                               _decode(model, idx, [4] * too_many, 3, fused=False), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_a_position_past_the_cache_is_refused():
    model = _model("gpt2-like", "float32")
    with torch.inference_mode():
        model.setup_kv_cache(1, 8)
        with pytest.raises(ValueError, match="decode_blocks refused"):
            decoder.decode_blocks(model, torch.randn(1, 1, 64), _at(8, 1))


@needs_kernel
def test_greedy_generation_is_unchanged():
    """generate_tokens (the CLI's path) through the fused step gives the blocks' tokens."""
    from gpt_small.generate import generate_tokens

    model = _model("poem-cpu-like", "bfloat16")
    prompt = [3, 14, 15, 92, 65]

    def tokens(fused: bool) -> list[int]:
        original = decoder.decode_blocks
        if not fused:
            decoder.decode_blocks = lambda *args: None
        try:
            return [int(t) for t in generate_tokens(model, prompt, max_new_tokens=40, temperature=0)]
        finally:
            decoder.decode_blocks = original

    assert tokens(True) == tokens(False)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 3])
def test_any_thread_count(threads):
    """The step splits rows, heads and weight rows over the threads: 1, and more than the rows."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = _model("poem-cpu-like", "int8")
        idx = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(threads))
        torch.testing.assert_close(_decode(model, idx, [5, 2], 8, fused=True),
                                   _decode(model, idx, [5, 2], 8, fused=False), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)


# --- batch-invariant decoding ---


def _one_step(model: GPT, prompts: list[torch.Tensor], nxt: torch.Tensor, rows: int) -> torch.Tensor:
    """Prefill each prompt alone into its own cache row, then decode nxt (one token per row) in one
    batched step at per-row positions, as gpt_small/serve does -> logits (len(prompts), V)."""
    model.setup_kv_cache(rows, 64)
    for b, p in enumerate(prompts):
        with rows_of(model, b, b + 1):
            model(p[None], input_pos=torch.arange(len(p)))
    pos = torch.tensor([[len(p)] for p in prompts])
    return model(nxt[:, None], input_pos=pos, last_only=True)[:, -1]


def _alone(model: GPT, prompt: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """The same row as `generate` decodes a single sample: its own cache, a lockstep position."""
    model.setup_kv_cache(1, 64)
    model(prompt[None], input_pos=torch.arange(len(prompt)))
    return model(token.view(1, 1), input_pos=torch.tensor([len(prompt)]), last_only=True)[0, -1]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("name", ["poem-cpu-like", "gpt2-like"])
def test_a_row_decodes_to_the_same_bits_alone_and_in_any_batch(name, weights, backend, monkeypatch):
    """A row's logits do not depend on how many rows decode beside it, nor where it sits: every
    linear computes each row alike (csrc/decode.c's fixed partial sums, the torch path's batched
    products), attention runs per row, and the choice of path never looks at the batch size."""
    from gpt_small import ops
    from gpt_small.ops import reference

    if backend == "torch":
        monkeypatch.setitem(ops._chosen, "cpu", reference)
    elif not kernels.available():
        pytest.skip(kernels.describe())
    model = _model(name, weights, n_embd=128).eval()
    g = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        for rows in (2, 5, 8, 17, 33, 64):
            prompts = [torch.randint(0, 97, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g)
                       for _ in range(rows)]
            nxt = torch.randint(0, 97, (rows,), generator=g)
            batched = _one_step(model, prompts, nxt, rows)
            for b in sorted({0, rows - 1, int(torch.randint(0, rows, (1,), generator=g))}):
                alone = _alone(model, prompts[b], nxt[b])
                assert torch.equal(batched[b], alone), f"row {b} of {rows} differs from the row alone"
        model.clear_kv_cache()
