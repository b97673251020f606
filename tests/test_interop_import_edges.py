"""`gpt-small import` at its edges, on GPT-2 folders written by real transformers (random weights):
each documented weights layout (one safetensors file, sharded safetensors with their index,
pytorch_model.bin; the hub's GPT-2 files name their tensors without the `transformer.` prefix,
older ones keep the attention-mask buffers), the tokenizer files it accepts (tokenizer.json,
possibly with an added pad token past GPT-2's table, or an old-style vocab.json), and each one-line
refusal: weights that do not fit config.json, a pickle that would run code, a shard linked out of
the folder, an --out that holds a checkpoint, a model beyond memory.

Documented in docs/interop.md ("Import a GPT-2") and gpt_small/interop/hf_import.py.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gpt_small import limits
from gpt_small.checkpoint import find_checkpoint, load_checkpoint, read_checkpoint_config
from gpt_small.cli import main
from gpt_small.config import ConfigError
from gpt_small.errors import GPTSmallError
from gpt_small.interop.hf_import import import_gpt2
from gpt_small.tokenizer import gpt2_tokenizer

from test_interop_import import gpt2_folder, random_gpt2


@pytest.fixture(scope="module")
def hf():
    return random_gpt2()


def _same_logits(run: Path, hf) -> None:
    model = load_checkpoint(run).model.eval()
    idx = torch.randint(0, 50257, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-5, rtol=0)


def _config_only(path: Path, hf) -> Path:
    path.mkdir(parents=True)
    hf.config.save_pretrained(path)
    return path


def _error(fn, *args) -> str:
    with pytest.raises(GPTSmallError) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


# ---------------------------------------------------------------- the layouts it reads

def test_sharded_safetensors_import_and_the_cli_says_what_it_read(hf, tmp_path, capsys):
    folder = tmp_path / "hf"
    hf.save_pretrained(folder, max_shard_size="2MB")
    index = folder / "model.safetensors.index.json"
    assert index.is_file() and not (folder / "model.safetensors").exists()
    assert len(set(json.loads(index.read_text())["weight_map"].values())) > 1
    capsys.readouterr()
    assert main(["import", "--hf", str(folder), "--out", str(tmp_path / "run")]) == 0
    out, err = capsys.readouterr()
    assert out == f"imported {index} to {tmp_path / 'run'}: 2 layers, 4 heads, 32 wide, block 48, gelu, gpt2 tokenizer\n"
    assert err == f"note: {folder} has no tokenizer.json or vocab.json; assuming GPT-2's tokenizer\n"
    _same_logits(tmp_path / "run", hf)


def test_the_hubs_unprefixed_names_and_old_mask_buffers_import(hf, tmp_path):
    # the hub's gpt2 files name tensors h.0.attn... (GPT2Model's names) and hold no lm_head (tied)
    unprefixed = _config_only(tmp_path / "hub", hf)
    save_file({k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items()
               if k != "lm_head.weight"}, str(unprefixed / "model.safetensors"))
    assert import_gpt2(unprefixed, tmp_path / "run1").weights == unprefixed / "model.safetensors"
    _same_logits(tmp_path / "run1", hf)
    # older transformers saved each block's causal-mask buffers too (first here, as in those files)
    old = _config_only(tmp_path / "old", hf)
    buffers = {}
    for i in range(hf.config.n_layer):
        buffers[f"h.{i}.attn.bias"] = torch.tril(torch.ones(48, 48)).view(1, 1, 48, 48)
        buffers[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save({**buffers, **hf.state_dict()}, old / "pytorch_model.bin")
    assert import_gpt2(old, tmp_path / "run2").weights == old / "pytorch_model.bin"
    _same_logits(tmp_path / "run2", hf)



def test_a_pytorch_model_bin_saved_from_a_gpu_imports_on_the_cpu(hf, tmp_path, monkeypatch):
    """Most .bin files were saved from CUDA tensors: their storages say "cuda:0" (written here by
    torch.save itself, told so), which torch.load can only place on the CPU when asked to."""
    folder = _config_only(tmp_path / "hf", hf)
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(hf.state_dict(), folder / "pytorch_model.bin")
    assert b"cuda:0" in (folder / "pytorch_model.bin").read_bytes()
    import_gpt2(folder, tmp_path / "run")
    _same_logits(tmp_path / "run", hf)

def test_an_imported_run_is_step_0_with_last_and_best_and_names_its_source(hf, tmp_path):
    folder = gpt2_folder(tmp_path / "hf", hf)
    r = import_gpt2(folder, tmp_path / "run")
    assert (r.out, r.notes, r.config.n_layer) == (tmp_path / "run", [], 2)
    last, best = find_checkpoint(tmp_path / "run", prefer="last"), find_checkpoint(tmp_path / "run")
    assert last == best and last.name == "step-000000"
    assert os.readlink(tmp_path / "run" / "best") == os.readlink(tmp_path / "run" / "last")  # both links made
    meta = read_checkpoint_config(last)
    assert meta["step"] == 0 and meta["imported_from"] == str(folder.resolve()) and meta["data"] is None
    assert meta.get("val_loss", "absent") is None  # recorded, and not measured (a run's best records its own)
    assert meta["model"] == r.config.to_dict()
    assert load_checkpoint(tmp_path / "run").tokenizer.kind == "gpt2"



@pytest.mark.parametrize("hf_name, ours", [("gelu_new", "gelu"), ("gelu_pytorch_tanh", "gelu"), ("relu", "relu"),
                                           ("relu2", "relu2"), (None, "gelu")])  # None: config.json leaves it out
def test_each_activation_name_imports_as_the_function_it_names(tmp_path, hf_name, ours):
    from gpt_small.interop.hf_import import gpt_config_of

    config = {"model_type": "gpt2", **({"activation_function": hf_name} if hf_name else {})}
    assert gpt_config_of(config, tmp_path).activation == ours

# ---------------------------------------------------------------- tokenizer files

def test_tokenizer_files_gpt2s_with_a_pad_or_as_vocab_json_are_accepted(hf, tmp_path):
    import transformers

    folder = gpt2_folder(tmp_path / "hf", hf)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    tok.add_special_tokens({"pad_token": "<pad>"})  # id 50257, past GPT-2's table
    assert tok.convert_tokens_to_ids("<pad>") == 50257
    tok.save_pretrained(folder)
    assert import_gpt2(folder, tmp_path / "run1").notes == []
    old = gpt2_folder(tmp_path / "old", hf)
    (old / "tokenizer.json").unlink()
    (old / "vocab.json").write_text(json.dumps(gpt2_tokenizer().hf.get_vocab(), ensure_ascii=False), encoding="utf-8")
    assert import_gpt2(old, tmp_path / "run2").notes == []


def test_tokenizer_files_that_are_not_gpt2s_or_unreadable_are_refused(hf, tmp_path):
    folder = gpt2_folder(tmp_path / "hf", hf)
    (folder / "tokenizer.json").unlink()
    vocab = gpt2_tokenizer().hf.get_vocab()
    vocab["Ġthe"], vocab["Ġa"] = vocab["Ġa"], vocab["Ġthe"]  # GPT-2's tokens, two ids swapped
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    assert _error(import_gpt2, folder, tmp_path / "run") == (
        f"the tokenizer in {folder} is not GPT-2's; gpt-small imports GPT-2 models with GPT-2's tokenizer only")
    (folder / "vocab.json").write_text("{not json", encoding="utf-8")
    assert _error(import_gpt2, folder, tmp_path / "run").startswith(f"cannot read {folder / 'vocab.json'}: not valid JSON")
    (folder / "tokenizer.json").write_text("{not json", encoding="utf-8")  # tokenizer.json is read first
    assert _error(import_gpt2, folder, tmp_path / "run").startswith(f"{folder / 'tokenizer.json'} is unreadable: ")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- refusals

def test_a_folder_without_config_json_or_weights_or_with_sizes_out_of_range_is_refused(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    assert _error(import_gpt2, folder, tmp_path / "run") == (
        f"{folder} has no config.json: not a transformers model folder")
    for config, says in (({"n_layer": 0}, "field 'n_layer': input should be greater than or equal to 1, got 0"),
                         ({"n_embd": "32"}, "field 'n_embd': input should be a valid integer, got '32'")):
        (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", **config}))
        assert _error(import_gpt2, folder, tmp_path / "run") == f"{folder / 'config.json'}: {says}"
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "scale_attn_weights": False}))
    assert _error(import_gpt2, folder, tmp_path / "run") == (  # the folder named, before any weight is looked for
        f"{folder}: scale_attn_weights=false (unscaled attention); gpt-small cannot compute this GPT-2 exactly")
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2}))
    assert _error(import_gpt2, folder, tmp_path / "run") == (
        f"{folder} holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    assert not (tmp_path / "run").exists()


class _RunsCode:
    def __reduce__(self):
        return (os.mkdir, (str(self.path),))


def test_a_pickle_that_would_run_code_or_holds_no_state_dict_is_refused(hf, tmp_path, monkeypatch):
    folder = _config_only(tmp_path / "hf", hf)
    evil = _RunsCode()
    evil.path = tmp_path / "pwned"
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"transformer.wte.weight": evil}, f)
    refused = (f"cannot read the weights in {folder}: it holds pickled objects other than tensors, which gpt-small "
               "refuses to load (loading them could run code from the file)")
    assert _error(import_gpt2, folder, tmp_path / "run") == refused
    assert not evil.path.exists()  # torch.load(weights_only=True) ran nothing
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's switch for loads that leave it unsaid
    assert _error(import_gpt2, folder, tmp_path / "run") == refused
    assert not evil.path.exists()
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    torch.save([t for t in hf.state_dict().values()], folder / "pytorch_model.bin")
    assert _error(import_gpt2, folder, tmp_path / "run") == f"{folder / 'pytorch_model.bin'} does not hold a state dict"
    assert not (tmp_path / "run").exists()


def test_a_shard_linked_out_of_the_folder_is_refused(hf, tmp_path):
    folder = tmp_path / "hf"
    hf.save_pretrained(folder, max_shard_size="2MB")
    index = folder / "model.safetensors.index.json"
    shard = sorted(set(json.loads(index.read_text())["weight_map"].values()))[-1]
    (tmp_path / "elsewhere").mkdir()
    (folder / shard).rename(tmp_path / "elsewhere" / shard)
    (folder / shard).symlink_to(tmp_path / "elsewhere" / shard)
    assert _error(import_gpt2, folder, tmp_path / "run") == f"{index}: shard {shard!r} lies outside {folder}"



@pytest.mark.parametrize("weight_map, says", [
    ({}, "dictionary should have at least 1 item after validation, not 0, got {}"),
    ({"h.0.ln_1.weight": "/etc/passwd"}, "shard '/etc/passwd' is not a file name inside the model folder"),
    ({"h.0.ln_1.weight": "../x.safetensors"}, "shard '../x.safetensors' is not a file name inside the model folder"),
])
def test_a_shard_index_naming_no_shard_or_a_path_out_is_refused_before_reading(hf, tmp_path, weight_map, says):
    folder = _config_only(tmp_path / "hf", hf)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert _error(import_gpt2, folder, tmp_path / "run") == f"{index}: field 'weight_map': {says}"

def test_weights_that_do_not_fit_config_json_are_refused_naming_them(hf, tmp_path):
    untied = _config_only(tmp_path / "untied", random_gpt2(tie_word_embeddings=False))
    save_file({k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"},
              str(untied / "model.safetensors"))
    assert _error(import_gpt2, untied, tmp_path / "run") == (
        "the config says the head is untied but the weights hold no lm_head.weight")
    deeper = _config_only(tmp_path / "deeper", random_gpt2(n_layer=3))  # config.json: 3 layers, weights: 2
    save_file({k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"},
              str(deeper / "model.safetensors"))
    missing = sorted(f"transformer.h.2.{n}" for n in ("attn.c_attn.bias", "attn.c_attn.weight", "attn.c_proj.bias",
                                                    "attn.c_proj.weight", "ln_1.bias", "ln_1.weight", "ln_2.bias",
                                                    "ln_2.weight", "mlp.c_fc.bias", "mlp.c_fc.weight",
                                                    "mlp.c_proj.bias", "mlp.c_proj.weight"))
    assert _error(import_gpt2, deeper, tmp_path / "run") == (
        f"the weights in {deeper / 'model.safetensors'} do not fit its config.json: missing {missing[:5]}, "
        "unexpected []")
    shallower = _config_only(tmp_path / "shallower", random_gpt2(n_layer=1))  # config.json: 1 layer, weights: 2
    save_file({k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"},
              str(shallower / "model.safetensors"))
    unexpected = [m.replace("h.2.", "h.1.") for m in missing]  # the second layer's names, 5 of its 12
    assert _error(import_gpt2, shallower, tmp_path / "run") == (
        f"the weights in {shallower / 'model.safetensors'} do not fit its config.json: missing [], "
        f"unexpected {unexpected[:5]}")
    for name, config, mismatch in [
        # config.json: 64 positions, weights: 48
        ("longer", dict(n_positions=64), "transformer.wpe.weight: copying a param with shape torch.Size([48, 32])"
                                         " from checkpoint, the shape in current model is torch.Size([64, 32])."),
        # every tensor mismatches: the first is named
        ("wider", dict(n_embd=64), "transformer.wte.weight: copying a param with shape torch.Size([50257, 32])"
                                   " from checkpoint, the shape in current model is torch.Size([50257, 64])."),
    ]:
        folder = _config_only(tmp_path / name, random_gpt2(**config))
        save_file({k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"},
                  str(folder / "model.safetensors"))
        assert _error(import_gpt2, folder, tmp_path / "run") == (
            f"the weights in {folder / 'model.safetensors'} do not fit its config.json: size mismatch for {mismatch}")
    assert not (tmp_path / "run").exists()



def test_a_tied_head_is_wte_and_another_head_in_the_file_is_refused(hf, tmp_path):
    """A tied config (GPT-2's): a file that also holds the head (equal to wte, as torch.save of the
    state dict writes it) imports; a head other than wte is refused, since transformers' versions
    disagree on which one it uses; a head without wte names wte as the missing weight."""
    sd = {k: v.clone().contiguous() for k, v in hf.state_dict().items()}
    assert torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"])
    same = _config_only(tmp_path / "same", hf)
    save_file(sd, str(same / "model.safetensors"))
    import_gpt2(same, tmp_path / "run")
    _same_logits(tmp_path / "run", hf)
    other = _config_only(tmp_path / "other", hf)
    save_file({**sd, "lm_head.weight": sd["lm_head.weight"] + 0.01}, str(other / "model.safetensors"))
    assert _error(import_gpt2, other, tmp_path / "run2") == (
        "the config says the head is tied but the weights hold an lm_head.weight other than wte; set "
        "tie_word_embeddings in config.json to say which head the model has")
    no_wte = _config_only(tmp_path / "no-wte", hf)
    save_file({k: v for k, v in sd.items() if k != "transformer.wte.weight"}, str(no_wte / "model.safetensors"))
    assert _error(import_gpt2, no_wte, tmp_path / "run2") == (
        f"the weights in {no_wte / 'model.safetensors'} do not fit its config.json: missing "
        "['transformer.wte.weight'], unexpected []")
    assert not (tmp_path / "run2").exists()

def test_an_out_holding_a_checkpoint_and_a_file_as_the_folder_are_refused(hf, tmp_path):
    folder = gpt2_folder(tmp_path / "hf", hf)
    assert _error(import_gpt2, folder / "config.json", tmp_path / "run") == f"{folder / 'config.json'} is not a folder"
    for link in ("last", "best"):
        out = tmp_path / f"has-{link}"
        out.mkdir()
        (out / link).symlink_to(out / "checkpoints" / "gone")  # a broken link counts too
        assert _error(import_gpt2, folder, out) == f"{out} already holds a checkpoint; choose another --out"


def test_a_model_beyond_memory_is_refused_before_its_weights_are_read(hf, tmp_path, monkeypatch):
    folder = gpt2_folder(tmp_path / "hf", hf)
    params = sum(p.numel() for n, p in hf.named_parameters() if n != "lm_head.weight")  # the head is tied
    need = limits.model_bytes(params)  # fp32 weights only: nothing trains
    monkeypatch.setattr(limits, "available_memory", lambda: need - 1)
    with pytest.raises(ConfigError) as e:
        import_gpt2(folder, tmp_path / "run")
    assert str(e.value).startswith(f"the model in {folder} ({params:,} parameters) needs ~")
    monkeypatch.setattr(limits, "available_memory", lambda: need)
    import_gpt2(folder, tmp_path / "run")
