"""Muon: the orthogonalization, which parameters it takes, one step. Runs with it: test_train.py."""

from __future__ import annotations

import pytest
import torch

from gpt_small import GPT, GPTConfig
from gpt_small.optim import Muon, is_hidden_matrix, orthogonalize


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 16), (16, 64), (32, 32)])
def test_orthogonalize_flattens_singular_values(shape, dtype):
    g = torch.Generator().manual_seed(0)
    k = min(shape)
    U, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=g))
    V, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=g))
    G = U @ torch.diag(torch.logspace(0, 2, k)) @ V.T  # singular values spread over 100x
    X = orthogonalize(G, dtype=dtype)
    assert X.shape == G.shape and X.dtype == G.dtype
    s = torch.linalg.svdvals(X)
    assert s.min() > 0.5 and s.max() < 1.3, s  # the quintic iteration's band
    # the same singular vectors: X is close to U V^T of G
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    cos = (X * (U @ Vh)).sum() / (X.norm() * (U @ Vh).norm())
    assert cos > 0.95


def test_orthogonalize_batches_matrices_independently():
    G = torch.randn(3, 12, 40, generator=torch.Generator().manual_seed(1))
    batched = orthogonalize(G)
    for i in range(3):
        torch.testing.assert_close(batched[i], orthogonalize(G[i]), atol=1e-5, rtol=0)


def test_orthogonalize_in_bf16_stays_near_fp32():
    G = torch.randn(4, 32, 96, generator=torch.Generator().manual_seed(2))
    full, half = orthogonalize(G), orthogonalize(G, dtype=torch.bfloat16)
    assert half.dtype == torch.float32
    assert ((half - full).norm() / full.norm()) < 0.05  # bf16's 8 mantissa bits, five iterations


def test_muon_rejects_vectors_and_takes_only_block_matrices():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(3))])
    model = GPT(GPTConfig.from_preset("tiny", pos_encoding="learned", tie_embeddings=False))
    hidden = {n for n, p in model.named_parameters() if is_hidden_matrix(n, p)}
    assert "transformer.h.0.attn.c_attn.weight" in hidden and "transformer.h.1.mlp.c_proj.weight" in hidden
    assert not hidden & {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"}
    assert all(".ln_" not in n for n in hidden)


@pytest.mark.parametrize("shape, scale", [((8, 32), 1.0), ((32, 8), 2.0)])
def test_muon_step_moves_each_matrix_by_lr_times_an_orthogonal_update(shape, scale):
    """Wide matrices move by lr x the orthogonal factor; tall ones also by sqrt(rows / cols)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape))
    p.grad = torch.randn(shape)
    before = p.detach().clone()
    Muon([p], lr=0.1, momentum=0.0, nesterov=False).step()
    delta = (before - p.detach()) / 0.1
    torch.testing.assert_close(delta, scale * orthogonalize(p.grad), atol=1e-5, rtol=0)


def test_muon_momentum_and_nesterov_follow_the_reference_formula():
    """Two steps with momentum 0.9: buf = 0.9 buf + 0.1 g; Nesterov's update = 0.1 g + 0.9 buf."""
    g = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.randn(8, 32, generator=g))
    grads = [torch.randn(8, 32, generator=g) for _ in range(2)]
    for nesterov in (True, False):
        q = torch.nn.Parameter(p.detach().clone())
        opt = Muon([q], lr=0.1, momentum=0.9, nesterov=nesterov)
        expected, buf = p.detach().clone(), torch.zeros(8, 32)
        for grad in grads:
            q.grad = grad.clone()
            opt.step()
            buf = 0.9 * buf + 0.1 * grad
            update = 0.1 * grad + 0.9 * buf if nesterov else buf
            expected -= 0.1 * orthogonalize(update)
        torch.testing.assert_close(q.detach(), expected, atol=1e-5, rtol=0)
