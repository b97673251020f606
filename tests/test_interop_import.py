"""`gpt-small import` of GPT-2 folders built here with real transformers (random weights, no hub):
logits equal transformers' to 1e-5, export(import(x)) == x, and everything else refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from gpt_small.checkpoint import load_checkpoint
from gpt_small.cli import main
from gpt_small.interop.hf_tokenizer import write_tokenizer
from gpt_small.tokenizer import CharTokenizer, gpt2_tokenizer

# the fields that decide what a GPT-2 computes (dropout, token ids and names do not)
COMPUTE_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "layer_norm_epsilon", "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "tie_word_embeddings")


def random_gpt2(**overrides) -> transformers.GPT2LMHeadModel:
    cfg = transformers.GPT2Config(**{"n_positions": 48, "n_embd": 32, "n_layer": 2, "n_head": 4, **overrides})
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # biases and norms away from 0/1, so a skipped or untransposed copy shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def gpt2_folder(path: Path, model: transformers.GPT2LMHeadModel, *, weights: str = "safetensors") -> Path:
    if weights == "safetensors":
        model.save_pretrained(path)
    else:  # an old-style folder: pytorch_model.bin holding a plain state dict
        path.mkdir(parents=True)
        model.config.save_pretrained(path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    write_tokenizer(gpt2_tokenizer(), path, model.config.n_positions)
    return path


def import_error(capsys, folder: Path, out: Path) -> str:
    """gpt-small import's one-line error for this folder (exit code 2)."""
    capsys.readouterr()  # transformers' progress bars from making the folder
    assert main(["import", "--hf", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt-small import: error:") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("weights,overrides", [
    ("safetensors", {}),
    ("bin", {}),
    ("safetensors", {"tie_word_embeddings": False, "activation_function": "gelu_pytorch_tanh", "n_inner": 64}),
])
def test_import_gives_transformers_logits_and_exports_back_to_the_same_model(tmp_path, weights, overrides, capsys):
    hf = random_gpt2(**overrides)
    folder = gpt2_folder(tmp_path / "hf", hf, weights=weights)
    assert main(["import", "--hf", str(folder), "--out", str(tmp_path / "run")]) == 0
    assert "gpt2 tokenizer" in capsys.readouterr().out
    ckpt = load_checkpoint(tmp_path / "run")
    cfg = ckpt.model.config
    assert (cfg.pos_encoding, cfg.activation, cfg.bias, ckpt.tokenizer.kind) == ("learned", "gelu", True, "gpt2")
    assert cfg.tie_embeddings == hf.config.tie_word_embeddings
    idx = torch.randint(0, 50257, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model.eval()(idx), hf(idx).logits, atol=1e-5, rtol=0)

    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "back")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
    assert type(back) is transformers.GPT2LMHeadModel
    a, b = hf.state_dict(), back.state_dict()
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for field in COMPUTE_FIELDS:
        assert getattr(back.config, field) == getattr(hf.config, field), field
    assert (back.config.n_inner or 4 * back.config.n_embd) == (hf.config.n_inner or 4 * hf.config.n_embd)
    # gelu_new and gelu_pytorch_tanh are the same function (GELU's tanh form); export writes gelu_new
    same = {"gelu_pytorch_tanh": "gelu_new"}
    assert same.get(back.config.activation_function, back.config.activation_function) == \
        same.get(hf.config.activation_function, hf.config.activation_function)


def test_import_refuses_other_architectures(tmp_path, capsys):
    neox = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=50257, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    neox.save_pretrained(tmp_path / "neox")
    assert "GPTNeoXForCausalLM" in import_error(capsys, tmp_path / "neox", tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change,message", [
    ({"vocab_size": 50304}, "vocab_size 50304"),
    ({"activation_function": "gelu"}, "activation_function 'gelu'"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
])
def test_import_refuses_gpt2_variants_it_cannot_compute_exactly(tmp_path, capsys, change, message):
    folder = gpt2_folder(tmp_path / "hf", random_gpt2(**change))
    assert message in import_error(capsys, folder, tmp_path / "run")


def test_import_refuses_a_tokenizer_that_is_not_gpt2s_and_bad_folders(tmp_path, capsys):
    folder = gpt2_folder(tmp_path / "hf", random_gpt2())
    write_tokenizer(CharTokenizer.train("abc"), folder, 48)  # replaces tokenizer.json
    assert "not GPT-2's" in import_error(capsys, folder, tmp_path / "run")

    (tmp_path / "empty").mkdir()
    assert "no config.json" in import_error(capsys, tmp_path / "empty", tmp_path / "run")

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert "holds no model.safetensors" in import_error(capsys, no_weights, tmp_path / "run")

    truncated = gpt2_folder(tmp_path / "trunc", random_gpt2())
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "cannot read the weights" in import_error(capsys, truncated, tmp_path / "run")


def test_import_without_tokenizer_files_notes_the_assumption(tmp_path, capsys):
    hf = random_gpt2()
    hf.save_pretrained(tmp_path / "hf")
    assert main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    assert "assuming GPT-2's tokenizer" in capsys.readouterr().err
