"""Runs and interop at their edges: which checkpoint export and --init-from take, what an import
accepts as GPT-2, what --resume --data accepts as the run's data, and tokenizers that differ only
in their characters.

Documented (docs/interop.md, finetune.py, resume.py): export and --init-from take a run folder's
`best` checkpoint (or a checkpoint folder as given); --resume continues from `last`. An import
refuses GPT-2 configs it cannot compute exactly (unscaled attention, attention scaled by the
inverse layer index, cross-attention, another epsilon or vocabulary). --resume --data refuses
another data folder (another tokenizer, or another path while the run's own folder exists), but
not the same folder written another way, nor a moved folder whose old path is gone.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt_small.checkpoint import find_checkpoint, save_checkpoint
from gpt_small.config import GPTConfig
from gpt_small.data import prepare
from gpt_small.errors import GPTSmallError
from gpt_small.interop.finetune import init_from_config
from gpt_small.interop.hf_export import export_checkpoint
from gpt_small.interop.hf_import import gpt_config_of
from gpt_small.model import GPT
from gpt_small.resume import resume_plan
from gpt_small.tokenizer import CharTokenizer, same_tokenizer

from conftest import verse as verse_text


def _model(vocab: int, seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_preset("tiny", vocab_size=vocab, block_size=32)).eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs-edges")
    src = root / "poems.txt"
    src.write_text(verse_text(300, seed=2), encoding="utf-8")
    prepare(out=root / "data", text=src, tokenizer="char")
    return root / "data"


def _run(folder: Path, data_dir: Path, tok) -> tuple[Path, GPT, GPT]:
    """A run whose `best` (step 1) and `last` (step 2) hold different weights."""
    best, last = _model(tok.vocab_size, 1), _model(tok.vocab_size, 2)
    cfg = GPTConfig.from_preset("tiny", vocab_size=tok.vocab_size, block_size=32)
    config = {"model": cfg.to_dict(), "train": {}, "data": {"directory": str(data_dir)}}
    save_checkpoint(folder, step=1, model=best, tokenizer=tok, config=config, links=("last", "best"))
    save_checkpoint(folder, step=2, model=last, tokenizer=tok, config=config, links=("last",))
    return folder, best, last


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    from gpt_small.data import PreparedData

    return _run(tmp_path_factory.mktemp("run") / "run", data, PreparedData(data).tokenizer)


# ---------------------------------------------------------------- best or last

def test_find_checkpoint_prefers_as_asked(run):
    folder, _, _ = run
    assert find_checkpoint(folder).name == "step-000001"  # best by default
    assert find_checkpoint(folder, prefer="last").name == "step-000002"
    step2 = folder / "checkpoints" / "step-000002"
    assert find_checkpoint(step2) == step2  # a checkpoint folder is taken as given


def test_export_takes_the_runs_best_checkpoint(run, tmp_path):
    folder, best, last = run
    export_checkpoint(folder, tmp_path / "hf", evaluate=False)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["gpt_small"]["step"] == 1
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    wte = best.transformer.wte.weight if hasattr(best, "transformer") else best.wte.weight
    assert any(t.shape == wte.shape and torch.equal(t, wte) for t in tensors.values())
    export_checkpoint(folder / "checkpoints" / "step-000002", tmp_path / "hf2", evaluate=False)
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["gpt_small"]["step"] == 2


def test_init_from_takes_the_runs_best_checkpoint(run, data):
    from gpt_small.data import PreparedData

    folder, _, _ = run
    tok = PreparedData(data).tokenizer
    ckpt, cfg = init_from_config(folder, data_tokenizer=tok, data_dir=data, model_overrides={})
    assert ckpt.name == "step-000001"
    ckpt, cfg = init_from_config(folder, data_tokenizer=tok, data_dir=data, model_overrides={"dropout": "0.2",
                                                                                              "n_layer": str(cfg.n_layer)})
    assert cfg.dropout == 0.2
    with pytest.raises(GPTSmallError, match="n_layer=3 differs"):
        init_from_config(folder, data_tokenizer=tok, data_dir=data, model_overrides={"n_layer": "3"})


# ---------------------------------------------------------------- tokenizers alike in kind and size

def test_tokenizers_of_the_same_kind_and_size_with_other_characters(run, data, tmp_path):
    a, b = CharTokenizer.train("abc def\n"), CharTokenizer.train("abc deg\n")
    assert a.kind == b.kind and a.vocab_size == b.vocab_size and not same_tokenizer(a, b)
    assert same_tokenizer(a, CharTokenizer.train("fed cba\n"))  # same characters, another order of text
    # a data folder prepared from other characters, vocabulary the same size as the run's
    from gpt_small.data import PreparedData

    text = (data.parent / "poems.txt").read_text()
    size = PreparedData(data).tokenizer.vocab_size
    chars = sorted(set(text) - {"\n"})
    swapped = text.replace(chars[-1], "\u00e9")  # one character replaced by one the run never saw
    (tmp_path / "other.txt").write_text(swapped, encoding="utf-8")
    prepare(out=tmp_path / "other", text=tmp_path / "other.txt", tokenizer="char")
    other = PreparedData(tmp_path / "other").tokenizer
    assert other.vocab_size == size and not same_tokenizer(other, PreparedData(data).tokenizer)
    folder, _, _ = run
    with pytest.raises(GPTSmallError, match="another tokenizer"):
        resume_plan(folder, data=tmp_path / "other")
    with pytest.raises(GPTSmallError, match="--init-from: the data in"):
        init_from_config(folder, data_tokenizer=other, data_dir=tmp_path / "other", model_overrides={})


# ---------------------------------------------------------------- --resume --data

def test_resume_data_written_as_another_path_to_the_same_folder(run, data, tmp_path):
    folder, _, _ = run
    for same in (data, Path(str(data) + "/"), data.parent / "." / data.name / ".." / data.name):
        data_dir, _, _ = resume_plan(folder, data=same)
        assert data_dir.resolve() == data.resolve()
    link = tmp_path / "link"
    link.symlink_to(data, target_is_directory=True)
    assert resume_plan(folder, data=link)[0].resolve() == data.resolve()
    cwd = os.getcwd()
    try:
        os.chdir(data.parent)
        assert resume_plan(folder, data=Path(data.name))[0].resolve() == data.resolve()  # relative
    finally:
        os.chdir(cwd)
    assert resume_plan(folder)[0] == data  # no --data: the run's own


def test_resume_refuses_another_folder_but_follows_a_moved_one(data, tmp_path):
    import shutil

    from gpt_small.data import PreparedData

    tok = PreparedData(data).tokenizer
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    folder, _, _ = _run(tmp_path / "run", data, tok)
    with pytest.raises(GPTSmallError, match=f"would change the data from {data}"):
        resume_plan(folder, data=copy)  # the same tokenizer, but another folder while the run's exists
    moved_from = tmp_path / "old-data"
    shutil.copytree(data, moved_from)
    folder2, _, _ = _run(tmp_path / "run2", moved_from, tok)
    shutil.rmtree(moved_from)  # the run's folder is gone: a moved copy is accepted
    assert resume_plan(folder2, data=copy)[0] == copy
    with pytest.raises(GPTSmallError, match="is gone; pass --data"):
        resume_plan(folder2)
    with pytest.raises(GPTSmallError, match="holds no checkpoint to resume"):
        resume_plan(tmp_path / "nothing")


# ---------------------------------------------------------------- what an import takes as GPT-2

BASE = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 50257, "n_positions": 64,
        "n_embd": 32, "n_layer": 2, "n_head": 2}


@pytest.mark.parametrize("extra", [
    {}, {"scale_attn_weights": True}, {"scale_attn_by_inverse_layer_idx": False}, {"reorder_and_upcast_attn": True},
    {"add_cross_attention": False}, {"layer_norm_epsilon": 1e-5}, {"n_inner": 64}, {"n_inner": None},
    {"activation_function": "gelu_pytorch_tanh"}, {"activation_function": "relu"}, {"architectures": []}, {"tie_word_embeddings": False},
])
def test_import_accepts_configs_it_computes_exactly(extra, tmp_path):
    cfg = gpt_config_of({**BASE, **extra}, tmp_path)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == (2, 2, 32, 64, 50257)
    assert cfg.mlp_ratio == (2 if extra.get("n_inner") == 64 else 4)
    assert cfg.tie_embeddings == extra.get("tie_word_embeddings", True)


@pytest.mark.parametrize("extra, message", [
    ({"scale_attn_weights": False}, "scale_attn_weights=false"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=true"),
    ({"add_cross_attention": True}, "add_cross_attention=true"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon 1e-06"),
    ({"vocab_size": 50258}, "vocab_size 50258 is not GPT-2's 50257"),
    ({"n_inner": 48}, "n_inner 48 is not a multiple of n_embd 32"),
    ({"activation_function": "swish"}, "activation_function 'swish'"),
    ({"model_type": "llama"}, "imports GPT2LMHeadModel folders only"),
    ({"architectures": ["GPT2Model"]}, "holds a GPT2Model model"),
])
def test_import_refuses_what_it_cannot_compute_in_one_line(extra, message, tmp_path):
    with pytest.raises(GPTSmallError, match=message.replace("(", r"\(")) as e:
        gpt_config_of({**BASE, **extra}, tmp_path)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- what --resume may change

def _saved(**train) -> dict:
    from gpt_small.config import TrainConfig

    model = GPTConfig.from_preset("tiny", vocab_size=40, block_size=32)
    return {"model": model.to_dict(), "train": dataclasses.asdict(TrainConfig(**train))}


def test_resume_configs_change_only_resumable_fields():
    from gpt_small.config import Assignment, ConfigError, TrainConfig
    from gpt_small.resume import resume_configs

    resumable = {f.name for cls in (GPTConfig, TrainConfig) for f in dataclasses.fields(cls) if f.metadata.get("resume")}
    assert {"max_steps", "max_time", "eval_interval", "threads", "device", "final_eval"} <= resumable
    model, train = resume_configs(_saved(max_steps=10), sets=["max_steps=20", "eval_interval=5"],
                                  flags=[Assignment("--threads", "train", "threads", "1")])
    assert (train.max_steps, train.eval_interval, train.threads) == (20, 5, 1)
    assert model.n_layer == GPTConfig.from_preset("tiny").n_layer
    # the same value as the run's is no change
    _, train = resume_configs(_saved(lr=1e-3), sets=["lr=0.001"])
    assert train.lr == 1e-3
    with pytest.raises(ConfigError) as e:
        resume_configs(_saved(lr=1e-3), flags=[Assignment("--lr", "train", "lr", "0.002")])
    msg = str(e.value)
    assert msg.startswith("--resume: --lr would change lr from 0.001 (the run's) to 0.002; a resumed run keeps")
    assert ", ".join(sorted(resumable)) in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=r"--set model.n_layer would change n_layer from \d+ \(the run's\) to 7"):
        resume_configs(_saved(), sets=["model.n_layer=7"])
    with pytest.raises(ConfigError, match="--preset baby would change"):
        resume_configs(_saved(), preset="baby")
    resume_configs(_saved(), preset="tiny")  # the run's own preset is no change
    saved = _saved()
    saved["train"]["from_a_newer_version"] = 1  # a field of another version is dropped
    resume_configs(saved)
    for broken in ({"train": {}}, {"model": {"n_layer": "x"}, "train": {}}, {"model": saved["model"], "train": {"lr": 1, "bad": 2, "batch_size": None}}):
        with pytest.raises((ConfigError, GPTSmallError)):
            resume_configs(broken)


def test_resume_configs_take_a_config_file_but_not_its_preset(tmp_path):
    from gpt_small.resume import resume_configs

    toml = tmp_path / "run.toml"
    toml.write_text('preset = "baby"\n[train]\nmax_steps = 99\n')
    _, train = resume_configs(_saved(), config_file=toml)
    assert train.max_steps == 99
    _, train = resume_configs(_saved(), config_file=toml, preset="tiny")  # the file's changes are kept
    assert train.max_steps == 99
    from gpt_small.config import ConfigError

    with pytest.raises(ConfigError, match=r"^the run's saved config is incomplete or damaged \(.*\); start a new run$"):
        resume_configs({"train": {}})


def _run_with(folder: Path, tok, *, data_entry, best_train: dict, last_train: dict) -> Path:
    cfg = GPTConfig.from_preset("tiny", vocab_size=tok.vocab_size, block_size=32).to_dict()
    m = _model(tok.vocab_size, 1)
    save_checkpoint(folder, step=1, model=m, tokenizer=tok, config={"model": cfg, "train": best_train, "data": data_entry},
                    links=("last", "best"))
    save_checkpoint(folder, step=2, model=m, tokenizer=tok, config={"model": cfg, "train": last_train, "data": data_entry},
                    links=("last",))
    return folder


def test_resume_plan_reads_last_and_passes_every_change_on(data, tmp_path):
    from gpt_small.config import Assignment, ConfigError
    from gpt_small.data import PreparedData

    tok = PreparedData(data).tokenizer
    run = _run_with(tmp_path / "run", tok, data_entry={"directory": str(data)}, best_train={"max_steps": 10},
                    last_train={"max_steps": 20})
    assert resume_plan(run)[2].max_steps == 20  # the last checkpoint's config, not best's
    assert resume_plan(run, sets=["max_steps=30"])[2].max_steps == 30
    assert resume_plan(run, flags=[Assignment("--eval-interval", "train", "eval_interval", "7")])[2].eval_interval == 7
    toml = tmp_path / "more.toml"
    toml.write_text("[train]\nmax_steps = 40\n")
    assert resume_plan(run, config_file=toml)[2].max_steps == 40
    with pytest.raises(ConfigError) as e:
        resume_plan(run, preset="baby")
    assert str(e.value).endswith("may change (start a new run with another --out to change it)")
    with pytest.raises(GPTSmallError) as e:
        resume_plan(tmp_path / "empty")
    assert str(e.value) == (f"--resume: {tmp_path / 'empty'} holds no checkpoint to resume (no "
                            f"{tmp_path / 'empty' / 'last'}); train without --resume to start a run there")


@pytest.mark.parametrize("entry", [None, {"directory": ""}, {}, "a/path"])
def test_resume_of_a_run_that_records_no_data_folder_asks_for_one(entry, data, tmp_path):
    from gpt_small.data import PreparedData

    tok = PreparedData(data).tokenizer
    run = _run_with(tmp_path / "run", tok, data_entry=entry, best_train={}, last_train={})
    with pytest.raises(GPTSmallError) as e:
        resume_plan(run)
    assert str(e.value) == "--resume: the run's data folder None is gone; pass --data with the folder it was prepared into"
    assert resume_plan(run, data=data)[0] == data  # an imported run (no data) takes the one given
