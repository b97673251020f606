"""Runs and interop at their edges: which checkpoint export, --init-from and --resume take, what
an import accepts as GPT-2, what --resume --data accepts as the run's data, what --resume and
--init-from may change, and tokenizers that differ only in their characters.

Documented (docs/interop.md, docs/trainer.md, docs/reliability.md, run.py): export and --init-from
take a run folder's `best` checkpoint (or a checkpoint folder as given); --resume continues from
`last`. `run.plan_run` alone decides what a run may change of what it continues from: a resume
only the fields marked `resume=True` in config.py, a fine-tuning run only `dropout` of the model;
any other change is refused in one line naming the flag, the field and both values. An import
refuses GPT-2 configs it cannot compute exactly (unscaled attention, attention scaled by the
inverse layer index, cross-attention, another epsilon or vocabulary). --resume --data refuses
another data folder (another tokenizer, or another path while the run's own folder exists), but
not the same folder written another way, nor a moved folder whose old path is gone.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt_small.checkpoint import checkpoint_model_config, find_checkpoint, save_checkpoint
from gpt_small.cli import main
from gpt_small.config import ConfigError, GPTConfig, TrainConfig
from gpt_small.config_sources import Assignment
from gpt_small.data import PreparedData, prepare
from gpt_small.errors import GPTSmallError
from gpt_small.interop.hf_export import export_checkpoint
from gpt_small.interop.hf_import import gpt_config_of
from gpt_small.model import GPT
from gpt_small.run import INIT_MAY_CHANGE, RESUME_MAY_CHANGE, plan_run
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
    return _run(tmp_path_factory.mktemp("run") / "run", data, PreparedData(data).tokenizer)


def one_line_error(capsys, argv: list[str]) -> str:
    """`gpt-small ARGV` exits 2 with one line on stderr; that line."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gpt-small {argv[0]}: error: ") and err.count("\n") == 1, err
    return err.removeprefix(f"gpt-small {argv[0]}: error: ").rstrip("\n")


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


def test_init_from_takes_the_runs_best_checkpoint(run, data, tmp_path):
    folder, _, _ = run
    plan = plan_run(tmp_path / "ft", data=data, init_from=folder)
    assert plan.kind == "init" and plan.checkpoint.name == "step-000001"  # best, not last (step 2)
    assert plan.init_from == plan.checkpoint and plan.resume_from is None
    assert plan.model == checkpoint_model_config(plan.checkpoint)
    step2 = folder / "checkpoints" / "step-000002"
    assert plan_run(tmp_path / "ft", data=data, init_from=step2).init_from == step2  # a checkpoint folder as given


def test_init_from_may_change_dropout_only(run, data, tmp_path, capsys):
    folder, _, _ = run
    assert INIT_MAY_CHANGE == ("dropout",)
    saved = checkpoint_model_config(folder / "checkpoints" / "step-000001")
    plan = plan_run(tmp_path / "ft", data=data, init_from=folder,
                    flags=[Assignment("--dropout", "model", "dropout", "0.2"),
                           Assignment("--n-layer", "model", "n_layer", str(saved.n_layer))])  # the same value: no change
    assert plan.model == dataclasses.replace(saved, dropout=0.2)
    ckpt = folder / "checkpoints" / "step-000001"
    out = tmp_path / "refused"
    err = one_line_error(capsys, ["train", "--init-from", str(folder), "--data", str(data), "--out", str(out),
                                  "--n-layer", "3"])
    assert err == (f"--init-from: --n-layer would change n_layer from {saved.n_layer} (the checkpoint's, {ckpt}) to 3; "
                   "a fine-tuning run takes the model's shape from its checkpoint; only dropout may change "
                   "(train without --init-from for another shape)")
    assert not out.exists()  # refused before the run folder is made
    with pytest.raises(ConfigError, match=r"^--init-from: --set model\.n_embd would change n_embd from 32 "):
        plan_run(tmp_path / "ft", data=data, init_from=folder, sets=["model.n_embd=64"])


# ---------------------------------------------------------------- tokenizers alike in kind and size

