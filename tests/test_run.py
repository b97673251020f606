"""The run layer: `plan_run` (fresh, resume, init-from from one set of rules) and the run folder's
lock, released on every path (the CLI, the Python API, make poem and compare).

A lock is checked the way a user meets it: another process tries to take it (the lock is
re-entrant within one process, so only another process can tell it is still held).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gpt_small.config import GPTConfig, TrainConfig
from gpt_small.data import PreparedData
from gpt_small.errors import GPTSmallError
from gpt_small.run import RESUME_MAY_CHANGE, plan_run
from gpt_small.train import Trainer

TRAIN = dict(batch_size=2, max_steps=2, warmup_steps=0, eval_interval=2, eval_batches=1, log_interval=1,
             final_eval=False, threads=1)


def _configs(data_dir: Path, **train) -> tuple[GPTConfig, TrainConfig]:
    vocab = PreparedData(data_dir).tokenizer.vocab_size
    return GPTConfig.from_preset("tiny", vocab_size=vocab), TrainConfig(**{**TRAIN, **train})


def _free(folder: Path) -> bool:
    """Whether another process can take the run folder's lock now."""
    code = "import sys; from gpt_small.fileio import FolderLock; FolderLock(sys.argv[1]).acquire()"
    return subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def trained(verse_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run") / "run"
    model, train = _configs(verse_data)
    with Trainer(model, train, verse_data, run, show_progress=False) as t:
        t.fit()
    return run


# ---------------------------------------------------------------- plan_run

def test_a_fresh_plan_takes_the_datas_vocabulary_and_the_priority_order(verse_data, tmp_path):
    (tmp_path / "c.toml").write_text('preset = "tiny"\n[model]\nn_layer = 3\n[train]\nlr = 0.01\nbatch_size = 3\n')
    plan = plan_run(tmp_path / "r", data=verse_data, config_file=tmp_path / "c.toml", sets=["lr=0.02"],
                    train_overrides={"batch_size": 5, "max_steps": 7})
    assert plan.kind == "fresh" and plan.checkpoint is None
    assert plan.model.vocab_size == PreparedData(verse_data).tokenizer.vocab_size  # the data's
    assert plan.model.n_layer == 3 and plan.model.n_embd == GPTConfig.from_preset("tiny").n_embd  # file over preset
    assert (plan.train.lr, plan.train.batch_size, plan.train.max_steps) == (0.02, 5, 7)  # --set > overrides > file
    assert not (tmp_path / "r").exists()  # planning writes nothing


def test_a_resumed_plan_is_the_runs_own_config_with_only_the_allowed_changes(trained):
    plan = plan_run(trained, resume=True, sets=["max_steps=5"])
    assert plan.kind == "resume" and plan.resume_from == (trained / "last").resolve()
    assert plan.train.max_steps == 5 and plan.model.n_layer == 2
    assert "max_steps" in RESUME_MAY_CHANGE and "lr" not in RESUME_MAY_CHANGE


def test_the_python_api_resume_refuses_what_the_cli_refuses_in_the_same_words(trained, verse_data):
    model, train = _configs(verse_data, lr=0.5)
    with pytest.raises(GPTSmallError, match=r"--resume: the given TrainConfig would change lr from 0\.001 "
                                            r"\(the run's\) to 0\.5; a resumed run keeps"):
        Trainer(model, train, verse_data, trained, resume=True, show_progress=False)
    with pytest.raises(GPTSmallError, match=r"--resume: --lr would change lr from 0\.001 \(the run's\) to 0\.5; "
                                            r"a resumed run keeps"):
        plan_run(trained, resume=True, flags=[_flag("--lr", "train", "lr", "0.5")])
    model, train = _configs(verse_data, max_steps=4)  # a budget may change
    Trainer(model, train, verse_data, trained, resume=True, show_progress=False).close()


def _flag(source, section, name, value):
    from gpt_small.config_sources import Assignment

    return Assignment(source, section, name, value)


def test_init_from_keeps_the_checkpoints_shape_except_dropout(trained, verse_data, tmp_path):
    plan = plan_run(tmp_path / "ft", data=verse_data, init_from=trained, sets=["dropout=0.2", "lr=0.01"])
    assert plan.kind == "init" and plan.init_from == (trained / "best").resolve()
    assert (plan.model.n_layer, plan.model.dropout, plan.train.lr) == (2, 0.2, 0.01)
    assert plan.train.max_steps == TrainConfig().max_steps  # a new run: the run's own training config is not taken
    with pytest.raises(GPTSmallError, match=r"--init-from: --set n_layer would change n_layer from 2 \(the "
                                            r"checkpoint's.*only dropout may change"):
        plan_run(tmp_path / "ft", data=verse_data, init_from=trained, sets=["n_layer=3"])
    model, train = _configs(verse_data)
    with pytest.raises(GPTSmallError, match="the given GPTConfig would change n_embd"):
        Trainer(GPTConfig(**{**model.to_dict(), "n_embd": 64}), train, verse_data, tmp_path / "ft2",
                init_from=trained, show_progress=False)


def test_resume_and_init_from_together_are_refused(trained, verse_data):
    with pytest.raises(GPTSmallError, match="--init-from starts a new run"):
        plan_run(trained, data=verse_data, resume=True, init_from=trained)


# ---------------------------------------------------------------- the lock, released on every path

def test_the_trainer_holds_the_lock_until_it_is_closed_even_on_an_error(verse_data, tmp_path):
    model, train = _configs(verse_data)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom"):
        with Trainer(model, train, verse_data, run, show_progress=False) as t:
            t.setup()
            assert not _free(run)  # held while the trainer lives
            raise RuntimeError("boom")
    assert _free(run)


def test_a_refused_start_leaves_the_folder_unlocked(trained, verse_data):
    model, train = _configs(verse_data)
    with pytest.raises(GPTSmallError, match="already holds a run"):
        Trainer(model, train, verse_data, trained, show_progress=False)
    assert _free(trained)


def test_make_poem_and_compare_release_their_run_folders(verse_data, tmp_path):
    from gpt_small.poem import ensure_model
    from gpt_small.study import compare_encodings

    (tmp_path / "tiny.toml").write_text('preset = "tiny"\n[train]\nbatch_size = 2\nthreads = 1\n'
                                        "eval_batches = 1\nmax_steps = 2\nfinal_eval = false\n")
    assert ensure_model(verse_data, tmp_path / "poem", str(tmp_path / "tiny.toml"), minutes=1.0)["steps"] == 2
    assert _free(tmp_path / "poem")
    model, train = _configs(verse_data, final_eval=True)
    compare_encodings(["rope"], model_config=model, train_config=train, data=verse_data, out_dir=tmp_path / "cmp",
                      show_progress=False, extrapolation=(1,), extrapolation_tokens=64)
    assert _free(tmp_path / "cmp" / "rope-seed1337")
