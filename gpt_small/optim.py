"""Optimizers: AdamW (torch's), and Muon for the hidden matrices with AdamW for the rest.

Muon (Keller Jordan, 2024; the GPT-2 speed-running work): SGD with Nesterov momentum whose update,
for each 2-D weight matrix, is replaced by the nearest semi-orthogonal matrix (computed with five
Newton-Schulz iterations), scaled by sqrt(max(1, rows / cols)). It applies to the matrices inside
the transformer blocks only; embeddings, the output head, position tables, norms and biases stay
with AdamW, as in the reference implementation.

`MuonWithAdamW` holds the two optimizers behind one Optimizer-like object (`param_groups`,
`step`, `zero_grad`, `state_dict`, `load_state_dict`), so the trainer, its learning-rate schedule
(each group's `lr_ratio` scales the scheduled lr) and its checkpoints treat it like AdamW.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def orthogonalize(G: Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> Tensor:
    """The semi-orthogonal factor U V^T of each matrix G = U S V^T (G: (..., m, n)), approximately,
    by the quintic Newton-Schulz iteration of the Muon reference (coefficients chosen to converge
    fast, not exactly: singular values land in about [0.7, 1.2], which does not hurt training).

    Computed in `dtype`: the reference uses bfloat16, which the iteration tolerates and which
    saves time where bf16 matmuls run faster than fp32 (Trainer picks it there). Each
    step is two fused multiply-adds, b A + c A A and a X + B X (baddbmm), rather than matmuls
    followed by separate scale-and-add passes."""
    a, b, c = 3.4445, -4.7750, 2.0315
    shape = G.shape
    X = G.to(dtype).reshape(-1, *shape[-2:])
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # singular values <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A @ A
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B @ X
    return (X.mT if transposed else X).reshape(shape).to(G.dtype)


# Not torch.optim.Muon (torch >= 2.9): it orthogonalizes one matrix at a time, always in bf16, and is slower
# than this batched one at equal steps on the CPU (benchmarks/muon_step.py).
class Muon(torch.optim.Optimizer):
    """Momentum-orthogonalized updates for 2-D parameters (no weight decay).

    Matrices of one shape are orthogonalized together, as one batch of matmuls: a 4-layer model
    has four shapes, so a step runs 4 x 5 Newton-Schulz iterations instead of 16 x 5.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, ns_dtype: torch.dtype = torch.float32):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D parameters only, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            by_shape: dict[torch.Size, list[tuple[Tensor, Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])  # buf = momentum * buf + (1 - momentum) * g
                update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                by_shape.setdefault(p.shape, []).append((p, update))
            for shape, pairs in by_shape.items():
                updates = orthogonalize(torch.stack([u for _, u in pairs]), group["ns_steps"], self.ns_dtype)
                scale = -group["lr"] * max(1.0, shape[0] / shape[1]) ** 0.5
                for (p, _), u in zip(pairs, updates):
                    p.add_(u, alpha=scale)


def is_hidden_matrix(name: str, p: torch.nn.Parameter) -> bool:
    """The matrices Muon trains: 2-D weights inside the transformer blocks."""
    return p.dim() == 2 and ".h." in f".{name}"


class MuonWithAdamW:
    """Muon for `muon_params`, AdamW for `adamw_groups`, stepped together."""

    def __init__(self, muon_params: list[torch.nn.Parameter], adamw_groups: list[dict[str, Any]], *,
                 lr: float, muon_lr: float, momentum: float, betas: tuple[float, float], fused: bool,
                 ns_dtype: torch.dtype = torch.float32):
        self.muon = Muon(muon_params, lr=muon_lr, momentum=momentum, ns_dtype=ns_dtype)
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, fused=fused)
        for group in self.muon.param_groups:
            group["lr_ratio"] = muon_lr / lr  # the trainer's schedule sets lr * lr_ratio

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.adamw.param_groups + self.muon.param_groups

    def step(self, closure=None) -> None:
        self.adamw.step()
        self.muon.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.adamw.load_state_dict(state["adamw"])
        self.muon.load_state_dict(state["muon"])