def test_tokenizers_of_the_same_kind_and_size_with_other_characters(run, data, tmp_path):
    a, b = CharTokenizer.train("abc def\n"), CharTokenizer.train("abc deg\n")
    assert a.kind == b.kind and a.vocab_size == b.vocab_size and not same_tokenizer(a, b)
    assert same_tokenizer(a, CharTokenizer.train("fed cba\n"))  # same characters, another order of text
    # a data folder prepared from other characters, vocabulary the same size as the run's
    text = (data.parent / "poems.txt").read_text()
    size = PreparedData(data).tokenizer.vocab_size
    chars = sorted(set(text) - {"\n"})
    swapped = text.replace(chars[-1], "\u00e9")  # one character replaced by one the run never saw
    (tmp_path / "other.txt").write_text(swapped, encoding="utf-8")
    prepare(out=tmp_path / "other", text=tmp_path / "other.txt", tokenizer="char")
    other = PreparedData(tmp_path / "other").tokenizer
    assert other.vocab_size == size and not same_tokenizer(other, PreparedData(data).tokenizer)
    folder, _, _ = run
    last, best = folder / "checkpoints" / "step-000002", folder / "checkpoints" / "step-000001"
    with pytest.raises(GPTSmallError) as e:
        plan_run(folder, resume=True, data=tmp_path / "other")
    assert str(e.value) == (f"--resume: --data {tmp_path / 'other'} was prepared with another tokenizer (char, vocab "
                            f"{size}) than the checkpoint {last}; resume on the run's data or start a new run")
    with pytest.raises(GPTSmallError) as e:
        plan_run(tmp_path / "ft", data=tmp_path / "other", init_from=folder)
    assert str(e.value) == (f"--init-from: the data in {tmp_path / 'other'} was prepared with the char tokenizer "
                            f"({size:,} tokens), the checkpoint {best} uses the char tokenizer ({size:,} tokens); "
                            "prepare the data with --tokenizer char and the same vocabulary")


# ---------------------------------------------------------------- --resume --data

def test_resume_takes_the_runs_last_checkpoint(run, data):
    folder, _, _ = run
    plan = plan_run(folder, resume=True)
    assert plan.kind == "resume" and plan.checkpoint.name == "step-000002"  # last, not best (step 1)
    assert plan.resume_from == plan.checkpoint and plan.init_from is None
    assert plan.data.directory == data  # no --data: the run's own
    assert plan.out == folder


def test_resume_data_written_as_another_path_to_the_same_folder(run, data, tmp_path, monkeypatch):
    folder, _, _ = run
    link = tmp_path / "link"
    link.symlink_to(data, target_is_directory=True)
    for same in (data, str(data) + "/", data.parent / "." / data.name / ".." / data.name, link):
        assert plan_run(folder, resume=True, data=same).data.directory.resolve() == data.resolve()
    monkeypatch.chdir(data.parent)
    assert plan_run(folder, resume=True, data=Path(data.name)).data.directory.resolve() == data.resolve()  # relative


def test_resume_refuses_another_folder_but_follows_a_moved_one(data, tmp_path):
    import shutil

    tok = PreparedData(data).tokenizer
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    folder, _, _ = _run(tmp_path / "run", data, tok)
    with pytest.raises(GPTSmallError) as e:
        plan_run(folder, resume=True, data=copy)  # the same tokenizer, but another folder while the run's exists
    assert str(e.value) == (f"--resume: --data would change the data from {data} (the run's) to {copy}; "
                            f"leave --data out to continue on {data}, or start a new run")
    moved_from = tmp_path / "old-data"
    shutil.copytree(data, moved_from)
    folder2, _, _ = _run(tmp_path / "run2", moved_from, tok)
    shutil.rmtree(moved_from)  # the run's folder is gone: a moved copy is accepted
    assert plan_run(folder2, resume=True, data=copy).data.directory == copy
    with pytest.raises(GPTSmallError) as e:
        plan_run(folder2, resume=True)
    assert str(e.value) == (f"--resume: the run's data folder {moved_from} is gone; pass --data with the folder "
                            "it was prepared into")
    with pytest.raises(GPTSmallError, match="holds no checkpoint to resume"):
        plan_run(tmp_path / "nothing", resume=True)


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


