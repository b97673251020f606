"""The CUDA paths: bf16 autocast, fp16 with a GradScaler, fused AdamW, Muon's bf16 Newton-Schulz,
torch.compile, resume with the CUDA RNG, the KV cache, and NCCL.

Skipped without a CUDA GPU: CI has none. On a GPU machine: `pytest tests/test_cuda.py`
(benchmarks/gpu_check.sh runs it with the GPU benchmarks).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt_small import GPT, GPTConfig, TrainConfig
from gpt_small.checkpoint import find_checkpoint
from gpt_small.data import PreparedData
from gpt_small.generate import generate_tokens
from gpt_small.train import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def data_dir(verse_data) -> Path:
    return verse_data


def _configs(data_dir: Path, dropout: float = 0.0, **train) -> tuple[GPTConfig, TrainConfig]:
    vocab = PreparedData(data_dir).tokenizer.vocab_size
    model = GPTConfig.from_preset("tiny", vocab_size=vocab, dropout=dropout)
    defaults = dict(batch_size=8, max_steps=20, warmup_steps=5, eval_interval=10, eval_batches=2,
                    log_interval=1, checkpoint_interval=10, final_eval=False, device="cuda")
    return model, TrainConfig(**{**defaults, **train})


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def test_auto_dtype_is_bf16_with_fused_adamw_and_it_learns(data_dir, tmp_path):
    model, cfg = _configs(data_dir, max_steps=60, lr=3e-3, final_eval=True)
    trainer = Trainer(model, cfg, data_dir, tmp_path / "run", show_progress=False)
    summary = trainer.fit()
    assert trainer.device.type == "cuda" and trainer.amp_dtype == torch.bfloat16
    assert next(trainer.model.parameters()).device.type == "cuda"
    assert all(g["fused"] for g in trainer.optimizer.param_groups)
    assert not trainer.scaler.is_enabled()  # bf16 needs no loss scaling
    losses = _losses(tmp_path / "run")
    assert losses[60] < losses[1] - 1.0, (losses[1], losses[60])
    assert summary["final_val"]["loss"] < losses[1] - 1.0


def test_bf16_first_loss_matches_fp32_on_the_cpu(data_dir, tmp_path):
    """Same seed, same initial weights, same first batch: the loss before any update agrees to
    bf16 precision (the GPU's weights are the CPU's, moved)."""
    model, cfg = _configs(data_dir, max_steps=1)
    cpu = Trainer(model, dataclasses.replace(cfg, device="cpu", dtype="float32"), data_dir, tmp_path / "cpu",
                  show_progress=False)
    gpu = Trainer(model, cfg, data_dir, tmp_path / "gpu", show_progress=False)
    cpu.setup()
    gpu.setup()
    assert cpu.train_step() == pytest.approx(gpu.train_step(), abs=2e-2)


def test_fp16_uses_a_grad_scaler_and_learns(data_dir, tmp_path):
    model, cfg = _configs(data_dir, max_steps=60, lr=3e-3, dtype="float16")
    trainer = Trainer(model, cfg, data_dir, tmp_path / "run", show_progress=False)
    trainer.fit()
    assert trainer.amp_dtype == torch.float16 and trainer.scaler.is_enabled()
    losses = _losses(tmp_path / "run")
    assert losses[60] < losses[1] - 1.0, (losses[1], losses[60])


def test_muon_newton_schulz_runs_in_bf16_and_learns(data_dir, tmp_path):
    model, cfg = _configs(data_dir, max_steps=60, optimizer="muon", lr=3e-3, muon_lr=2e-2)
    trainer = Trainer(model, cfg, data_dir, tmp_path / "run", show_progress=False)
    trainer.fit()
    assert trainer.optimizer.muon.ns_dtype == torch.bfloat16
    losses = _losses(tmp_path / "run")
    assert losses[60] < losses[1] - 1.0, (losses[1], losses[60])


def test_resume_restores_the_cuda_rng(data_dir, tmp_path):
    """20 steps in one go against 10 + resume + 10, with dropout drawn from the CUDA generator:
    had its state not been restored, the masks after the resume would differ. fp32 (TF32 off)
    so the tolerance can be tight; the GPU's attention backward is not bitwise deterministic."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model, cfg = _configs(data_dir, dropout=0.2, dtype="float32")
    Trainer(model, cfg, data_dir, tmp_path / "a", show_progress=False).fit()
    first = Trainer(model, cfg, data_dir, tmp_path / "b", show_progress=False)
    first.fit(stop_after=10)
    Trainer(model, cfg, data_dir, tmp_path / "b", resume=True, show_progress=False).fit()
    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(la) == sorted(lb) == list(range(1, 21))
    for step in la:
        assert la[step] == pytest.approx(lb[step], abs=2e-4), step


def test_resume_test_can_see_a_different_dropout_stream(data_dir, tmp_path):
    """The tolerance above means something: another dropout seed moves the losses by more."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model, cfg = _configs(data_dir, dropout=0.2, dtype="float32")
    Trainer(model, cfg, data_dir, tmp_path / "a", show_progress=False).fit()
    Trainer(model, dataclasses.replace(cfg, seed=cfg.seed + 1), data_dir, tmp_path / "b", show_progress=False).fit()
    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert max(abs(la[s] - lb[s]) for s in range(11, 21)) > 1e-2


def test_compile_matches_eager(data_dir, tmp_path):
    model, cfg = _configs(data_dir, max_steps=10)
    Trainer(model, cfg, data_dir, tmp_path / "eager", show_progress=False).fit()
    Trainer(model, dataclasses.replace(cfg, compile=True), data_dir, tmp_path / "compiled", show_progress=False).fit()
    le, lc = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    for step in le:
        assert le[step] == pytest.approx(lc[step], abs=3e-2), step


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal", "rope"])
def test_cached_greedy_decoding_equals_the_full_forward(pos_encoding):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=64, pos_encoding=pos_encoding))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5)  # sharp logits: no near-ties for argmax to flip on
    model = model.cuda().eval()
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    ours = torch.stack(list(generate_tokens(model, prompt, max_new_tokens=50, temperature=0)), dim=1)
    idx = prompt.cuda()
    with torch.no_grad():
        for _ in range(50):  # nanoGPT's way: the whole window again for every token
            logits = model(idx[:, -model.config.block_size:])[:, -1]
            idx = torch.cat((idx, logits.argmax(-1)[:, None]), dim=1)
    assert torch.equal(ours, idx[:, 5:])
    assert min(len(set(row.tolist())) for row in ours) > 2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per process: 2 GPUs")
def test_nccl_ddp_matches_single_process(data_dir, tmp_path):
    n = torch.cuda.device_count()
    common = ["--data", str(data_dir), "--preset", "tiny", "--max-steps", "4", "--eval-interval", "100",
              "--log-interval", "1", "--no-progress", "--set", "dropout=0", "--set", "final_eval=false",
              "--warmup-steps", "1", "--device", "cuda", "--dtype", "float32"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NVIDIA_TF32_OVERRIDE": "0"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                          "-m", "gpt_small", "train", "--out", str(tmp_path / "ddp"), "--batch-size", "4", *common],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "gpt_small", "train", "--out", str(tmp_path / "one"),
                             "--batch-size", str(4 * n), *common], env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    wd = load_file(str(find_checkpoint(tmp_path / "ddp", "last") / "model.safetensors"))
    ws = load_file(str(find_checkpoint(tmp_path / "one", "last") / "model.safetensors"))
    for k in ws:
        torch.testing.assert_close(wd[k], ws[k], rtol=1e-3, atol=1e-4)
