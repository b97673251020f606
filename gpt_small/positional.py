"""The three ways a GPT here learns where a token is.

- `LearnedPositions`: a trained table of `block_size` vectors added to the token embeddings
  (GPT-2). It cannot look past `block_size`.
- `SinusoidalPositions`: the fixed table of "Attention Is All You Need", added the same way
  (to token embeddings scaled by sqrt(n_embd), as in that paper; see GPT.forward).
  PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(pos / 10000^(2i/d)). A non-persistent
  buffer: no parameter, nothing in the checkpoint, and extended on demand past `block_size`.
- `RotaryEmbedding`: RoFormer's rotation of each head's queries and keys, so that q_m . k_n depends
  on m - n only. Nothing is added to the embeddings.

RoPE pairing convention, used everywhere in this package (training, generation, export, import):
**half-split** (GPT-NeoX / Llama-in-Hugging-Face): dimension j is paired with dimension
j + head_size/2, and pair j turns by angle pos * theta^(-2j/head_size). The interleaved convention
(pairs (2j, 2j+1), RoFormer's paper and Meta's Llama code) is the same rotation with the head
dimensions permuted; we chose half-split because it needs two contiguous slices instead of a
strided view, which is faster on the CPU. Angles are always computed in float32: in bf16 a
position like 1000 is already rounded to a multiple of 8.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class LearnedPositions(nn.Module):
    def __init__(self, block_size: int, n_embd: int):
        super().__init__()
        self.block_size = block_size
        self.weight = nn.Parameter(torch.empty(block_size, n_embd))

    def forward(self, pos: Tensor) -> Tensor:
        """pos: (T,) int64 -> (T, C)."""
        return nn.functional.embedding(pos, self.weight)


def sinusoidal_table(n_pos: int, dim: int, base: float = 10000.0) -> Tensor:
    """(n_pos, dim) float32 table, the formula of Vaswani et al. (2017), section 3.5."""
    pos = torch.arange(n_pos, dtype=torch.float32)[:, None]  # (P, 1)
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(base) / dim))  # (d/2,)
    table = torch.empty(n_pos, dim, dtype=torch.float32)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)
    return table


class SinusoidalPositions(nn.Module):
    def __init__(self, block_size: int, n_embd: int):
        super().__init__()
        self.n_embd = n_embd
        self.register_buffer("table", sinusoidal_table(block_size, n_embd), persistent=False)

    def forward(self, pos: Tensor) -> Tensor:
        """pos: (T,) int64 -> (T, C); positions past the table extend it (generation past block_size)."""
        need = int(pos.max()) + 1
        if need > self.table.shape[0]:
            self.table = sinusoidal_table(max(need, 2 * self.table.shape[0]), self.n_embd).to(self.table.device)
        return self.table[pos]


class RotaryEmbedding(nn.Module):
    """cos/sin caches of shape (P, head_size/2) in float32, grown when a longer position is asked for."""

    def __init__(self, head_size: int, block_size: int, theta: float = 10000.0):
        super().__init__()
        self.head_size = head_size
        self.theta = theta
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._build(block_size)

    def _build(self, n_pos: int) -> None:
        device = self.inv_freq.device
        freqs = torch.outer(torch.arange(n_pos, dtype=torch.float32, device=device), self.inv_freq.float())
        self.register_buffer("cos", freqs.cos(), persistent=False)  # (P, hs/2)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, q: Tensor, k: Tensor, pos: Tensor, end: int | None = None) -> tuple[Tensor, Tensor]:
        """Rotate q and k of shape (B, nh, T, hs) at positions pos (T,).

        end (> every position), when the caller knows it, saves a device-to-host read per layer."""
        cos, sin = self.tables(int(pos.max()) + 1 if end is None else end)
        cos, sin = cos[pos], sin[pos]  # (T, hs/2), float32
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def tables(self, end: int) -> tuple[Tensor, Tensor]:
        """The cos and sin tables (P, hs/2), grown (doubling) until they reach position end - 1."""
        if end > self.cos.shape[0]:
            self._build(max(end, 2 * self.cos.shape[0]))
        return self.cos, self.sin


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) in float32: four in-place ops into one
    output, no temporaries."""
    h = x.shape[-1] // 2
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    x1, x2, o1, o2 = x[..., :h], x[..., h:], out[..., :h], out[..., h:]
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1.0)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
    return out


class _Rotary(torch.autograd.Function):
    """The rotation with its own backward: the transpose of a rotation is the rotation by the
    opposite angle, so the gradient is _rotate(grad, cos, -sin), written into one buffer; autograd
    through the chunk / mul / cat spelling allocates more and was slower at poem-cpu's shape
    (benchmarks/train_throughput.py)."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin).to(grad.dtype), None, None


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Half-split rotation of x (..., T, hs) by cos/sin (T, hs/2): (x1, x2) -> (x1 cos - x2 sin,
    x2 cos + x1 sin), computed in float32, returned in x's dtype."""
    return _Rotary.apply(x, cos, sin)