@pytest.mark.parametrize("extra, what", [
    ({"scale_attn_weights": False}, "scale_attn_weights=false (unscaled attention)"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=true"),
    ({"add_cross_attention": True}, "add_cross_attention=true"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon 1e-06 (ours is 1e-5)"),
    ({"vocab_size": 50258}, "vocab_size 50258 is not GPT-2's 50257 (the gpt2 tokenizer would not fit)"),
    ({"n_inner": 48}, "n_inner 48 is not a multiple of n_embd 32"),
    ({"activation_function": "swish"}, "activation_function 'swish' is none of gelu_new, gelu_pytorch_tanh, relu, relu2"),
])
def test_import_refuses_what_it_cannot_compute_in_one_line(extra, what, tmp_path):
    with pytest.raises(GPTSmallError) as e:
        gpt_config_of({**BASE, **extra}, tmp_path)
    assert str(e.value) == f"{tmp_path}: {what}; gpt-small cannot compute this GPT-2 exactly"


@pytest.mark.parametrize("extra, what", [
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "LlamaForCausalLM"),
    ({"architectures": ["GPT2Model", "GPT2ForSequenceClassification"]}, "GPT2Model, GPT2ForSequenceClassification"),
    ({"model_type": "llama", "architectures": []}, "llama"),  # no architectures: the model type names it
    ({"model_type": None, "architectures": None}, "unknown"),
])
def test_import_refuses_another_architecture_naming_it(extra, what, tmp_path):
    with pytest.raises(GPTSmallError) as e:
        gpt_config_of({**BASE, **extra}, tmp_path)
    assert str(e.value) == f"{tmp_path} holds a {what} model; gpt-small imports GPT2LMHeadModel folders only"


def test_import_reads_what_config_json_leaves_out_as_transformers_defaults(tmp_path):
    import transformers

    d = transformers.GPT2Config()  # what GPT2LMHeadModel assumes for a field config.json leaves out
    want = GPTConfig(vocab_size=d.vocab_size, block_size=d.n_positions, n_layer=d.n_layer, n_head=d.n_head,
                     n_embd=d.n_embd, dropout=0.0, bias=True, activation="gelu", mlp_ratio=4, pos_encoding="learned",
                     tie_embeddings=d.tie_word_embeddings)
    assert gpt_config_of({"model_type": "gpt2"}, tmp_path) == want
    assert gpt_config_of({**d.to_dict(), "architectures": ["GPT2LMHeadModel"]}, tmp_path) == want  # written out
    assert gpt_config_of({**BASE, "architectures": ["GPT2LMHeadModel", "GPT2Model"]}, tmp_path).n_layer == 2


# ---------------------------------------------------------------- what --resume may change

# docs/reliability.md: max_steps, max_time, the three intervals, final_eval, threads, device
RESUMABLE_IN_DOCS = {"max_steps", "max_time", "eval_interval", "log_interval", "checkpoint_interval", "final_eval",
                     "threads", "device"}


def _saved_run(folder: Path, data: Path, **train) -> Path:
    """A run whose last checkpoint saved the tiny model and TrainConfig(**train) in full, as a run does."""
    tok = PreparedData(data).tokenizer
    model = GPTConfig.from_preset("tiny", vocab_size=tok.vocab_size, block_size=32)
    config = {"model": model.to_dict(), "train": dataclasses.asdict(TrainConfig(**train)), "data": {"directory": str(data)}}
    save_checkpoint(folder, step=1, model=_model(tok.vocab_size, 1), tokenizer=tok, config=config, links=("last", "best"))
    return folder


def _rewrite_saved_config(run: Path, **entries) -> Path:
    """The run's last config.json with `entries` replaced (`...` removes one), as a damaged file would hold."""
    path = run / "last" / "config.json"
    meta = json.loads(path.read_text())
    for key, value in entries.items():
        if value is ...:
            meta.pop(key)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))
    return path.resolve()


def test_resume_changes_only_resumable_fields(data, tmp_path, capsys):
    resumable = {f.name for cls in (GPTConfig, TrainConfig) for f in dataclasses.fields(cls) if f.metadata.get("resume")}
    assert resumable == RESUMABLE_IN_DOCS and RESUME_MAY_CHANGE == tuple(sorted(resumable))
    run = _saved_run(tmp_path / "run", data, max_steps=10)
    saved_model = checkpoint_model_config(run / "last")
    plan = plan_run(run, resume=True, sets=["max_steps=20", "eval_interval=5"],
                    flags=[Assignment("--threads", "train", "threads", "1")])
    assert (plan.train.max_steps, plan.train.eval_interval, plan.train.threads) == (20, 5, 1)
    assert plan.model == saved_model
    # the same value as the run's is no change
    lr_run = _saved_run(tmp_path / "lr", data, lr=1e-3)
    assert plan_run(lr_run, resume=True, sets=["lr=0.001"]).train.lr == 1e-3
    err = one_line_error(capsys, ["train", "--out", str(lr_run), "--resume", "--lr", "0.002"])
    assert err == ("--resume: --lr would change lr from 0.001 (the run's) to 0.002; a resumed run keeps its model, "
                   f"data and optimizer; only {', '.join(sorted(resumable))} may change (start a new run with another "
                   "--out to change it)")
    with pytest.raises(ConfigError, match=rf"^--resume: --set model\.n_layer would change n_layer from "
                                          rf"{saved_model.n_layer} \(the run's\) to 7; "):
        plan_run(run, resume=True, sets=["model.n_layer=7"])
    with pytest.raises(ConfigError, match=r"^--resume: --preset baby would change "):
        plan_run(run, resume=True, preset="baby")
    assert plan_run(run, resume=True, preset="tiny").model == saved_model  # the run's own preset is no change
    _rewrite_saved_config(run, train={**dataclasses.asdict(TrainConfig(max_steps=10)), "from_a_newer_version": 1})
    assert plan_run(run, resume=True).train == TrainConfig(max_steps=10)  # a field of another version is dropped


