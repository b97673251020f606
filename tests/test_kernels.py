"""The C kernels (gpt_small/ops/kernels.py): equal to F.linear to rounding, used by the model at
inference, and a clean fallback when it cannot be built."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gpt_small import ops
from gpt_small.ops import cpu as cpu_ops
from gpt_small.ops import kernels
from gpt_small.config import GPTConfig
from gpt_small.model import GPT

needs_kernel = pytest.mark.skipif(not kernels.available(), reason=kernels.describe())


@needs_kernel
@pytest.mark.parametrize("rows", [*range(1, kernels.MAX_ROWS + 1), 9, 16, 21])  # beyond 4: 4 at a time
@pytest.mark.parametrize("k, n", [(384, 1152), (1536, 384), (7, 5), (17, 33), (128, 65)])
@pytest.mark.parametrize("bias", [True, False])
def test_skinny_linear_equals_f_linear(rows, k, n, bias):
    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    x = torch.randn(rows, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g) if bias else None
    torch.testing.assert_close(kernels.skinny_linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_skinny_linear_splits_rows_over_threads(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, w = torch.randn(3, 64), torch.randn(5, 64)  # fewer weight rows than some thread counts
        torch.testing.assert_close(kernels.skinny_linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_skinny_linear_refuses_what_it_cannot_take():
    w = torch.randn(8, 16)
    for x in (torch.randn(0, 16), torch.randn(2, 15), torch.randn(16, 2).t(),
              torch.randn(2, 16, dtype=torch.float64)):
        with pytest.raises(ValueError, match="skinny_linear"):
            kernels.skinny_linear(x, w)


@needs_kernel
@pytest.mark.parametrize("batch, n_head, cached, hs", [(1, 4, 1, 32), (2, 6, 37, 64), (8, 6, 216, 64),
                                                       (3, 2, 300, 40), (1, 1, 5, 7)])
def test_decode_attention_equals_sdpa(batch, n_head, cached, hs):
    g = torch.Generator().manual_seed(cached)
    # q as model.py makes it: a strided view of the fused q, k, v projection of one token
    qkv = torch.randn(batch, 1, 3, n_head, hs, generator=g).permute(2, 0, 3, 1, 4)
    q = qkv[0] * (1 + cached % 7)  # sharper softmaxes too: scores far below the maximum
    cache = torch.randn(2, batch + 1, n_head, cached + 9, hs, generator=g)  # room to spare, as a KVCache has
    k, v = cache[0, :batch, :, :cached], cache[1, :batch, :, :cached]
    expected = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, 1, n_head * hs)
    torch.testing.assert_close(kernels.decode_attention(q, k, v), expected, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_decode_attention_refuses_what_it_cannot_take():
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 5, 16)
    for args in ((torch.randn(1, 2, 2, 16), k, k), (q, k.transpose(2, 3).contiguous().transpose(2, 3), k),
                 (q.double(), k.double(), k.double()), (q, k, torch.randn(1, 2, 6, 16))):
        with pytest.raises(ValueError, match="decode_attention"):
            kernels.decode_attention(*args)


@needs_kernel
def test_model_decoding_uses_the_kernel_and_matches_autograd_path():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=50)).eval()
    idx = torch.randint(0, 50, (2, 1))
    calls = []
    real = kernels.skinny_linear
    kernels.skinny_linear = lambda *a: calls.append(1) or real(*a)
    try:
        with torch.no_grad():
            fast, _ = model(idx)
    finally:
        kernels.skinny_linear = real
    reference, _ = model(idx)  # with autograd: F.linear everywhere
    assert calls, "no Linear went through the kernel"
    torch.testing.assert_close(fast, reference.detach(), rtol=1e-4, atol=1e-4)


def test_switched_off_the_model_still_runs_and_says_why(tmp_path):
    code = ("import torch; from gpt_small.ops import kernels; from gpt_small.model import GPT; "
            "from gpt_small.config import GPTConfig\n"
            "m = GPT(GPTConfig.from_preset('tiny', vocab_size=50)).eval()\n"
            "with torch.no_grad(): m(torch.zeros(1, 1, dtype=torch.long))\n"
            "print(kernels.available(), kernels.describe())")
    env = {**os.environ, "GPT_SMALL_KERNELS": "0", "GPT_SMALL_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "False decoding kernels: off (GPT_SMALL_KERNELS=0)"


def test_without_a_compiler_it_falls_back(tmp_path):
    code = ("from gpt_small.ops import kernels\n"
            "print(kernels.available(), kernels.describe())")
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "GPT_SMALL_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.startswith("False decoding kernels: off (")
    assert not list(tmp_path.glob("kernels/*.so"))


@needs_kernel
def test_built_once_into_the_cache(tmp_path):
    code = "from gpt_small.ops import kernels; print(kernels.describe())"
    env = {**os.environ, "GPT_SMALL_CACHE": str(tmp_path)}
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so" and str(built[0]) in first
    mtime = built[0].stat().st_mtime_ns
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert [p.stat().st_mtime_ns for p in (tmp_path / "kernels").iterdir()] == [mtime]  # reused, no temp left


@needs_kernel
@pytest.mark.parametrize("n", [1, 15, 16, 17, 8191, 8192 * 3 + 5])  # tails, one thread and several
def test_gelu_tanh_matches_torch_and_a_float64_reference(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * 3
    x[: min(n, 6)] = torch.tensor([0.0, -1e-30, 9.0, -9.0, 1e4, -1e4])[: min(n, 6)]
    grad = torch.randn(n, generator=g)
    ref = x.double().requires_grad_()
    F.gelu(ref, approximate="tanh").backward(grad.double())
    y, dx = kernels.gelu_tanh(x), kernels.gelu_tanh_backward(grad, x)
    # as close to float64 as torch's own fp32 kernel is
    torch.testing.assert_close(y.double(), F.gelu(x.double(), approximate="tanh"), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx.double(), ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, F.gelu(x, approximate="tanh"), rtol=1e-6, atol=1e-6)


@needs_kernel
def test_gelu_tanh_keeps_nan_and_inf():
    """Non-finite in, non-finite out (as torch's: -inf gives NaN there, -inf here), so the trainer's
    NaN check still sees a diverged run."""
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0])
    y = kernels.gelu_tanh(x)
    assert y[0].isnan() and y[1] == float("inf") and not y[2].isfinite()
    assert y[3].item() == pytest.approx(0.841192, abs=1e-6)


@needs_kernel
def test_model_gelu_uses_the_kernel_and_its_gradient_matches_torch(monkeypatch):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, activation="gelu")
    m = GPT(cfg)
    idx = torch.randint(0, 50, (3, 16))
    calls = []
    real = kernels.gelu_tanh
    monkeypatch.setattr(kernels, "gelu_tanh", lambda x: calls.append(x.shape) or real(x))
    _, loss = m(idx, idx)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in m.named_parameters()}
    assert len(calls) == cfg.n_layer
    m.zero_grad()
    monkeypatch.setattr(cpu_ops, "gelu", lambda x: F.gelu(x, approximate="tanh"))
    _, loss_torch = m(idx, idx)
    loss_torch.backward()
    torch.testing.assert_close(loss, loss_torch, rtol=1e-6, atol=1e-6)
    for n, p in m.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


@needs_kernel
def test_model_gelu_without_grad_and_below_the_size_threshold(monkeypatch):
    """No autograd wrapper where no gradient is wanted; torch's op for small tensors (one decoded
    token), where a call into the library costs more than it saves."""
    x = torch.randn(8, 1024)
    calls = []
    real = kernels.gelu_tanh
    monkeypatch.setattr(kernels, "gelu_tanh", lambda t: calls.append(t.numel()) or real(t))
    with torch.no_grad():
        y = ops.gelu(x)
    small = ops.gelu(torch.randn(1, cpu_ops.GELU_KERNEL_MIN - 1))
    assert calls == [x.numel()] and not y.requires_grad and small.shape[1] == cpu_ops.GELU_KERNEL_MIN - 1
    torch.testing.assert_close(y, F.gelu(x, approximate="tanh"), rtol=1e-6, atol=1e-6)
