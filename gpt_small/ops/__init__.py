"""The model's backend: the few operations whose fastest form depends on the device.

model.py calls these plain functions and nothing device-specific. Each dispatches on its input's
device type to a backend chosen once per device type (`backend()`):
- `cpu` (ops/cpu.py): C kernels for decoding and GELU (ops/kernels.py, ops/csrc/), oneDNN for
  prompts, a cheaper dropout, attention spelled out where that is faster;
- `torch` (ops/reference.py): torch's own functions; used on CUDA and MPS, and on the CPU with
  `GPT_SMALL_OPS=torch`. The tests hold the CPU backend equal to it.
Choosing the CPU backend compiles or loads the C kernels (no compiler at a forward pass);
`GPT_SMALL_KERNELS=0` keeps the CPU backend without them. `describe()` says what runs.

Contracts (all shapes as in model.py: B batch, T new tokens, S keys, nh heads, hs head size):
- `linear(x, weight, bias=None, scale=None)`: x @ weight.T + bias. weight (N, K) in x's dtype, or
  bf16, or int8 with `scale` (N,) per output row (weight-only quantization: ops/quantize.py).
- `causal_attention(q, k, v, dropout_p=0.0)`: q (B, nh, T, hs), k and v (B, nh, S, hs) with
  S >= T; the queries are the last T of the S positions, each sees the keys up to its own.
- `dropout(x, p, training)`, `gelu(x)` (GPT-2's tanh form), `relu2(x)` (relu(x)^2).
- `decode_blocks(model, x, where)`: for one new token per row (x (B, 1, C), the KV cache set up,
  `where` the kv_cache.Placement of the forward), what the model's blocks return, computed in one
  call; or None where the backend has no such path (then the model runs its blocks one by one).

Row-invariant mode (`with ops.row_invariant():`, per thread, ops/mode.py): a prefill for generation
computes each token row the same way whatever other rows run beside it, so a prompt prefilled
alone and inside a batched prefill of other prompts give the same bits:
- `linear`: a library GEMM (MKL, oneDNN) blocks, and so rounds, a row by the number of rows beside
  it. In the mode the CPU backend sends every product to the C kernel, which computes every row
  alike at any number of rows; the torch backend multiplies row by row (one small product per
  token, as it decodes). The kernel is slower than the library GEMM on long prompts
  (benchmarks/prefill_kernel.py), so generation enters the mode only for sequences of up to
  `row_invariant_max_t(device)` tokens (generate.prefill): a rule on one sequence's length, never
  on the batch, so a prompt takes the same path alone and in the serve engine's batched prefill,
  and a longer prompt is prefilled alone, outside the mode, the same call in both.
- `gelu`: the C kernel (its lanes all compute alike) at any size; the torch backend row by row
  (torch's vectorised loops take another code path for the last elements of a call, so where a
  row sits would matter).
- `decode_blocks` does not apply (a one-token prompt runs the blocks like longer ones).
LayerNorm, ReLU, ReLU², RoPE, embeddings and residual adds compute each element or row alike
already; attention runs per sequence (model.py).
"""

from __future__ import annotations

import os
import types

import torch
from torch import Tensor

from . import cpu, kernels, reference
from .mode import is_row_invariant, row_invariant  # noqa: F401  (re-exported)

_chosen: dict[str, types.ModuleType] = {}


def backend(device: torch.device | str) -> types.ModuleType:
    """The backend for a device type, chosen (and, for the CPU, its kernels built) on first use."""
    kind = torch.device(device).type
    if kind not in _chosen:
        if kind == "cpu" and os.environ.get("GPT_SMALL_OPS", "cpu") != "torch":
            cpu.prepare()
            _chosen[kind] = cpu
        else:
            _chosen[kind] = reference
    return _chosen[kind]


def describe(device: torch.device | str = "cpu") -> str:
    chosen = backend(device)
    if chosen is reference:
        return "ops: torch" + (" (GPT_SMALL_OPS=torch)" if torch.device(device).type == "cpu" else "")
    return f"ops: cpu; {kernels.describe()}"


def _for(x: Tensor) -> types.ModuleType:
    return _chosen.get(x.device.type) or backend(x.device)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
    return _for(x).linear(x, weight, bias, scale)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
    return _for(q).causal_attention(q, k, v, dropout_p)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    return _for(x).dropout(x, p, training)


def gelu(x: Tensor) -> Tensor:
    return _for(x).gelu(x)


def relu2(x: Tensor) -> Tensor:
    return _for(x).relu2(x)


def row_invariant_max_t(device: torch.device | str) -> int | None:
    """The longest sequence that generation prefills in row-invariant mode on this device (so the
    longest a batched prefill may hold); a longer one is prefilled alone, outside the mode, where
    the library's GEMM is faster. None: any length. 0 off the CPU: an accelerator's row-by-row
    products would cost a launch per token, and the server runs on the CPU."""
    if torch.device(device).type != "cpu":
        return 0
    return backend(device).row_invariant_max_t()


def decode_blocks(model: torch.nn.Module, x: Tensor, where) -> Tensor | None:
    return _for(x).decode_blocks(model, x, where)