@pytest.mark.parametrize("entries, names", [
    ({"model": ...}, "field 'model': missing"),
    ({"model": {**GPTConfig.from_preset("tiny").to_dict(), "n_layer": "x"}}, "n_layer must be"),
    ({"model": {k: v for k, v in GPTConfig.from_preset("tiny").to_dict().items() if k != "n_layer"}},
     "field 'model.n_layer': missing"),
    ({"train": {"lr": 1, "bad": 2, "batch_size": None}}, "batch_size must be"),
    ({"train": []}, "field 'train'"),
    ({"data": "a/path"}, "field 'data'"),
])
def test_a_damaged_saved_config_is_refused_in_one_line(entries, names, data, tmp_path, capsys):
    path = _rewrite_saved_config(_saved_run(tmp_path / "run", data), **entries)
    with pytest.raises(GPTSmallError, match=names) as e:
        plan_run(tmp_path / "run", resume=True, data=data)
    assert "\n" not in str(e.value)
    assert names in one_line_error(capsys, ["train", "--out", str(tmp_path / "run"), "--resume"])
    if "model" in entries and entries["model"] is ...:  # a file read names the file
        assert str(e.value) == f"{path}: field 'model': missing"


def test_resume_takes_a_config_file_but_not_its_preset(data, tmp_path):
    run = _saved_run(tmp_path / "run", data)
    saved_model = checkpoint_model_config(run / "last")
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "baby"\n[train]\nmax_steps = 99\n')
    plan = plan_run(run, resume=True, config_file=toml)
    assert plan.train.max_steps == 99 and plan.model == saved_model  # the file's baby preset is not applied
    plan = plan_run(run, resume=True, config_file=toml, preset="tiny")  # the file's changes are kept
    assert plan.train.max_steps == 99 and plan.model == saved_model


def _run_with(folder: Path, tok, *, data_entry, best_train: dict, last_train: dict) -> Path:
    cfg = GPTConfig.from_preset("tiny", vocab_size=tok.vocab_size, block_size=32).to_dict()
    m = _model(tok.vocab_size, 1)
    save_checkpoint(folder, step=1, model=m, tokenizer=tok, config={"model": cfg, "train": best_train, "data": data_entry},
                    links=("last", "best"))
    save_checkpoint(folder, step=2, model=m, tokenizer=tok, config={"model": cfg, "train": last_train, "data": data_entry},
                    links=("last",))
    return folder


def test_resume_plan_reads_last_and_passes_every_change_on(data, tmp_path):
    tok = PreparedData(data).tokenizer
    run = _run_with(tmp_path / "run", tok, data_entry={"directory": str(data)}, best_train={"max_steps": 10},
                    last_train={"max_steps": 20})
    assert plan_run(run, resume=True).train.max_steps == 20  # the last checkpoint's config, not best's
    assert plan_run(run, resume=True, sets=["max_steps=30"]).train.max_steps == 30
    flags = [Assignment("--eval-interval", "train", "eval_interval", "7")]
    assert plan_run(run, resume=True, flags=flags).train.eval_interval == 7
    toml = tmp_path / "more.toml"
    toml.write_text("[train]\nmax_steps = 40\n")
    assert plan_run(run, resume=True, config_file=toml).train.max_steps == 40
    with pytest.raises(ConfigError) as e:
        plan_run(run, resume=True, preset="baby")
    assert str(e.value).endswith("may change (start a new run with another --out to change it)")
    with pytest.raises(GPTSmallError) as e:
        plan_run(tmp_path / "empty", resume=True)
    assert str(e.value) == (f"--resume: {tmp_path / 'empty'} holds no checkpoint to resume (no "
                            f"{tmp_path / 'empty' / 'last'}); train without --resume to start a run there")


