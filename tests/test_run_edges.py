"""--resume's data rules at their edges, through plan_run (the one place the CLI and the Python
API resolve a run): the run's own data folder, written any way, is accepted; another folder is
refused while the run's exists, and accepted (same tokenizer) once the run's is gone; a folder
without a checkpoint, or a run whose data is gone with no --data, is refused with its one line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from gpt_small.cli import main
from gpt_small.config import GPTConfig, TrainConfig
from gpt_small.data import PreparedData
from gpt_small.errors import GPTSmallError
from gpt_small.run import RESUME_MAY_CHANGE, plan_run, recorded_path
from gpt_small.run_folder import read_metrics, read_run_config
from gpt_small.train import Trainer

TRAIN = dict(batch_size=2, max_steps=2, warmup_steps=0, eval_interval=2, eval_batches=1, log_interval=1,
             final_eval=False, threads=1)


def _train(data_dir: Path, out: Path) -> Path:
    model = GPTConfig.from_preset("tiny", vocab_size=PreparedData(data_dir).tokenizer.vocab_size)
    with Trainer(model, TrainConfig(**TRAIN), data_dir, out, show_progress=False) as t:
        t.fit()
    return out


def _data_of(run: Path, **kw) -> Path:
    return plan_run(run, resume=True, **kw).data.directory


@pytest.fixture(scope="module")
def trained(verse_data, tmp_path_factory) -> Path:
    return _train(verse_data, tmp_path_factory.mktemp("run") / "run")


def test_resume_data_written_as_another_path_to_the_same_folder(trained, verse_data, tmp_path):
    data = verse_data
    for same in (data, Path(str(data) + "/"), data.parent / "." / data.name / ".." / data.name):
        assert _data_of(trained, data=same).resolve() == data.resolve()
    link = tmp_path / "link"
    link.symlink_to(data, target_is_directory=True)
    assert _data_of(trained, data=link).resolve() == data.resolve()
    cwd = os.getcwd()
    try:
        os.chdir(data.parent)
        assert _data_of(trained, data=Path(data.name)).resolve() == data.resolve()  # relative
    finally:
        os.chdir(cwd)
    assert _data_of(trained).resolve() == data.resolve()  # no --data: the run's own


def test_resume_refuses_another_folder_but_follows_a_moved_one(trained, verse_data, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(verse_data, copy)
    with pytest.raises(GPTSmallError, match=f"would change the data from {verse_data}"):
        plan_run(trained, resume=True, data=copy)  # same tokenizer, another folder while the run's exists
    moved_from = tmp_path / "old-data"
    shutil.copytree(verse_data, moved_from)
    run2 = _train(moved_from, tmp_path / "run2")
    shutil.rmtree(moved_from)  # the run's folder is gone: a moved copy is accepted
    assert _data_of(run2, data=copy) == copy
    with pytest.raises(GPTSmallError, match="is gone; pass --data"):
        plan_run(run2, resume=True)
    with pytest.raises(GPTSmallError, match="holds no checkpoint to resume"):
        plan_run(tmp_path / "nothing", resume=True)


def test_resume_refuses_each_change_outside_the_allowed_list_naming_it(trained):
    plan = plan_run(trained, resume=True)
    assert plan.kind == "resume" and plan.init_from is None
    with pytest.raises(GPTSmallError) as e:
        plan_run(trained, resume=True, sets=["lr=0.5"])
    msg = str(e.value)
    assert msg.startswith("--resume: ") and "would change lr from" in msg and "0.5" in msg
    assert f"only {', '.join(RESUME_MAY_CHANGE)} may change" in msg
    # the same value as the run's is not a change
    assert plan_run(trained, resume=True, sets=[f"lr={plan.train.lr!r}"]).train.lr == plan.train.lr
    with pytest.raises(GPTSmallError, match="would change n_layer"):
        plan_run(trained, resume=True, sets=["n_layer=3"])


def test_resume_needs_no_data_and_a_fresh_run_does(trained, tmp_path):
    with pytest.raises(GPTSmallError, match="--data is required"):
        plan_run(tmp_path / "fresh")
    with pytest.raises(GPTSmallError, match="leave it out with --resume"):
        plan_run(trained, resume=True, init_from=trained)


def _recorded(run: Path) -> tuple[str, str]:
    """(run_config.json's data, the last checkpoint's data directory)."""
    run_config = json.loads((run / "run_config.json").read_text())
    ckpt = json.loads((run / "last" / "config.json").read_text())
    return run_config["data"], ckpt["data"]["directory"]


def test_the_data_folder_is_recorded_folded_as_typed(verse_data, tmp_path, monkeypatch, capsys):
    """`train --data data/../data/./x` and `--resume --data` written so record `data/x`: the form
    --resume compares with, relative where it was given relative, absolute where absolute."""
    root = tmp_path / "work"
    shutil.copytree(verse_data, root / "data" / "x")
    monkeypatch.chdir(root)
    steps = ["--preset", "tiny", "--batch-size", "2", "--warmup-steps", "0", "--eval-interval", "2",
             "--eval-batches", "1", "--final-eval", "false", "--threads", "1", "--no-progress"]
    assert main(["train", "--data", "data/../data/./x", "--out", "run", "--max-steps", "2", *steps]) == 0
    assert _recorded(root / "run") == ("data/x", "data/x")
    assert main(["train", "--out", "run", "--resume", "--data", "data//x/../x", "--max-steps", "3",
                 "--no-progress"]) == 0
    assert _recorded(root / "run") == ("data/x", "data/x")
    assert main(["train", "--out", "run", "--resume", "--data", f"{root}/data/../data/x", "--max-steps", "4",
                 "--no-progress"]) == 0
    assert _recorded(root / "run") == (f"{root}/data/x", f"{root}/data/x")
    assert main(["train", "--out", "run", "--resume", "--max-steps", "5", "--no-progress"]) == 0  # the run's own
    assert _recorded(root / "run") == (f"{root}/data/x", f"{root}/data/x")


def test_a_recorded_path_never_names_another_folder(tmp_path):
    """`link/../c` folded would be `c` beside the link; the link's target's sibling is what it names."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "c").mkdir()
    (tmp_path / "c").mkdir()  # the folder a lexical fold would wrongly name
    (tmp_path / "link").symlink_to(tmp_path / "a" / "b", target_is_directory=True)
    assert recorded_path(tmp_path / "link" / ".." / "c") == (tmp_path / "a" / "c").resolve()
    assert recorded_path(tmp_path / "a" / "." / "b") == tmp_path / "a" / "b"
    assert recorded_path(Path("x/../y")) == Path("y")  # relative stays relative (nothing there: same either way)


