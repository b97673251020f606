"""The run folder (run_folder.py) without training: a plan from `plan_run` and an untrained tiny
model are enough to check what `RunFolder` refuses, locks, writes and reads back.

- a fresh run is refused where a run is (a `last` or `best` link, a broken one too, a saved
  checkpoint), in one line; a temporary checkpoint folder or anything else is no run; `--resume`
  is never refused so;
- the folder's lock is held from entering to leaving, on an error too; a process that is not
  rank 0 takes no lock and writes nothing;
- run_config.json, metrics.jsonl (trimmed back to the step a run starts from), the checkpoint's
  config.json, summary.json and curves.png hold what the docstrings say;
- run_progress, read_metrics and read_run_config read them back, old checkpoints included.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt_small.checkpoint import read_checkpoint_config
from gpt_small.config import GPTConfig
from gpt_small.data import PreparedData
from gpt_small.errors import GPTSmallError
from gpt_small.model import GPT
from gpt_small.run import plan_run, recorded_path
from gpt_small.run_folder import RunFolder, RunProgress, read_metrics, read_run_config, run_progress, trim_metrics


def _free(folder: Path) -> bool:
    """Whether another process can take the folder's lock now."""
    code = "import sys; from gpt_small.fileio import FolderLock; FolderLock(sys.argv[1]).acquire()"
    return subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True).returncode == 0


def _plan(verse_data: Path, out: Path, **kw):
    kw.setdefault("preset", None if "init_from" in kw else "tiny")
    return plan_run(out, data=verse_data, train_overrides={"max_steps": 3}, **kw)


@pytest.fixture(scope="module")
def model(verse_data):
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("tiny", vocab_size=PreparedData(verse_data).tokenizer.vocab_size))


class Tracker:
    def __init__(self):
        self.records, self.closed = [], 0

    def log(self, record):
        self.records.append(record)

    def close(self):
        self.closed += 1


@pytest.mark.parametrize("make, held", [
    (lambda d: None, False),
    (lambda d: (d / "last").symlink_to("checkpoints/step-000002"), True),  # broken: its checkpoints may be there
    (lambda d: (d / "best").symlink_to("checkpoints/step-000002"), True),
    (lambda d: (d / "best").mkdir(), True),
    (lambda d: (d / "checkpoints" / "step-000002").mkdir(parents=True), True),
    (lambda d: (d / "checkpoints" / "step-000002.tmp-123").mkdir(parents=True), False),  # a save cut short
    (lambda d: (d / "checkpoints" / "other").mkdir(parents=True), False),
    (lambda d: (d / "checkpoints").mkdir(), False),
    (lambda d: (d / "checkpoints").write_text(""), False),
    (lambda d: (d / "metrics.jsonl").write_text('{"step": 1}\n'), False),
])
def test_a_fresh_run_is_refused_only_where_a_run_is(verse_data, tmp_path, make, held):
    out = tmp_path / "run"
    out.mkdir()
    make(out)
    folder = RunFolder(_plan(verse_data, out))
    if held:
        with pytest.raises(GPTSmallError) as e:
            folder.__enter__()
        assert str(e.value) == f"{out} already holds a run; pass --resume to continue it or choose another --out"
        assert _free(out)  # the refusal let the lock go
    else:
        with folder:
            assert not _free(out)
        assert _free(out)


def test_the_lock_is_released_on_an_error_and_trackers_are_closed_once(verse_data, tmp_path):
    out = tmp_path / "run"
    t = Tracker()
    with pytest.raises(RuntimeError):
        with RunFolder(_plan(verse_data, out), trackers=[t]) as folder:
            assert not _free(out) and (out / ".lock").is_file()
            raise RuntimeError("stop")
    assert _free(out) and t.closed == 1
    folder.close()  # closing again closes nothing twice
    assert t.closed == 1
    refused = Tracker()
    (out / "last").symlink_to("checkpoints/step-000001")
    with pytest.raises(GPTSmallError):
        RunFolder(_plan(verse_data, out), trackers=[refused]).__enter__()
    assert refused.closed == 1  # a refused start closes its trackers too


@pytest.mark.parametrize("rank, writer", [(None, True), ("0", True), ("1", False), ("3", False)])
def test_only_rank_0_locks_and_writes(verse_data, model, tmp_path, monkeypatch, rank, writer):
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    out = tmp_path / "runs" / "run"  # made with its parent by every rank
    t = Tracker()
    with RunFolder(_plan(verse_data, out), trackers=[t]) as folder:
        assert folder.writer is writer
        assert out.is_dir() is writer  # the writer's lock made it
        folder.start(0, world_size=2)  # before the probe below, which makes the folder to lock it
        assert _free(out) is not writer
        folder.log({"kind": "train", "step": 1, "loss": 3.0, "lr": 0.001})
        saved = folder.save(step=1, model=model, trainer_state={"elapsed": 1.0}, best_val=2.0, finished=False,
                            elapsed=1.0)
        folder.finish({"steps": 1})
    assert out.is_dir()  # every rank makes the folder
    names = sorted(p.name for p in out.iterdir())
    if writer:
        assert names == [".lock", "checkpoints", "curves.png", "last", "metrics.jsonl", "run_config.json",
                         "summary.json"]
        assert saved == out / "checkpoints" / "step-000001" and [r["step"] for r in t.records] == [1]
    else:
        assert names == [".lock"] and saved is None and t.records == []  # the lock file is the probe's