@pytest.mark.parametrize("entry", [None, {"directory": ""}, {}])
def test_resume_of_a_run_that_records_no_data_folder_asks_for_one(entry, data, tmp_path):
    tok = PreparedData(data).tokenizer
    run = _run_with(tmp_path / "run", tok, data_entry=entry, best_train={}, last_train={})
    with pytest.raises(GPTSmallError) as e:
        plan_run(run, resume=True)
    assert str(e.value) == "--resume: the run records no data folder; pass --data with the folder it was prepared into"
    assert plan_run(run, resume=True, data=data).data.directory == data  # an imported run (no data) takes the one given


def test_init_from_a_gpt2_checkpoint_on_char_data_names_the_tokenizer_to_prepare_with(data, tmp_path):
    from gpt_small.tokenizer import gpt2_tokenizer

    tok = gpt2_tokenizer()
    cfg = GPTConfig.from_preset("tiny", vocab_size=tok.vocab_size, block_size=32)
    save_checkpoint(tmp_path / "gpt2run", step=1, model=GPT(cfg), tokenizer=tok, config={"model": cfg.to_dict()},
                    links=("last", "best"))
    ckpt = find_checkpoint(tmp_path / "gpt2run")
    size = PreparedData(data).tokenizer.vocab_size
    with pytest.raises(GPTSmallError) as e:
        plan_run(tmp_path / "ft", data=data, init_from=tmp_path / "gpt2run")
    # GPT-2's vocabulary is fixed: naming the kind is enough (a char or bpe one also needs the same vocabulary)
    assert str(e.value) == (f"--init-from: the data in {data} was prepared with the char tokenizer ({size:,} tokens), "
                            f"the checkpoint {ckpt} uses the gpt2 tokenizer (50,257 tokens); prepare the data with "
                            "--tokenizer gpt2")


def test_init_from_a_run_without_best_takes_its_last(data, tmp_path):
    # a run stopped before its first evaluation has only `last`: --init-from falls back to it
    tok = PreparedData(data).tokenizer
    cfg = GPTConfig.from_preset("tiny", vocab_size=tok.vocab_size, block_size=32)
    save_checkpoint(tmp_path / "early", step=3, model=_model(tok.vocab_size, 3), tokenizer=tok,
                    config={"model": cfg.to_dict(), "data": {"directory": str(data)}}, links=("last",))
    assert not (tmp_path / "early" / "best").exists()
    plan = plan_run(tmp_path / "ft", data=data, init_from=tmp_path / "early")
    assert plan.init_from == (tmp_path / "early" / "last").resolve() and plan.init_from.name == "step-000003"
    assert plan.out == tmp_path / "ft" and plan.data.directory == data


def test_resume_and_init_from_refuse_an_unknown_key_in_one_line(data, tmp_path):
    run = _saved_run(tmp_path / "run", data)
    toml = tmp_path / "typo.toml"
    toml.write_text("[model]\nn_layers = 3\n")  # a typo of n_layer
    for kw in (dict(resume=True), dict(init_from=run, data=data)):
        out = run if "resume" in kw else tmp_path / "ft"
        with pytest.raises(ConfigError) as e:
            plan_run(out, sets=["model.nonsense=1"], **kw)
        assert str(e.value).startswith("unknown GPTConfig key 'nonsense'; known keys: vocab_size, ")
        with pytest.raises(ConfigError, match="^unknown GPTConfig key 'n_layers'"):
            plan_run(out, config_file=toml, **kw)


def test_resume_refuses_the_runs_own_data_folder_prepared_again_with_other_characters(data, tmp_path):
    import shutil

    own = tmp_path / "data"
    shutil.copytree(data, own)
    run = _saved_run(tmp_path / "run", own)
    (tmp_path / "other.txt").write_text("zyx wvu\n" * 400, encoding="utf-8")
    prepare(out=own, text=tmp_path / "other.txt", tokenizer="char", force=True)  # the same folder, prepared again
    tok = PreparedData(own).tokenizer
    with pytest.raises(GPTSmallError) as e:
        plan_run(run, resume=True)
    assert str(e.value) == (f"--resume: the run's data {own} was prepared with another tokenizer (char, vocab "
                            f"{tok.vocab_size}) than the checkpoint {(run / 'last').resolve()}; resume on the run's "
                            "data or start a new run")


def test_a_saved_config_without_its_train_section_is_refused_naming_it(data, tmp_path, capsys):
    run = _saved_run(tmp_path / "run", data)
    _rewrite_saved_config(run, train=...)
    with pytest.raises(ConfigError) as e:
        plan_run(run, resume=True)
    assert str(e.value) == "the run's saved config is incomplete or damaged ('train'); start a new run"
