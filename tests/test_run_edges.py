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