def test_the_run_folder_reads_back_its_own_files(tmp_path):
    """read_metrics passes over a line cut short by a kill; read_run_config is None where a folder
    has none and one line naming the file where it is damaged."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "kind": "train"}\n{"step": 2, "kind": "eval"}\n{"step": 3, "ki')
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "kind": "train"}, {"step": 2, "kind": "eval"}]
    assert read_run_config(tmp_path) is None
    (tmp_path / "run_config.json").write_text(json.dumps({"model": {}, "train": {}, "data": "data/x"}))
    assert read_run_config(tmp_path)["data"] == "data/x"
    (tmp_path / "run_config.json").write_text(json.dumps({"data": 5}))
    with pytest.raises(GPTSmallError, match=r"run_config\.json: field 'data'") as e:
        read_run_config(tmp_path)
    assert "\n" not in str(e.value)

# ---------------------------------------------------------------- a run that cannot start
# (docs/reliability.md: a size that cannot fit is refused before the work; config.py: max_steps 0
# needs a max_time; a split must hold one window of block_size + 1 tokens)

def _short_data(folder: Path) -> Path:
    """A char data folder whose training split is shorter than its validation split."""
    from gpt_small.data import prepare

    folder.mkdir()
    (folder / "t.txt").write_text("the sea at night is wide and dark\n" + "so still the wide sea lies tonight\n" * 3)
    prepare(out=folder / "data", text=folder / "t.txt", tokenizer="char", val_fraction=0.75)
    return folder / "data"


@pytest.mark.parametrize("split", ["train", "validation"])
def test_a_split_of_exactly_one_window_is_enough_and_one_token_less_is_refused(split, verse_data, tmp_path):
    data = verse_data if split == "validation" else _short_data(tmp_path / "short")
    d = PreparedData(data)
    n = min(len(d.train), len(d.val))
    assert len(d.val if split == "validation" else d.train) == n and len(d.train) != len(d.val)
    plan = plan_run(tmp_path / "r", data=data, preset="tiny", sets=[f"block_size={n - 1}", "batch_size=1"])
    assert plan.model.block_size == n - 1  # n tokens: exactly one window of block_size + 1
    with pytest.raises(GPTSmallError) as e:
        plan_run(tmp_path / "r", data=data, preset="tiny", sets=[f"block_size={n}", "batch_size=1"])
    assert str(e.value) == (f"the {split} split has {n} tokens, fewer than one window of block_size + 1 = {n + 1}; "
                            "use a smaller block_size or more text")


def test_a_run_needs_a_step_or_time_limit_and_the_datas_vocabulary(verse_data, tmp_path):
    with pytest.raises(GPTSmallError) as e:
        plan_run(tmp_path / "r", data=verse_data, preset="tiny", sets=["max_steps=0"])
    assert str(e.value) == "max_steps 0 (no step limit) needs a max_time (--max-time) to end the run"
    plan = plan_run(tmp_path / "r", data=verse_data, preset="tiny", sets=["max_steps=0", "max_time=60"])
    assert (plan.train.max_steps, plan.train.max_time, plan.out, plan.kind) == (0, 60.0, tmp_path / "r", "fresh")
    assert plan_run(tmp_path / "r", data=verse_data, preset="tiny", sets=["max_steps=3"]).train.max_time == 0.0
    vocab = PreparedData(verse_data).tokenizer.vocab_size
    with pytest.raises(GPTSmallError) as e:
        plan_run(tmp_path / "r", data=verse_data, preset="tiny", sets=[f"vocab_size={vocab + 1}"])
    assert str(e.value) == f"the model's vocab_size {vocab + 1} differs from the data's tokenizer ({vocab})"


def test_the_memory_check_counts_four_copies_of_the_weights_and_one_batch(verse_data, tmp_path, monkeypatch):
    from gpt_small import limits
    from gpt_small.config import ConfigError

    sets = ["batch_size=3", "block_size=48", "n_layer=3", "n_embd=64", "mlp_ratio=3"]
    plan = plan_run(tmp_path / "r", data=verse_data, preset="tiny", sets=sets)
    m = plan.model
    # weights, gradients and AdamW's two moments, plus one micro-batch's activations
    need = limits.model_bytes(m.num_params(), training=True) + limits.activation_bytes(
        batch_size=3, block_size=48, n_layer=3, n_embd=64, mlp_ratio=3, vocab_size=m.vocab_size)
    assert need > 4 * 4 * m.num_params()
    monkeypatch.setattr(limits, "available_memory", lambda: need)  # exactly enough: accepted
    assert plan_run(tmp_path / "r", data=verse_data, preset="tiny", sets=sets).model == m
    monkeypatch.setattr(limits, "available_memory", lambda: need - 1)
    with pytest.raises(ConfigError) as e:
        plan_run(tmp_path / "r", data=verse_data, preset="tiny", sets=sets)
    assert str(e.value).startswith(f"training a model of {m.num_params():,} parameters at batch_size 3 x block_size 48 "
                                   "needs ~0.0 GiB of memory; this machine has 0.0 GiB available")
    assert not (tmp_path / "r").exists()


def test_init_from_refuses_a_preset(trained, verse_data, tmp_path):
    with pytest.raises(GPTSmallError) as e:
        plan_run(tmp_path / "ft", data=verse_data, init_from=trained, preset="tiny")
    assert str(e.value) == "--preset does not apply with --init-from: the model comes from the checkpoint"


def test_the_python_api_may_give_one_whole_config_and_the_other_is_the_default(verse_data, tmp_path):
    vocab = PreparedData(verse_data).tokenizer.vocab_size
    model = GPTConfig.from_preset("tiny", vocab_size=vocab, n_layer=3)
    plan = plan_run(tmp_path / "r", data=verse_data, model=model)
    assert plan.model == model and plan.train == TrainConfig()  # not the default preset's model
    train = TrainConfig(**TRAIN)
    plan = plan_run(tmp_path / "r", data=verse_data, model=model, train=train)
    assert (plan.model, plan.train, plan.kind) == (model, train, "fresh")
    assert vocab != GPTConfig().vocab_size
    with pytest.raises(GPTSmallError, match=f"the model's vocab_size {GPTConfig().vocab_size} differs"):
        plan_run(tmp_path / "r", data=verse_data, train=train)


def test_the_first_refusals_of_a_plan_in_their_exact_words(tmp_path):
    with pytest.raises(GPTSmallError) as e:
        plan_run(tmp_path / "r", resume=True, init_from=tmp_path / "other")
    assert str(e.value) == "--init-from starts a new run; leave it out with --resume (the run holds its weights)"
    with pytest.raises(GPTSmallError) as e:
        plan_run(tmp_path / "r")
    assert str(e.value) == "--data is required (the folder made by `gpt-small prepare`)"


def test_the_model_is_the_flags_preset_else_the_config_files_else_poem_cpu(verse_data, tmp_path):
    """`--preset` (default: the config file's, else poem-cpu), the vocabulary always the data's."""
    vocab = PreparedData(verse_data).tokenizer.vocab_size
    (tmp_path / "baby.toml").write_text('preset = "baby"\n')
    assert plan_run(tmp_path / "r", data=verse_data).model == GPTConfig.from_preset("poem-cpu", vocab_size=vocab)
    assert plan_run(tmp_path / "r", data=verse_data, config_file=tmp_path / "baby.toml").model == \
        GPTConfig.from_preset("baby", vocab_size=vocab)
    assert plan_run(tmp_path / "r", data=verse_data, preset="tiny", config_file=tmp_path / "baby.toml").model == \
        GPTConfig.from_preset("tiny", vocab_size=vocab)


def test_prepared_data_is_taken_as_it_is(verse_data, tmp_path):
    data = PreparedData(verse_data)
    assert plan_run(tmp_path / "r", data=data, preset="tiny").data is data
    assert plan_run(tmp_path / "r", data=str(verse_data), preset="tiny").data.directory == verse_data


def test_every_source_beside_whole_configs_is_checked_at_resume(trained):
    """The Python API's whole configs come last (they state every field), but what the other
    sources set is still a change that --resume refuses, named by its source."""
    plan = plan_run(trained, resume=True)
    assert plan_run(trained, resume=True, model=plan.model, train=plan.train).model == plan.model
    with pytest.raises(GPTSmallError, match=r"^--resume: --set n_layer would change n_layer from 2"):
        plan_run(trained, resume=True, model=plan.model, train=plan.train, sets=["n_layer=3"])
