"""Muon: the orthogonalization, which parameters it takes, and a resumable run with it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from gpt_small import GPT, GPTConfig, TrainConfig
from gpt_small.checkpoint import find_checkpoint
from gpt_small.data import PreparedData
from gpt_small.errors import GPTSmallError
from gpt_small.optim import Muon, is_hidden_matrix, orthogonalize
from gpt_small.train import Trainer


@pytest.mark.parametrize("shape", [(64, 16), (16, 64), (32, 32)])
def test_orthogonalize_flattens_singular_values(shape):
    g = torch.Generator().manual_seed(0)
    k = min(shape)
    U, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=g))
    V, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=g))
    G = U @ torch.diag(torch.logspace(0, 2, k)) @ V.T  # singular values spread over 100x
    X = orthogonalize(G)
    assert X.shape == G.shape
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


def test_muon_rejects_vectors_and_takes_only_block_matrices():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(3))])
    model = GPT(GPTConfig.from_preset("tiny", pos_encoding="learned", tie_embeddings=False))
    hidden = {n for n, p in model.named_parameters() if is_hidden_matrix(n, p)}
    assert "transformer.h.0.attn.c_attn.weight" in hidden and "transformer.h.1.mlp.c_proj.weight" in hidden
    assert not hidden & {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"}
    assert all(".ln_" not in n for n in hidden)


def test_muon_step_moves_each_matrix_by_lr_times_an_orthogonal_update():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 32))
    p.grad = torch.randn(8, 32)
    before = p.detach().clone()
    Muon([p], lr=0.1, momentum=0.0, nesterov=False).step()
    delta = (before - p.detach()) / 0.1  # 8 x 32: wide, so no sqrt(rows/cols) factor
    torch.testing.assert_close(delta, orthogonalize(p.grad), atol=1e-5, rtol=0)


def _cfgs(data_dir, **train):
    vocab = PreparedData(data_dir).tokenizer.vocab_size
    model = GPTConfig.from_preset("tiny", vocab_size=vocab)
    base = dict(batch_size=4, max_steps=20, warmup_steps=2, eval_interval=5, eval_batches=2, log_interval=1,
                checkpoint_interval=10, final_eval=False, threads=1, optimizer="muon", muon_lr=0.05)
    return model, TrainConfig(**{**base, **train})


def _losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def test_muon_run_learns_and_resumes_exactly(verse_data, tmp_path):
    model, cfg = _cfgs(verse_data)
    Trainer(model, cfg, verse_data, tmp_path / "a", show_progress=False).fit()
    la = _losses(tmp_path / "a")
    assert la[20] < la[1] - 0.3  # it learns
    Trainer(model, cfg, verse_data, tmp_path / "b", show_progress=False).fit(stop_after=10)
    Trainer(model, cfg, verse_data, tmp_path / "b", resume=True, show_progress=False).fit()
    lb = _losses(tmp_path / "b")
    assert all(la[s] == pytest.approx(lb[s], abs=1e-6) for s in la)
    wa = load_file(str(find_checkpoint(tmp_path / "a", "last") / "model.safetensors"))
    wb = load_file(str(find_checkpoint(tmp_path / "b", "last") / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    # the scheduled lr reaches Muon's groups scaled by muon_lr / lr
    t = Trainer(model, cfg, verse_data, tmp_path / "b", resume=True, show_progress=False)
    t.setup()
    t.train_step()
    lrs = {g.get("lr_ratio", 1.0): g["lr"] for g in t.optimizer.param_groups}
    assert lrs[cfg.muon_lr / cfg.lr] == pytest.approx(lrs[1.0] * cfg.muon_lr / cfg.lr)


def test_resume_with_another_optimizer_is_refused(verse_data, tmp_path):
    model, cfg = _cfgs(verse_data, max_steps=2)
    Trainer(model, cfg, verse_data, tmp_path / "run", show_progress=False).fit()
    with pytest.raises(GPTSmallError, match="optimizer=muon"):
        Trainer(model, TrainConfig(**{**cfg.to_dict(), "optimizer": "adamw"}), verse_data, tmp_path / "run",
                resume=True, show_progress=False)
