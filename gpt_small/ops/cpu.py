"""The CPU backend: torch's ops where they are fastest, our C kernels (ops/kernels.py) and a few
spelled-out forms where they are not. Contracts are those of gpt_small/ops/__init__.py; results
equal the torch backend (ops/reference.py) to rounding, except dropout, which draws other masks
from the same generator (and rounds p to a multiple of 2**-15).

Every choice here follows a measurement, not a CPU flag: the thresholds below are where the
benchmarks (benchmarks/weight_streaming.py, generate_throughput.py, train_throughput.py) saw the
faster path change on 2-core Intel Xeon and AMD EPYC machines.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import decoder, kernels, reference
from .mode import is_row_invariant

# --- linear ---
#
# Decoding one token multiplies a few vectors by every weight matrix, so it is bound by how fast
# the weights stream from memory. MKL's GEMV, behind F.linear on the CPU, streams them well below
# the bandwidth a plain sum reaches; oneDNN's linear (the op torch.compile's CPU freezing
# path emits) does better on large matrices but costs more per call, which loses on small
# matrices that stay in cache; our kernel streams them at the bandwidth
# (benchmarks/weight_streaming.py times all three).
# So without autograd, in fp32: 1-8 rows of input go to the kernel; more rows (a prompt) of a large
# enough weight go to oneDNN; the rest, and training, to F.linear (MKL's GEMM runs near peak
# there). Same weights, same layout, results equal to rounding.
# A decoding step (one token per row, x (B, 1, K)) goes to the kernel at any B and any weight
# size: the kernel computes each row alike wherever it sits in the batch, which oneDNN's and
# MKL's GEMMs do not promise (their blocking follows the number of rows), so a row's logits are
# the same bits alone or in any batch (tests/test_decoder.py).
# onednn_linear: the op, or None where this torch build lacks it.
onednn_linear = (getattr(torch.ops.mkldnn, "_linear_pointwise", None)
                 if torch.backends.mkldnn.is_available() else None)
_ONEDNN_MIN_WEIGHTS = 2**17  # 512 KiB of fp32: below, the call costs more than it saves
_SKINNY_MIN_WEIGHTS = 2**12  # below, the matrix stays in cache and the call overhead dominates
# bf16/int8 weights: up to this many rows the kernel, 4 rows at a time; beyond, one fp32 matmul
# on the dequantized weight costs less than the kernel's extra passes (benchmarks/low_precision_prompt.py)
_LOW_PRECISION_KERNEL_MAX_ROWS = 48


def prepare() -> None:
    """Compile or load the C kernels (once per process), so no forward pass waits on a compiler."""
    kernels.available()


# Row-invariant mode (ops/mode.py, ops/__init__.py): every product through the kernel, which
# computes each row alike at any number of rows. The kernel costs more than the library GEMM on a
# long prompt (benchmarks/prefill_kernel.py), so generation enters the mode for sequences of up to
# this many tokens only; a longer one is prefilled alone through the library, the same call in
# `generate` and in the serve engine (generate.prefill).
PREFILL_KERNEL_MAX_T = 64


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
    if is_row_invariant() and not torch.is_grad_enabled() and x.dtype == torch.float32:
        if not (kernels.available() and weight.is_contiguous()):
            return reference.linear(x, weight, bias, scale)  # row by row in this mode
        K, N = weight.shape[1], weight.shape[0]
        y = kernels.skinny_linear(x.reshape(-1, K).contiguous(), weight, bias, scale)
        return y.view(*x.shape[:-1], N)
    return _linear(x, weight, bias, scale)


def row_invariant_max_t() -> int | None:
    """The longest sequence generation prefills in row-invariant mode here (None: any)."""
    return PREFILL_KERNEL_MAX_T if kernels.available() else None


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
    if torch.is_grad_enabled() or x.dtype != torch.float32:
        return reference.linear(x, weight, bias, scale)
    K, N = weight.shape[1], weight.shape[0]
    rows = x.numel() // K
    # bf16 and int8 weights take the kernel at any size (torch has no cheaper skinny op for them),
    # and for a short prompt too, 4 rows at a time, which beats dequantizing the weight
    low_precision = weight.dtype != torch.float32
    decoding = x.dim() == 3 and x.shape[1] == 1
    if decoding and not kernels.available():
        return reference.linear(x, weight, bias, scale)  # its batch-invariant form (reference.py)
    if ((decoding or (0 < rows <= (_LOW_PRECISION_KERNEL_MAX_ROWS if low_precision else kernels.MAX_ROWS)
                      and (low_precision or weight.numel() >= _SKINNY_MIN_WEIGHTS)))
            and weight.is_contiguous() and kernels.available()):
        y = kernels.skinny_linear(x.reshape(rows, K).contiguous(), weight, bias, scale)
        return y.view(*x.shape[:-1], N)
    if low_precision:
        return _linear_low_precision(x, weight, bias, scale, rows)
    if onednn_linear is not None and weight.numel() >= _ONEDNN_MIN_WEIGHTS:
        return onednn_linear(x.contiguous(), weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _linear_low_precision(x: Tensor, weight: Tensor, bias: Tensor | None, scale: Tensor | None,
                          rows: int) -> Tensor:
    """bf16 or int8 weights without the kernel, or for a long prompt: torch's weight-only int8 op
    for a few rows, else the weight dequantized to fp32 and one fp32 matmul (the matmul costs rows
    times the conversion, so a long prompt hardly notices it)."""
    if scale is not None and rows <= kernels.MAX_ROWS and int8pack_mm is not None:
        y = int8pack_mm(x.reshape(rows, -1).contiguous(), weight, scale)
        y = y if bias is None else y + bias
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, reference.dequantize(weight, scale, torch.float32), bias)


# torch's CPU weight-only int8 matmul (gpt-fast's int8 path), or None where this build lacks it
int8pack_mm = getattr(torch.ops.aten, "_weight_int8pack_mm", None)


# --- attention ---

# Causal attention without a cache: SDPA's flash kernel, or the same math spelled out
# (explicit_causal_attention). Spelled out is faster, forward + backward, up to this many tokens, and
# slower beyond, where its (T, T) scores outgrow the cache (benchmarks/train_throughput.py).
_EXPLICIT_ATTENTION_MAX_T = 128


def causal_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
    B, nh, T, hs = q.shape
    S = k.shape[2]
    if (T == 1 and dropout_p == 0 and q.dtype == torch.float32 and not torch.is_grad_enabled()
            and k.stride()[2:] == (hs, 1) and v.stride() == k.stride() and kernels.available()):  # a KV cache
        return kernels.decode_attention(q, k, v).view(B, 1, nh, hs).transpose(1, 2)  # (B, nh, 1, hs)
    if T == S and (dropout_p > 0 or T <= _EXPLICIT_ATTENTION_MAX_T):
        return explicit_causal_attention(q, k, v, dropout_p)
    return reference.causal_attention(q, k, v, dropout_p)


def explicit_causal_attention(q: Tensor, k: Tensor, v: Tensor, p: float = 0.0) -> Tensor:
    """softmax(q k^T / sqrt(hs) + causal mask), dropped out with probability p, times v: what SDPA
    computes with is_causal=True and dropout_p = p (SDPA with dropout runs this same math path on
    the CPU, but with bernoulli_ masks)."""
    B, nh, T, hs = q.shape
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)
    bias = torch.zeros(T, T, dtype=q.dtype, device=q.device).masked_fill_(future, float("-inf"))
    # one GEMM adds the mask and applies the 1/sqrt(hs) scale: bias + scale * q @ k^T
    att = torch.baddbmm(bias.expand(B * nh, T, T), q.reshape(B * nh, T, hs),
                        k.reshape(B * nh, T, hs).transpose(1, 2), alpha=1.0 / math.sqrt(hs))
    att = dropout(att.softmax(dim=-1), p, training=p > 0)
    return torch.bmm(att, v.reshape(B * nh, T, hs)).view(B, nh, T, hs)


def decode_blocks(model: torch.nn.Module, x: Tensor, where) -> Tensor | None:
    """A decoding step through every block in one C call (ops/decoder.py), at inference; not in
    row-invariant mode, where a one-token prompt runs the blocks as a longer one does."""
    if torch.is_grad_enabled() or is_row_invariant():
        return None
    return decoder.decode_blocks(model, x, where)


# --- dropout ---
#
# torch's CPU dropout draws one Mersenne-Twister number and one float compare per element
# (bernoulli_), a large part of a training step with dropout, most of it on the (B, nh, T, T)
# attention probabilities. Here one 64-bit draw gives four 15-bit uniform integers; a keep mask is
# an integer compare, and the drop probability is p rounded to a multiple of 2**-15
# (0.2 -> 0.20001), with the scale computed from the rounded value so the expectation stays exact.
# The masks come from the same torch generator, so seeding and the checkpointed RNG state hold.
_DROP_BITS = 15


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[Tensor, float]:
    """A bool mask that keeps each element with probability 1 - p' (p' = p rounded to 2**-15), and
    the scale 1 / (1 - p') that keeps the expectation of the kept values."""
    numel = math.prod(shape)
    threshold = round(p * 2**_DROP_BITS)
    if threshold >= 2**_DROP_BITS:
        return torch.zeros(shape, dtype=torch.bool, device=device), 0.0
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_()  # 63 random bits each
    r = words.view(torch.int16)[:numel].bitwise_and_(2**_DROP_BITS - 1)  # four 15-bit uniforms per word
    return (r >= threshold).view(shape), 2**_DROP_BITS / (2**_DROP_BITS - threshold)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    if not training or p == 0.0:
        return x
    keep, scale = keep_mask(x.shape, p, x.device)
    # A float mask times x: one multiply forward and one backward (faster than x * keep * scale,
    # where(keep, x * scale, 0) and native_dropout_backward; it keeps 4 bytes per element).
    return x * (keep * scale).to(x.dtype)


# --- activations ---

class GeluTanh(torch.autograd.Function):
    """GELU's tanh form through the C kernels: torch's CPU kernel for it runs slower than its exact
    GELU, ours faster than either (tests/test_kernels.py checks it against float64). Saves the
    input, as torch's does."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return kernels.gelu_tanh(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return kernels.gelu_tanh_backward(grad.contiguous(), x)


GELU_KERNEL_MIN = 4096  # below this many elements (decoding one token) the call costs more than torch's op


def gelu(x: Tensor) -> Tensor:
    """Through our kernel where it is built (not while torch.compile traces: it fuses its own),
    without autograd's wrapper where no gradient is wanted. A decoding step (x (B, 1, H)) is sized
    by one row, not the batch, so a row takes the same path (same bits) at any batch size; in
    row-invariant mode the kernel runs at any size."""
    size = x.shape[-1] if x.dim() == 3 and x.shape[1] == 1 else x.numel()
    if is_row_invariant() and not torch.is_grad_enabled():
        size = GELU_KERNEL_MIN
    if (size >= GELU_KERNEL_MIN and x.dtype == torch.float32 and x.is_contiguous()
            and not torch.compiler.is_compiling() and kernels.available()):
        if torch.is_grad_enabled() and x.requires_grad:
            return GeluTanh.apply(x)
        return kernels.gelu_tanh(x)
    return reference.gelu(x)


class ReluSquared(torch.autograd.Function):
    """relu(x)^2 with a one-multiply backward, 2 * relu(x) * grad, saving relu(x) only: autograd's
    relu().square() runs pow's and relu's backward separately, each a pass over the activation."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        r = torch.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (r,) = ctx.saved_tensors
        return grad.mul(r).mul_(2.0)


def relu2(x: Tensor) -> Tensor:
    return ReluSquared.apply(x)