def test_writer_given_overrides_the_rank(verse_data, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert RunFolder(_plan(verse_data, tmp_path / "a"), writer=True).writer is True
    monkeypatch.setenv("RANK", "0")
    assert RunFolder(_plan(verse_data, tmp_path / "a"), writer=False).writer is False


def test_start_writes_the_run_config_and_trims_the_log(verse_data, tmp_path):
    out = tmp_path / "run"
    plan = _plan(verse_data, out)
    with RunFolder(plan) as folder:
        out.mkdir(exist_ok=True)
        (out / "metrics.jsonl").write_text('{"step": 0}\n{"step": 2}\n{"step": 3}\n')
        folder.start(2, world_size=1, device="cpu")
    text = (out / "run_config.json").read_text()
    assert text.endswith("}\n") and text.startswith('{\n  "model": {')
    assert json.loads(text) == {"model": plan.model.to_dict(), "train": plan.train.to_dict(),
                                "data": str(recorded_path(plan.data.directory)), "world_size": 1, "device": "cpu"}
    assert read_run_config(out) == json.loads(text)
    assert read_metrics(out / "metrics.jsonl") == [{"step": 0}, {"step": 2}]


def test_a_run_from_a_checkpoint_records_where_it_started(verse_data, model, tmp_path):
    first = tmp_path / "first"
    with RunFolder(_plan(verse_data, first)) as folder:
        folder.save(step=4, model=model, trainer_state={}, best_val=1.5, finished=True, elapsed=2.0, best=True)
    out = tmp_path / "run"
    plan = _plan(verse_data, out, init_from=first)
    assert plan.kind == "init"
    with RunFolder(plan) as folder:
        folder.start(0)
        ckpt = folder.save(step=1, model=model, trainer_state={}, best_val=float("inf"), finished=False, elapsed=0.5)
    assert json.loads((out / "run_config.json").read_text())["init_from"] == str(plan.init_from)
    assert read_checkpoint_config(ckpt)["init_from"] == str(plan.init_from)
    assert "init_from" not in read_checkpoint_config(first / "last")


def test_the_checkpoint_config_holds_the_configs_data_loss_and_progress(verse_data, model, tmp_path):
    out = tmp_path / "run"
    plan = _plan(verse_data, out)
    data = PreparedData(verse_data)
    with RunFolder(plan) as folder:
        assert folder.on_disk() == f"no checkpoint was saved in {out}"
        first = folder.save(step=1, model=model, trainer_state={"elapsed": 0.5}, best_val=float("inf"),
                            finished=False, elapsed=0.5)
        meta = read_checkpoint_config(first)  # before the next save prunes it
        assert folder.on_disk() == f"the last good checkpoint is step 1 in {out / 'last'}"
        second = folder.save(step=12, model=model, trainer_state={"elapsed": 3.0}, best_val=1.25, finished=True,
                             elapsed=3.0, best=True)
        assert folder.on_disk() == f"the last good checkpoint is step 12 in {out / 'last'}"
    assert meta["val_loss"] is None  # no evaluation yet: +inf is no loss
    assert meta["progress"] == {"finished": False, "elapsed": 0.5}
    assert meta["model"] == plan.model.to_dict() and meta["train"] == plan.train.to_dict()
    assert meta["data"] == {"directory": str(recorded_path(verse_data)), "tokenizer": "char",
                            "chars_per_token": data.chars_per_token("val")}
    assert "init_from" not in meta
    meta = read_checkpoint_config(second)
    assert (meta["step"], meta["val_loss"], meta["progress"]) == (12, 1.25, {"finished": True, "elapsed": 3.0})
    assert (out / "best").resolve() == (out / "last").resolve() == second
    assert run_progress(out) == RunProgress(step=12, finished=True, elapsed=3.0)


def test_best_is_pointed_only_when_asked(verse_data, model, tmp_path):
    out = tmp_path / "run"
    with RunFolder(_plan(verse_data, out)) as folder:
        folder.save(step=1, model=model, trainer_state={}, best_val=2.0, finished=False, elapsed=1.0, best=True)
        folder.save(step=2, model=model, trainer_state={}, best_val=2.0, finished=False, elapsed=2.0)
    assert (out / "best").resolve().name == "step-000001" and (out / "last").resolve().name == "step-000002"


def test_log_appends_strict_json_and_sends_each_record_to_every_tracker(verse_data, tmp_path):
    out = tmp_path / "run"
    a, b = Tracker(), Tracker()
    with RunFolder(_plan(verse_data, out), trackers=[a, b]) as folder:
        folder.start(0)
        folder.log({"kind": "train", "step": 1, "loss": float("nan")})
        folder.log({"kind": "eval", "step": 2, "val_loss": 1.5})
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert lines == ['{"kind": "train", "step": 1, "loss": null}', '{"kind": "eval", "step": 2, "val_loss": 1.5}']
    assert a.records == b.records and len(a.records) == 2 and a.records[1] == {"kind": "eval", "step": 2,
                                                                               "val_loss": 1.5}
    assert a.closed == b.closed == 1


def test_finish_writes_the_summary_and_the_plot(verse_data, tmp_path):
    out = tmp_path / "run"
    with RunFolder(_plan(verse_data, out)) as folder:
        folder.start(0)
        folder.log({"kind": "train", "step": 1, "loss": 3.0, "lr": 0.001})
        folder.log({"kind": "eval", "step": 1, "val_loss": 2.9})
        summary = {"steps": 1, "best_val_loss": float("inf")}
        folder.finish(summary)
    text = (out / "summary.json").read_text()
    assert text == '{\n  "steps": 1,\n  "best_val_loss": null\n}\n'  # written before the plot's path is added
    assert summary["plot"] == str(out / "curves.png")
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trim_metrics_keeps_the_lines_up_to_the_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    trim_metrics(path, 3)
    assert not path.exists()  # nothing to trim, nothing made
    path.write_bytes(b'{"step": 1}\n{"step": 3, "kind": "eval"}\nnot json\n{"kind": "no step"}\n{"step": null}\n'
                     b'[1]\n{"step": 4}\n{"step": 2, "note": "\xff"}\n{"step": 5, "ki')
    trim_metrics(path, 3)
    assert path.read_text() == '{"step": 1}\n{"step": 3, "kind": "eval"}\n{"step": 2, "note": "\ufffd"}\n'
    trim_metrics(path, 0)
    assert path.read_text() == ""


def test_read_metrics_passes_over_what_is_not_a_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "note": "\xff"}\n[1, 2]\n5\n\n{"step": 2}\n{"step": 3, "ki')
    assert read_metrics(path) == [{"step": 1, "note": "\ufffd"}, {"step": 2}]


def test_read_run_config_is_none_where_there_is_none(tmp_path):
    assert read_run_config(tmp_path) is None
    (tmp_path / "run_config.json").mkdir()
    assert read_run_config(tmp_path) is None


def test_run_progress_of_a_checkpoint_without_progress_reads_its_trainer_state(verse_data, model, tmp_path):
    out = tmp_path / "run"
    with RunFolder(_plan(verse_data, out)) as folder:
        folder.save(step=5, model=model, trainer_state={"elapsed": 7.5, "finished": True}, best_val=2.0,
                    finished=False, elapsed=9.0, best=True)
        folder.save(step=6, model=model, trainer_state={"elapsed": 8.5}, best_val=2.0, finished=True, elapsed=9.5)
    assert run_progress(out) == RunProgress(step=6, finished=True, elapsed=9.5)  # `last`, from config.json
    for name in ("last", "best"):  # checkpoints written before config.json carried their progress
        cfg = out / name / "config.json"
        meta = json.loads(cfg.read_text())
        del meta["progress"]
        cfg.write_text(json.dumps(meta))
    assert run_progress(out) == RunProgress(step=6, finished=False, elapsed=8.5)  # no "finished": not finished
    assert run_progress((out / "best").resolve()) == RunProgress(step=5, finished=True, elapsed=7.5)


def test_the_log_is_read_and_trimmed_as_utf_8_whatever_the_locale(tmp_path):
    """metrics.jsonl is UTF-8 (fileio.append_line writes it so); a process whose locale encoding is
    ASCII (LC_ALL=C, no UTF-8 mode) reads and trims it as UTF-8 all the same."""
    import os

    path = tmp_path / "metrics.jsonl"
    lines = ['{"step": 1, "note": "\u00e9 \u266a"}', '{"step": 2}']
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    assert read_metrics(path)[0]["note"] == "\u00e9 \u266a"
    trim_metrics(path, 2)  # keeps both lines, as they are
    assert path.read_bytes() == "".join(line + "\n" for line in lines).encode("utf-8")
    code = ("import json, sys\nfrom gpt_small.run_folder import read_metrics, trim_metrics\n"
            "print(ascii(read_metrics(sys.argv[1])))\ntrim_metrics(__import__('pathlib').Path(sys.argv[1]), 1)")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0"}
    out = subprocess.run([sys.executable, "-X", "utf8=0", "-c", code, str(path)], env=env, check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == ascii([{"step": 1, "note": "\u00e9 \u266a"}, {"step": 2}])
    assert path.read_bytes() == (lines[0] + "\n").encode("utf-8")


def test_an_out_that_is_a_file_is_refused_naming_the_flag(verse_data, tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(GPTSmallError) as e:
        RunFolder(_plan(verse_data, tmp_path / "run")).__enter__()
    assert str(e.value) == f"cannot use {tmp_path / 'run'} as a --out: it exists and is not a folder"
