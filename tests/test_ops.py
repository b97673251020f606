"""The ops layer (gpt_small/ops/): the CPU backend equals the torch backend, the reference, to
rounding, on the paths the model takes; the backend is chosen once and can be switched off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from gpt_small import ops
from gpt_small.ops import cpu, reference


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])
@pytest.mark.parametrize("k, n", [(64, 96), (512, 300)])  # under and over the kernels' size limits
def test_cpu_linear_equals_reference(rows, k, n):
    g = torch.Generator().manual_seed(rows + k)
    x, w, b = torch.randn(2, rows, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(cpu.linear(x, w, b), reference.linear(x, w, b), rtol=1e-5, atol=1e-4)
    x.requires_grad_()
    y = cpu.linear(x, w, b)  # with autograd: F.linear, so gradients flow
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("T, S", [(7, 7), (1, 1), (1, 9), (4, 9), (200, 200)])
def test_cpu_causal_attention_equals_reference(T, S):
    g = torch.Generator().manual_seed(T * 1000 + S)
    q = torch.randn(2, 3, T, 16, generator=g)
    # k, v as a KV cache holds them: rows of hs floats, room to spare after position S
    cache = torch.randn(2, 2, 3, S + 5, 16, generator=g)
    k, v = cache[0, :, :, :S], cache[1, :, :, :S]
    with torch.no_grad():
        torch.testing.assert_close(cpu.causal_attention(q, k, v), reference.causal_attention(q, k, v),
                                   rtol=1e-5, atol=1e-5)


def test_reference_attention_of_a_chunk_is_the_tail_of_full_causal_attention():
    """The contract: the T queries are the last T of S positions, each sees keys up to its own."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 8, generator=g) for _ in range(3))
    full = reference.causal_attention(q, k, v)
    torch.testing.assert_close(reference.causal_attention(q[:, :, 6:], k, v), full[:, :, 6:])
    torch.testing.assert_close(reference.causal_attention(q[:, :, 9:], k, v), full[:, :, 9:])


def test_cpu_activations_equal_reference():
    x = torch.randn(64, 160, requires_grad=True)
    for name in ("gelu", "relu2"):
        ours, ref = getattr(cpu, name)(x), getattr(reference, name)(x)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
        g_ours, = torch.autograd.grad(ours.sum(), x)
        g_ref, = torch.autograd.grad(ref.sum(), x)
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-5)


def test_dropout_is_identity_when_off():
    x = torch.randn(10)
    for backend in (cpu, reference):
        assert backend.dropout(x, 0.5, training=False) is x and backend.dropout(x, 0.0, training=True) is x


def test_the_cpu_backend_is_chosen_once_and_builds_its_kernels_then():
    assert ops.backend("cpu") is ops.backend(torch.device("cpu")) is cpu
    assert ops.describe().startswith("ops: cpu; decoding kernels: ")
    assert cpu.kernels._state  # loaded (or refused) when chosen, not at a forward pass


def test_switched_to_torch_the_model_runs_on_torch_ops_alone():
    code = ("import torch; from gpt_small import ops; from gpt_small.model import GPT; "
            "from gpt_small.config import GPTConfig; from gpt_small.ops import kernels\n"
            "m = GPT(GPTConfig.from_preset('tiny', vocab_size=50, activation='gelu')).eval()\n"
            "with torch.no_grad(): m(torch.zeros(1, 3, dtype=torch.long))\n"
            "print(ops.describe(), kernels._state == '')")
    env = {**os.environ, "GPT_SMALL_OPS": "torch"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "ops: torch (GPT_SMALL_OPS=torch) True"  # no kernel was even built
