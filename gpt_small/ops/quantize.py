"""Decoding weights in fewer bytes: bf16, or int8 weight-only quantization.

Decoding reads every weight once per token, so on a CPU it runs at the memory bandwidth divided
by the bytes of the weights (docs/decoding.md). Two bytes per weight (bf16) or one (int8) is the
lever llama.cpp and gpt-fast use. `convert_weights(model, "int8")` converts a loaded model in
place, for inference only:
- every Linear's weight becomes bf16, or int8 with one fp32 scale per output row (symmetric,
  absmax: scale = max |w_row| / 127, q = round(w / scale), so |q * scale - w| <= scale / 2);
- activations, biases, LayerNorms and the KV cache stay fp32, and so do the embeddings, of which a
  token reads one row; a head tied to the embedding gets a converted copy of its own.
The CPU backend multiplies such weights with the C kernel for 1-8 rows (decoding) and with the
weight dequantized to fp32 for more (a prompt, an evaluation batch); elsewhere, or without the
kernels, torch's ops do it (ops/cpu.py, ops/reference.py).
"""

from __future__ import annotations

import typing
from typing import Literal

import torch
from torch import Tensor, nn

from ..errors import GPTSmallError
from . import linear

Weights = Literal["float32", "bfloat16", "int8"]
WEIGHTS: tuple[str, ...] = typing.get_args(Weights)


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(N, K) float weight -> (N, K) int8 and (N,) fp32 scales, symmetric per output row."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale is exact
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """A Linear for inference whose weight is int8 with a scale per output row (gpt-fast's
    WeightOnlyInt8Linear); the state dict holds `weight` (int8), `scale` and `bias`."""

    def __init__(self, weight: Tensor, scale: Tensor, bias: Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, module: nn.Linear) -> Int8Linear:
        q, scale = quantize_int8(module.weight)
        bias = None if module.bias is None else module.bias.detach().float().clone()
        return cls(q.to(module.weight.device), scale.to(module.weight.device), bias)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self.scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=int8"


def check_weights(weights: str) -> None:
    if weights not in WEIGHTS:
        raise GPTSmallError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")


def convert_weights(model: nn.Module, weights: str) -> nn.Module:
    """Store every Linear weight of `model` as `weights` (float32: unchanged) for decoding; returns
    the model, in eval mode. Irreversible: load the checkpoint again for other weights."""
    check_weights(weights)
    if weights == "float32":
        return model.eval()
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, module in targets:
        if weights == "bfloat16":
            # a new Parameter, so a weight shared with the embedding (a tied head) stays fp32 there
            module.weight = nn.Parameter(module.weight.detach().to(torch.bfloat16), requires_grad=False)
        else:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, Int8Linear.from_linear(module))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def weights_of(model: nn.Module) -> str:
    """What convert_weights made of `model`'s Linears: int8, bfloat16 or float32 (untouched)."""
    for m in model.modules():
        if isinstance(m, Int8Linear):
            return "int8"
        if isinstance(m, nn.Linear) and m.weight.dtype == torch.bfloat16:
            return "bfloat16"
    return "float32"
