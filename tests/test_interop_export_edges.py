"""`gpt-small export` at its edges, on tiny hand-made checkpoints: the files beside the weights as
a user (or another runtime) reads them, field by field; which architecture is chosen and the
"why" line printed for it; each one-line refusal (`--dtype`, `--target` and each runtime it names,
an `--out` that is a file or holds something); the sweep of hidden folders left by killed exports
(which names it takes, which it leaves).

Documented in docs/interop.md ("Export to transformers", "Other runtimes") and
gpt_small/interop/hf_export.py. Logits against transformers are in test_interop_export.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# the classes an exported folder loads as, imported once here: a tool that runs the tests in
# processes forked from one that collected them (tools/mutate.py) then does not import them per test
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel, GPTNeoXForCausalLM  # noqa: F401

from gpt_small.checkpoint import read_checkpoint_config, save_checkpoint
from gpt_small.cli import main
from gpt_small.config import GPTConfig
from gpt_small.errors import GPTSmallError
from gpt_small.interop.hf_export import choose_architecture, export_checkpoint, sweep_stale_exports
from gpt_small.model import GPT
from gpt_small.tokenizer import CharTokenizer, gpt2_tokenizer, train_bpe
from disk_util import tmpfs  # noqa: E402

TEXT = "The sea, the moon and the stars.\nO wind that blows!\n"
SMALL = dict(block_size=16, n_layer=1, n_head=2, n_embd=8)


@pytest.fixture(scope="module")
def char_tok() -> CharTokenizer:
    return CharTokenizer.train(TEXT)


def checkpoint(root: Path, tok, step: int = 3, **overrides) -> Path:
    cfg = GPTConfig(**{**SMALL, **overrides, "vocab_size": tok.vocab_size})
    torch.manual_seed(0)
    save_checkpoint(root, step=step, model=GPT(cfg), tokenizer=tok, config={"model": cfg.to_dict()})
    return root


def export(ckpt: Path, out: Path, **kw) -> Path:
    export_checkpoint(ckpt, out, evaluate=False, **kw)
    return out


def read(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


def refusal(*args, **kw) -> str:
    with pytest.raises(GPTSmallError) as e:
        export_checkpoint(*args, evaluate=False, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def ours(ckpt: Path) -> dict:
    """What every config.json carries about the checkpoint it came from."""
    meta = read_checkpoint_config(next((ckpt / "checkpoints").glob("step-*")))
    return {"step": meta["step"], "gpt_small_version": meta["gpt_small_version"], "model": meta["model"]}


# ---------------------------------------------------------------- config.json, field by field

def test_a_gpt2_export_declares_gpt2s_fields_for_what_our_model_computes(tmp_path, char_tok):
    """Every field GPT2LMHeadModel reads, set to what computes our model: the context as n_positions
    and n_ctx (llama.cpp's converter reads n_ctx), the MLP width as n_inner, GELU as gelu_new, torch's
    LayerNorm epsilon, scaled attention, no dropout; no end-of-text for a char tokenizer."""
    ckpt = checkpoint(tmp_path / "run", char_tok, mlp_ratio=3, activation="gelu", pos_encoding="learned")
    folder = export(ckpt, tmp_path / "hf", dtype="bfloat16")
    assert read(folder, "config.json") == {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": char_tok.vocab_size, "n_positions": 16, "n_ctx": 16, "n_embd": 8, "n_layer": 1, "n_head": 2,
        "n_inner": 24, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "bos_token_id": None, "eos_token_id": None, "use_cache": True,
        "dtype": "bfloat16", "torch_dtype": "bfloat16", "gpt_small": ours(ckpt),
    }


@pytest.mark.parametrize("activation, hf_name", [("relu", "relu"), ("relu2", "relu2")])
def test_a_sinusoidal_gpt2_export_writes_its_head_untied_and_names_the_activation(tmp_path, char_tok, activation,
                                                                                   hf_name):
    ckpt = checkpoint(tmp_path / "run", char_tok, pos_encoding="sinusoidal", activation=activation)
    config = read(export(ckpt, tmp_path / "hf"), "config.json")
    assert (config["activation_function"], config["tie_word_embeddings"], config["n_inner"]) == (hf_name, False, 32)
    assert (config["dtype"], config["torch_dtype"]) == ("float32", "float32")  # the default


def test_a_gpt_neox_export_declares_rotary_over_the_whole_head_and_a_sequential_residual(tmp_path):
    """Rotary positions: GPT-NeoX with rotary over the whole head (transformers 5's rope_parameters,
    and rotary_pct / rotary_emb_base for 4.x), sequential residual, attention biases as ours; a gpt2
    tokenizer declares <|endoftext|> (id 50256) as BOS and EOS."""
    ckpt = checkpoint(tmp_path / "run", gpt2_tokenizer(), pos_encoding="rope", activation="relu2", bias=False,
                      tie_embeddings=False, rope_theta=500.0, mlp_ratio=2)
    assert read(export(ckpt, tmp_path / "hf"), "config.json") == {
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox",
        "vocab_size": 50257, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 16, "hidden_act": "relu2", "max_position_embeddings": 16,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 1.0},
        "rotary_pct": 1.0, "rotary_emb_base": 500.0,
        "use_parallel_residual": False, "layer_norm_eps": 1e-5, "attention_bias": False,
        "hidden_dropout": 0.0, "attention_dropout": 0.0, "tie_word_embeddings": False,
        "bos_token_id": 50256, "eos_token_id": 50256, "use_cache": True,
        "dtype": "float32", "torch_dtype": "float32", "gpt_small": ours(ckpt),
    }


def test_a_remote_code_export_declares_our_fields_and_where_its_code_is(tmp_path, char_tok):
    ckpt = checkpoint(tmp_path / "run", char_tok, qk_norm=True, dropout=0.1, tie_embeddings=False)
    folder = export(ckpt, tmp_path / "hf")
    model = {k: v for k, v in GPTConfig(**{**SMALL, "qk_norm": True, "dropout": 0.1, "tie_embeddings": False,
                                           "vocab_size": char_tok.vocab_size}).to_dict().items() if k != "dropout"}
    assert read(folder, "config.json") == {
        "architectures": ["GPTSmallForCausalLM"], "model_type": "gpt_small",
        "auto_map": {"AutoConfig": "configuration_gpt_small.GPTSmallConfig",
                     "AutoModelForCausalLM": "modeling_gpt_small.GPTSmallForCausalLM"},
        **model, "tie_word_embeddings": False, "bos_token_id": None, "eos_token_id": None, "use_cache": False,
        "dtype": "float32", "torch_dtype": "float32", "gpt_small": ours(ckpt),
    }
    here = Path(__file__).resolve().parent.parent / "gpt_small" / "interop" / "remote"
    for name in ("configuration_gpt_small.py", "modeling_gpt_small.py"):
        assert (folder / name).read_bytes() == (here / name).read_bytes()



@pytest.mark.parametrize("overrides, head", [
    (dict(pos_encoding="learned"), None), (dict(pos_encoding="learned", tie_embeddings=False), "lm_head.weight"),
    (dict(pos_encoding="sinusoidal"), "lm_head.weight"),  # pre-scaled wte: the head is written apart
    (dict(pos_encoding="rope"), None), (dict(pos_encoding="rope", tie_embeddings=False), "embed_out.weight"),
    (dict(qk_norm=True), None), (dict(qk_norm=True, tie_embeddings=False), "lm_head.weight"),
])
def test_the_weights_hold_a_tied_head_once_and_every_tensor_in_the_dtype_asked(tmp_path, char_tok, overrides, head):
    from safetensors import safe_open

    folder = export(checkpoint(tmp_path / "run", char_tok, **overrides), tmp_path / "hf", dtype="bfloat16")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.metadata() == {"format": "pt"}  # as transformers writes it (its loader checks "format")
        assert {f.get_tensor(n).dtype for n in names} == {torch.bfloat16}
    heads = names & {"lm_head.weight", "embed_out.weight"}
    assert heads == ({head} if head else set())

# ---------------------------------------------------------------- generation_config.json

@pytest.mark.parametrize("shape, tokenizer", [
    (dict(pos_encoding="learned"), "char"), (dict(pos_encoding="rope"), "gpt2"), (dict(qk_norm=True), "char"),
    (dict(pos_encoding="learned"), "bpe"),
])
def test_generation_config_holds_our_sampling_defaults_and_the_eos(tmp_path, char_tok, shape, tokenizer):
    """Sampling at temperature 0.8 with no top-k or top-p (gpt-small generate's defaults); the EOS
    (gpt2's <|endoftext|>, else none) as BOS, EOS and pad; max_length at the context where the
    runtime cannot slide (GPT-2, GPT-NeoX), no cache for the remote code (it slides); a char
    model's unknown id never generated."""
    tok = {"char": char_tok, "gpt2": gpt2_tokenizer(), "bpe": train_bpe(TEXT * 50, vocab_size=300)}[tokenizer]
    gen = read(export(checkpoint(tmp_path / "run", tok, **shape), tmp_path / "hf"), "generation_config.json")
    eos = 50256 if tokenizer == "gpt2" else None
    want = {"do_sample": True, "temperature": 0.8, "top_k": None, "top_p": None,
            "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}
    want.update({"use_cache": False} if shape.get("qk_norm") else {"max_length": 16})
    if tokenizer == "char":
        want["bad_words_ids"] = [[char_tok.unk_id]]
    assert gen == want


# ---------------------------------------------------------------- which architecture, and why

@pytest.mark.parametrize("overrides, architecture, reason", [
    (dict(pos_encoding="learned"), "gpt2", "learned positions: GPT-2 (the position table as its wpe)"),
    (dict(pos_encoding="sinusoidal"), "gpt2", "sinusoidal positions: GPT-2 (the position table as its wpe)"),
    (dict(pos_encoding="rope"), "gpt_neox",
     "rotary positions: GPT-NeoX with rotary over the whole head and sequential residual"),
    (dict(pos_encoding="rope", qk_norm=True), "gpt_small",
     "QK-norm: no standard transformers architecture has them"),
    (dict(ngram=2), "gpt_small", "hashed n-gram input tables: no standard transformers architecture has them"),
    (dict(ngram=3, qk_norm=True), "gpt_small",
     "hashed n-gram input tables and QK-norm: no standard transformers architecture has them"),
])
def test_the_architecture_is_the_most_standard_that_computes_the_model(overrides, architecture, reason):
    assert choose_architecture(GPTConfig(**overrides)) == (architecture, reason)


def test_export_prints_the_class_and_why(tmp_path, char_tok, capsys):
    ckpt = checkpoint(tmp_path / "run", char_tok, ngram=2)
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf"), "--no-eval"]) == 0
    assert capsys.readouterr().out == (
        f"exported {ckpt} to {tmp_path / 'hf'} as GPTSmallForCausalLM (our modeling_gpt_small.py: load with "
        "trust_remote_code=True)\n  why: hashed n-gram input tables: no standard transformers architecture has them\n")


# ---------------------------------------------------------------- refusals, each in its one line

def test_dtype_target_and_out_refusals(tmp_path, char_tok):
    ckpt = checkpoint(tmp_path / "run", char_tok)
    out = tmp_path / "hf"
    assert refusal(ckpt, out, dtype="float16") == "--dtype must be one of float32, bfloat16, got 'float16'"
    assert refusal(ckpt, out, target="cuda") == "--target must be one of transformers, vllm, llama.cpp, got 'cuda'"
    out.write_text("a file")
    assert refusal(ckpt, out) == f"{out} already exists and is not empty; choose another --out"
    out.unlink()
    out.mkdir()
    (out / "x").write_text("")
    assert refusal(ckpt, out) == f"{out} already exists and is not empty; choose another --out"
    (out / "x").unlink()
    export(ckpt, out)  # an empty folder is taken
    assert (out / "model.safetensors").is_file()
    deeper = tmp_path / "new" / "deeper" / "hf"  # parents made, as --out of a run
    export(ckpt, deeper)
    assert (deeper / "config.json").is_file()
    (tmp_path / "blocker").write_text("")
    assert refusal(ckpt, tmp_path / "blocker" / "hf").startswith(f"cannot write {tmp_path / 'blocker'}: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "hf", "new", "run"]  # no hidden folder left


@pytest.mark.parametrize("target, tokenizer, overrides, says", [
    ("vllm", "char", dict(pos_encoding="learned", tie_embeddings=False),
     "vLLM's GPT-2 ties the head to the token embeddings, and this model's head is untied"),
    ("vllm", "char", dict(pos_encoding="sinusoidal"),
     "vLLM's GPT-2 ties the head to the token embeddings, and sinusoidal positions are exported with a "
     "pre-scaled wte and a separate head"),
    ("vllm", "char", dict(qk_norm=True), "vLLM has no GPTSmallForCausalLM (needed for n-gram tables and QK-norm)"),
    ("llama.cpp", "gpt2", dict(ngram=2, activation="gelu"),
     "llama.cpp's convert_hf_to_gguf.py has no GPTSmallForCausalLM (n-gram tables, QK-norm)"),
    ("llama.cpp", "gpt2", dict(pos_encoding="learned", activation="relu"),
     "llama.cpp's GPT-2 and GPT-NeoX graphs compute GELU, whatever config.json says (relu)"),
    ("llama.cpp", "gpt2", dict(pos_encoding="rope", activation="relu2"),
     "llama.cpp's GPT-2 and GPT-NeoX graphs compute GELU, whatever config.json says (relu2)"),
    ("llama.cpp", "gpt2", dict(pos_encoding="learned", activation="gelu", mlp_ratio=5),
     "llama.cpp's GPT-2 conversion writes a 4x MLP width, this model's is 5x"),
    ("llama.cpp", "bpe", dict(pos_encoding="learned", activation="gelu"),
     "llama.cpp's convert_hf_to_gguf.py converts only BPE tokenizers it recognises, such as GPT-2's; this "
     "model's is bpe"),
])
def test_each_runtime_trap_is_refused_naming_the_runtime(tmp_path, char_tok, target, tokenizer, overrides, says):
    tok = {"char": char_tok, "gpt2": gpt2_tokenizer(), "bpe": train_bpe(TEXT * 50, vocab_size=300)}[tokenizer]
    ckpt = checkpoint(tmp_path / "run", tok, **overrides)
    assert refusal(ckpt, tmp_path / "hf", target=target) == (
        f"cannot export for {target}: {says}; export without --target for transformers")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    export(ckpt, tmp_path / "hf")  # the transformers export of the same checkpoint still works


@pytest.mark.parametrize("target, overrides", [
    ("vllm", dict(pos_encoding="learned", activation="relu2", mlp_ratio=3)),  # vLLM reads both
    ("vllm", dict(pos_encoding="rope", tie_embeddings=False)),  # GPT-NeoX reads its head
    ("llama.cpp", dict(pos_encoding="rope", activation="gelu", mlp_ratio=3)),  # GPT-NeoX's width is read
    ("llama.cpp", dict(pos_encoding="sinusoidal", activation="gelu")),
    ("transformers", dict(qk_norm=True, activation="relu")),
])
def test_a_target_takes_what_its_runtime_computes_as_we_do(tmp_path, target, overrides):
    ckpt = checkpoint(tmp_path / "run", gpt2_tokenizer(), **overrides)
    assert (export(ckpt, tmp_path / "hf", target=target) / "model.safetensors").is_file()


# ---------------------------------------------------------------- the sweep of killed exports

def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def test_the_sweep_removes_only_hidden_export_folders_whose_process_is_gone(tmp_path):
    dead, alive = dead_pid(), os.getpid()
    swept = [f".hf.tmp-{dead}-0123abcd", f".my model.tmp-{dead}-ffffffff", f"...tmp-{dead}-00000000"]
    kept = [f".hf.tmp-{alive}-0123abcd",  # an export still running
            f"hf.tmp-{dead}-0123abcd",  # not hidden: not a name export gives
            f".hf.tmp-{dead}-0123abcg", f".hf.tmp-{dead}-0123abc", f".hf.tmp-{dead}-0123abcde",  # not 8 hex digits
            f".hf.tmp-{dead}-0123ABCD", f".hf.tmp-x{dead}-0123abcd", f".hf.tmp--0123abcd", f".hf.tmp-{dead}-0123abcd.x",
            f".hf.tmp{dead}-0123abcd", f".tmp-{dead}-0123abcd", f"..tmp-{dead}-0123abcd"]
    for name in swept + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_text("partial")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / f".link.tmp-{dead}-0123abcd").symlink_to(target)  # a link is not an export's folder
    (tmp_path / f".file.tmp-{dead}-0123abcd").write_text("")  # nor is a file
    sweep_stale_exports(tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(kept + ["elsewhere", f".link.tmp-{dead}-0123abcd", f".file.tmp-{dead}-0123abcd"])
    assert target.is_dir()
    sweep_stale_exports(tmp_path / "absent")  # a parent that does not exist yet: nothing to sweep


def test_another_users_live_export_is_left_alone(tmp_path, monkeypatch):
    """os.kill(pid, 0) on another user's live process raises PermissionError: alive, kept."""
    def kill(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", kill)
    (tmp_path / ".hf.tmp-123-0123abcd").mkdir()
    sweep_stale_exports(tmp_path)
    assert (tmp_path / ".hf.tmp-123-0123abcd").is_dir()


def sleeper() -> subprocess.Popen:
    """A live process that any signal but 0 would end (SIGHUP and the rest at their default, even
    under nohup)."""
    code = ("import signal, time\n"
            "for s in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):\n"
            "    signal.signal(s, signal.SIG_DFL)\n"
            "print('ready', flush=True)\n"
            "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    return proc


def test_an_export_sweeps_dead_exports_beside_its_out_and_leaves_live_ones_running(tmp_path, char_tok):
    """The next export into the same parent folder removes a killed export's hidden folder; a
    running export's folder stays, and its process is only asked whether it lives (no signal)."""
    ckpt = checkpoint(tmp_path / "run", char_tok)
    parent = tmp_path / "exports"
    parent.mkdir()
    live = sleeper()
    try:
        dead_dir, live_dir = parent / f".old.tmp-{dead_pid()}-0123abcd", parent / f".other.tmp-{live.pid}-89abcdef"
        for d in (dead_dir, live_dir):
            d.mkdir()
            (d / "model.safetensors").write_text("partial")
        export(ckpt, parent / "hf")
        assert sorted(p.name for p in parent.iterdir()) == sorted(["hf", live_dir.name])
        assert live.poll() is None  # still running
    finally:
        live.kill()
        live.wait()


def test_an_export_writes_into_a_hidden_folder_that_the_sweep_recognises(tmp_path, char_tok, monkeypatch):
    """Mid-way (weights and config written, the tokenizer next), --out does not exist yet: the files
    are in `.OUT.tmp-PID-RANDOM` beside it, a name the sweep takes once that pid is gone."""
    import re

    from gpt_small.interop import hf_export

    ckpt = checkpoint(tmp_path / "run", char_tok)
    seen = {}
    real = hf_export.write_tokenizer

    def look_then_write(tok, folder, *args, **kw):
        seen["folder"], seen["files"] = Path(folder), sorted(p.name for p in Path(folder).iterdir())
        seen["out exists"] = (tmp_path / "my model").exists()
        return real(tok, folder, *args, **kw)

    monkeypatch.setattr(hf_export, "write_tokenizer", look_then_write)
    export(ckpt, tmp_path / "my model")
    assert seen["folder"].parent == tmp_path and not seen["out exists"]
    assert re.fullmatch(rf"\.my model\.tmp-{os.getpid()}-[0-9a-f]{{8}}", seen["folder"].name)
    assert hf_export.STALE_EXPORT.match(seen["folder"].name)
    assert seen["files"] == ["config.json", "generation_config.json", "model.safetensors"]
    assert not seen["folder"].exists() and (tmp_path / "my model" / "tokenizer.json").is_file()


def test_an_out_made_by_someone_else_during_the_export_is_left_alone(tmp_path, char_tok, monkeypatch):
    """--out was empty when checked, and holds another's file by the time the export would rename
    into it: one line naming --out, that folder untouched, no hidden folder left."""
    from gpt_small.interop import hf_export

    ckpt = checkpoint(tmp_path / "run", char_tok)
    out = tmp_path / "hf"
    real = hf_export.write_tokenizer

    def someone_writes_out(*args, **kw):
        out.mkdir()
        (out / "theirs.txt").write_text("not yours")
        return real(*args, **kw)

    monkeypatch.setattr(hf_export, "write_tokenizer", someone_writes_out)
    err = refusal(ckpt, out)
    assert err.startswith(f"cannot write {out}: ") and ".tmp-" not in err
    assert [p.name for p in out.iterdir()] == ["theirs.txt"] and (out / "theirs.txt").read_text() == "not yours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]


@pytest.mark.parametrize("shape", [dict(pos_encoding="learned"), dict(pos_encoding="rope"), dict(qk_norm=True)])
def test_a_gpt2_tokenizer_declares_its_end_of_text_in_config_json_of_every_architecture(tmp_path, shape):
    config = read(export(checkpoint(tmp_path / "run", gpt2_tokenizer(), **shape), tmp_path / "hf"), "config.json")
    assert (config["bos_token_id"], config["eos_token_id"]) == (50256, 50256)


def test_a_folder_that_cannot_hold_one_more_entry_is_one_line_naming_out(tmp_path, char_tok):
    """A real tmpfs with a single inode (its own root): the export's hidden folder cannot be made."""
    ckpt = checkpoint(tmp_path / "run", char_tok)
    with tmpfs(tmp_path / "disk", "size=1m,nr_inodes=1") as disk:
        assert refusal(ckpt, disk / "hf") == f"cannot write {disk / 'hf'}: no space left on device"
        assert list(disk.iterdir()) == []


@pytest.mark.parametrize("shape", [dict(pos_encoding="learned", block_size=16), dict(qk_norm=True, block_size=24)])
def test_the_tokenizer_files_state_the_models_context(tmp_path, char_tok, shape):
    folder = export(checkpoint(tmp_path / "run", char_tok, **shape), tmp_path / "hf")
    assert read(folder, "tokenizer_config.json")["model_max_length"] == shape["block_size"]
    assert AutoTokenizer.from_pretrained(str(folder)).model_max_length == shape["block_size"]


def test_a_dead_export_that_cannot_be_removed_does_not_stop_the_next_export(tmp_path, char_tok):
    """A real read-only tmpfs holding a killed export's folder: the sweep leaves what it cannot
    remove, and the export itself then fails in its own one line (never a traceback)."""
    ckpt = checkpoint(tmp_path / "run", char_tok)
    with tmpfs(tmp_path / "disk", "size=1m") as disk:
        stale = disk / f".hf.tmp-{dead_pid()}-0123abcd"
        stale.mkdir()
        (stale / "model.safetensors").write_text("partial")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        assert refusal(ckpt, disk / "hf") == f"cannot write {disk / 'hf'}: read-only file system"
        assert [p.name for p in disk.iterdir()] == [stale.name]


def test_export_takes_best_by_default_and_last_when_asked(tmp_path, char_tok):
    """A run folder: its `best` checkpoint unless `prefer="last"` (the Python API's choice)."""
    cfg = GPTConfig(**SMALL, vocab_size=char_tok.vocab_size)
    run = tmp_path / "run"
    for step, links in ((1, ("last", "best")), (2, ("last",))):
        torch.manual_seed(step)
        save_checkpoint(run, step=step, model=GPT(cfg), tokenizer=char_tok, config={"model": cfg.to_dict()},
                        links=links)
    assert read(export(run, tmp_path / "best"), "config.json")["gpt_small"]["step"] == 1
    assert read(export(run, tmp_path / "last", prefer="last"), "config.json")["gpt_small"]["step"] == 2


def test_the_card_of_an_export_names_its_class_why_and_dtype(tmp_path, char_tok):
    ckpt = checkpoint(tmp_path / "run", char_tok, pos_encoding="rope", step=6)
    card = (export(ckpt, tmp_path / "hf", dtype="bfloat16") / "README.md").read_text()
    assert "exported with `gpt-small export` at step 6; weights in bfloat16.\n" in card
    assert ("- transformers class: GPTNeoXForCausalLM (rotary positions: GPT-NeoX with rotary over the whole head "
            "and sequential residual)\n") in card
    assert "Past it GPT-NeoX keeps rotating" in card  # the limits of the architecture exported


# ---------------------------------------------------------------- durability, from a real strace

@pytest.mark.skipif(shutil.which("strace") is None or sys.platform != "linux", reason="needs strace")
def test_every_file_and_the_folder_of_an_export_keep_the_durability_order(tmp_path, char_tok):
    """Each file fsync'd after its last write and before its rename; the hidden folder renamed to
    --out, and then --out's parent fsync'd, so the new name survives a crash."""
    from test_durability import check_durability, traced_here

    ckpt = checkpoint(tmp_path / "run", char_tok, qk_norm=True)  # remote code: its two .py files too
    with traced_here(tmp_path) as calls:
        export(ckpt, tmp_path / "exports" / "hf")
    names = sorted(Path(dst).name for _, dst in check_durability(calls, tmp_path / "exports"))
    assert names == sorted(["hf", "model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                            "tokenizer_config.json", "configuration_gpt_small.py", "modeling_gpt_small.py",
                            "README.md"])


def test_the_card_scores_the_validation_split_unless_told_not_to(tmp_path, verse_data):
    """export_checkpoint's default evaluates the exported step on the run's data when the run
    recorded no figure for it (as `gpt-small export` does without --no-eval)."""
    from gpt_small.data import PreparedData

    tok = PreparedData(verse_data).tokenizer
    cfg = GPTConfig(**SMALL, vocab_size=tok.vocab_size)
    ckpt = tmp_path / "run"
    save_checkpoint(ckpt, step=4, model=GPT(cfg), tokenizer=tok,
                    config={"model": cfg.to_dict(), "data": {"directory": str(verse_data), "tokenizer": "char"}})
    export_checkpoint(ckpt, tmp_path / "hf")
    assert f"(evaluated at export on data/{verse_data.name}/val.bin)" in (tmp_path / "hf" / "README.md").read_text()
    export_checkpoint(ckpt, tmp_path / "hf2", evaluate=False)
    assert "export ran with --no-eval" in (tmp_path / "hf2" / "README.md").read_text()


# ---------------------------------------------------------------- logits, in the test that exports

@pytest.mark.parametrize("overrides", [
    dict(pos_encoding="rope", activation="relu2", bias=True, tie_embeddings=False),
    dict(pos_encoding="rope", activation="gelu", bias=False, tie_embeddings=True, n_head=4),
    dict(pos_encoding="sinusoidal", activation="relu", bias=False),
    dict(pos_encoding="learned", activation="gelu", bias=True, tie_embeddings=False),
])
def test_each_export_gives_our_logits_in_transformers(tmp_path, char_tok, overrides):
    """As test_interop_export.py does on its shared exports, but exporting here: a tool that maps
    each test to the code it runs (tools/mutate.py) counts a shared fixture's export against the
    first test that builds it only."""
    from gpt_small.checkpoint import load_checkpoint

    ckpt = checkpoint(tmp_path / "run", char_tok, **overrides)
    with torch.no_grad():
        ours = load_checkpoint(ckpt).model.eval()
        for p in ours.parameters():  # away from the initial 1/0 of norms and biases, so a skipped copy shows
            p.add_(0.1 * torch.randn_like(p))
    save_checkpoint(ckpt, step=4, model=ours, tokenizer=char_tok, config={"model": ours.config.to_dict()})
    hf = AutoModelForCausalLM.from_pretrained(str(export(ckpt, tmp_path / "hf"))).eval()
    idx = torch.randint(0, char_tok.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx), atol=1e-5, rtol=0)
