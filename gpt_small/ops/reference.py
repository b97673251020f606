"""The torch backend: each op as torch's own functions, nothing device-specific.

Used on CUDA and MPS (where SDPA's fused kernels and torch's dropout are the fast paths), on the
CPU when `GPT_SMALL_OPS=torch`, and by the tests as the reference the CPU backend must equal.
Contracts are those of gpt_small/ops/__init__.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .mode import is_row_invariant


def dequantize(weight: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """A weight stored in bf16, or in int8 with one scale per output row, as `dtype`."""
    if scale is None:
        return weight.to(dtype)
    return weight.to(dtype) * scale.to(dtype)[:, None]


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
    if scale is not None or weight.dtype not in (x.dtype, torch.float32):  # (fp32 ones: autocast casts them)
        weight = dequantize(weight, scale, x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    decoding = x.dim() == 3 and x.shape[1] == 1 and x.shape[0] > 1
    if (decoding or is_row_invariant()) and not torch.is_grad_enabled():
        # A decoding step (one token per row), or any input in row-invariant mode (ops/mode.py): R
        # separate (1, K) @ (K, N) products, each the same problem whatever R is, where one (R, K)
        # GEMM may block and round the rows differently as R changes.
        K, N = x.shape[-1], weight.shape[0]
        rows = x.reshape(-1, 1, K)
        y = torch.bmm(rows, weight.t().expand(rows.shape[0], K, N)).view(*x.shape[:-1], N)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
    T, S = q.shape[2], k.shape[2]
    if T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    if T == 1:  # one new token sees every cached one
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    # a chunk after a cached prefix: query i sits at position S - T + i and sees keys up to there
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril_(S - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    return F.dropout(x, p, training=training) if training and p > 0 else x


def gelu(x: Tensor) -> Tensor:
    if is_row_invariant() and not torch.is_grad_enabled() and x.dim() > 1:
        # row by row: torch's vectorised loop computes the last elements of a call another way,
        # so where a row sits in one big call would change its bits (ops/__init__.py)
        rows = x.reshape(-1, x.shape[-1])
        return torch.stack([F.gelu(r, approximate="tanh") for r in rows.unbind(0)]).view(x.shape)
    return F.gelu(x, approximate="tanh")


def relu2(x: Tensor) -> Tensor:
    return torch.relu(x).square()


def row_invariant_max_t() -> None:
    return None  # every length: row-invariant mode multiplies row by row


def decode_blocks(model: torch.nn.Module, x: Tensor, where) -> None:
    return None  # no fused path: the model runs its blocks one by one
