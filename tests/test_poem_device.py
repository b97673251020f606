"""`make poem`'s device choice: the GPU recipe (configs/poem-gpu.toml, 3 minutes, runs/poem-gpu) where
the run's device is CUDA or MPS, the CPU recipe elsewhere, and the line that says which. This machine
has no GPU, so CUDA and MPS are simulated by what torch reports (`is_available`, the card's name);
the recipe file itself is resolved for real. tests/test_cuda.py trains on a real GPU where there is one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpt_small import poem
from gpt_small.config_sources import resolve_configs
from gpt_small.device import pick_dtype
from gpt_small.errors import GPTSmallError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


@pytest.fixture
def mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)


def test_on_this_cpu_machine_make_poem_keeps_the_cpu_recipe():
    assert not torch.cuda.is_available()
    assert poem.recipe_for("auto") == ("configs/poem-cpu.toml", "runs/poem-cpu")
    assert poem.default_minutes("auto") == 10.0
    assert poem.device_line("cpu").startswith("device: cpu (")


def test_with_cuda_make_poem_takes_the_gpu_recipe_for_3_minutes_and_says_so(cuda):
    assert poem.recipe_for("auto") == ("configs/poem-gpu.toml", "runs/poem-gpu")
    assert poem.default_minutes("auto") == 3.0
    assert poem.device_line("auto", "auto") == "device: cuda (NVIDIA H200), bfloat16 autocast"
    assert poem.recipe_for("cpu") == ("configs/poem-cpu.toml", "runs/poem-cpu")  # --set device=cpu wins
    assert poem.default_minutes("cpu") == 10.0


def test_with_mps_make_poem_takes_the_gpu_recipe_in_fp32(mps):
    assert poem.recipe_for("auto") == ("configs/poem-gpu.toml", "runs/poem-gpu")
    assert poem.default_minutes("auto") == 3.0
    assert poem.device_line("auto", "auto") == "device: mps (Apple GPU), fp32"


def test_a_set_device_is_read_from_the_last_set():
    assert poem._device_set(None) == "auto"
    assert poem._device_set(["lr=1e-3", "device=cuda", "device=cpu"]) == "cpu"
    assert poem._device_set(["devices=2"]) == "auto"


def test_the_gpu_recipe_resolves_to_a_gpu_sized_run_with_each_device_s_dtype():
    _, model, train = resolve_configs(config_file=str(ROOT / "configs" / "poem-gpu.toml"),
                                      model_overrides={"vocab_size": 100}, train_overrides={"max_time": 180}, sets=[])
    assert (model.n_layer, model.n_embd, model.block_size) == (6, 384, 256)
    assert train.batch_size * model.block_size == 16384 and train.device == "auto" and not train.compile
    assert pick_dtype(train.dtype, torch.device("mps")) == torch.float32  # MPS: fp32, which every op has


def test_a_missing_mps_op_is_one_line_naming_the_fallback(monkeypatch, mps, tmp_path, verse_data):
    """The failure injected where MPS raises it: inside training."""
    import gpt_small.device as device
    import gpt_small.train as train

    monkeypatch.setattr(device, "configure_process", lambda **kw: torch.device("mps"))

    def missing(self, *a, **k):
        raise NotImplementedError("The operator 'aten::_fused_rms_norm' is not currently implemented for the MPS "
                                  "device.\nmore text")

    monkeypatch.setattr(train.Trainer, "__init__", lambda self, *a, **k: None)
    monkeypatch.setattr(train.Trainer, "fit", missing)
    cfg = tmp_path / "c.toml"
    cfg.write_text('preset = "tiny"\n[train]\nthreads = 1\n')
    with pytest.raises(GPTSmallError) as e:
        poem.make_poem(data_dir=verse_data, run_dir=tmp_path / "run", config_file=str(cfg), minutes=1.0)
    msg = str(e.value)
    assert "\n" not in msg and "aten::_fused_rms_norm" in msg and "PYTORCH_ENABLE_MPS_FALLBACK=1" in msg


def test_on_the_cpu_a_not_implemented_error_is_not_relabelled(monkeypatch, tmp_path, verse_data):
    import gpt_small.train as train

    monkeypatch.setattr(train.Trainer, "__init__", lambda self, *a, **k: None)
    monkeypatch.setattr(train.Trainer, "fit", lambda self: (_ for _ in ()).throw(NotImplementedError("x")))
    cfg = tmp_path / "c.toml"
    cfg.write_text('preset = "tiny"\n[train]\nthreads = 1\n')
    with pytest.raises(NotImplementedError):
        poem.make_poem(data_dir=verse_data, run_dir=tmp_path / "run", config_file=str(cfg), minutes=1.0,
                       sets=["device=cpu"])
