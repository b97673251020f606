"""The experiment trackers (`gpt-small train --logger tensorboard|wandb`) without training: records
as metrics.jsonl holds them, fed to a tracker by hand, and read back from TensorBoard's event files
with TensorBoard's own reader. Which numbers become which tags (bools, strings and the step left
out), the training bits/char, the configs as text, nothing written before the first record, an
evaluation on disk at once, each refusal in its one line.

wandb is never a dependency and is not installed here: its tracker is run against a stand-in
`wandb` module that records the calls wandb's documented API receives (`wandb.init(...)`,
`run.log(..., step=)`, `run.finish()`). An end-to-end run with `--logger tensorboard` is in
test_interop_finetune.py.

Documented in docs/interop.md ("Experiment trackers") and gpt_small/interop/trackers.py.
"""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest

from gpt_small.errors import GPTSmallError
from gpt_small.interop.trackers import TensorBoardTracker, Tracker, WandbTracker, make_tracker, scalars

TRAIN = {"kind": "train", "step": 7, "loss": 2.0, "lr": 0.001, "tokens_per_s": 1500, "clipped": True,
         "note": "warm"}
EVAL = {"kind": "eval", "step": 8, "val_loss": 1.5, "val_bpc": 2.25}


# ---------------------------------------------------------------- records as tags

def test_every_number_of_a_record_is_tagged_by_its_kind():
    """Ints and floats, as floats; the kind and step are not values; a bool or a string is no number."""
    got = scalars(TRAIN, None)
    assert got == {"train/loss": 2.0, "train/lr": 0.001, "train/tokens_per_s": 1500.0}
    assert all(type(v) is float for v in got.values())
    assert scalars(EVAL, 1.3) == {"eval/val_loss": 1.5, "eval/val_bpc": 2.25}  # no bits/char outside training
    assert scalars({"kind": "final_eval", "step": 9, "loss": 1.0, "bits_per_char": 1.4}, 2.0) == {
        "final_eval/loss": 1.0, "final_eval/bits_per_char": 1.4}
    assert scalars({"step": 1, "loss": 3.0}, None) == {"train/loss": 3.0}  # a record without a kind: training's


@pytest.mark.parametrize("chars_per_token", [1.0, 3.5])
def test_training_bits_per_char_is_the_loss_in_bits_over_characters_per_token(chars_per_token):
    got = scalars(TRAIN, chars_per_token)
    assert got["train/bits_per_char"] == pytest.approx(2.0 / math.log(2) / chars_per_token, rel=1e-12)
    assert scalars({"kind": "train", "step": 1}, chars_per_token) == {}  # no loss: no bits/char
    assert "train/bits_per_char" not in scalars(TRAIN, None)  # no characters per token known: none
    assert "train/bits_per_char" not in scalars(TRAIN, 0.0)


def test_the_base_tracker_takes_its_settings_and_logs_nothing_itself(tmp_path):
    t = Tracker(tmp_path / "run", config={"a": 1}, train_chars_per_token=2.0)
    assert (t.out_dir, t.config, t.train_chars_per_token) == (tmp_path / "run", {"a": 1}, 2.0)
    assert Tracker(str(tmp_path)).config == {} and Tracker(str(tmp_path)).out_dir == tmp_path
    with pytest.raises(NotImplementedError):
        t.log(TRAIN)
    t.close()


# ---------------------------------------------------------------- TensorBoard, read back with its reader

def events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_tensorboard_writes_each_number_at_its_step_and_the_configs_as_text(tmp_path):
    run = tmp_path / "runs" / "x"  # not there yet: made at the first record
    config = {"model": {"n_layer": 2}, "train": {"lr": 0.001}}
    t = make_tracker("tensorboard", run, config=config, train_chars_per_token=2.0)
    assert isinstance(t, TensorBoardTracker) and not run.exists()  # nothing written before the first record
    t.log(TRAIN)
    t.log({**TRAIN, "step": 9, "loss": 1.0})
    t.log(EVAL)
    t.log({"kind": "final_eval", "loss": 1.25})  # no step: step 0
    t.close()
    (event_file,) = run.glob("events.out.tfevents.*")
    acc = events(run)
    assert set(acc.Tags()["scalars"]) == {"train/loss", "train/lr", "train/tokens_per_s", "train/bits_per_char",
                                          "eval/val_loss", "eval/val_bpc", "final_eval/loss"}
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(7, 2.0), (9, 1.0)]
    bpc = acc.Scalars("train/bits_per_char")
    assert [e.step for e in bpc] == [7, 9]
    assert [e.value for e in bpc] == pytest.approx([2.0 / math.log(2) / 2.0, 1.0 / math.log(2) / 2.0], rel=1e-6)
    assert [(e.step, e.value) for e in acc.Scalars("eval/val_bpc")] == [(8, 2.25)]
    assert [(e.step, e.value) for e in acc.Scalars("final_eval/loss")] == [(0, 1.25)]
    (text,) = acc.Tensors("config/text_summary")
    assert text.step == 0
    assert text.tensor_proto.string_val[0].decode() == "```\n" + json.dumps(config, indent=2) + "\n```"


def test_tensorboard_flushes_each_evaluation_at_once(tmp_path):
    """Evaluations are rare and worth seeing while the run goes on: each is flushed to the event
    file when logged; training records are left to TensorBoard's own batching. (Whether unflushed
    events reach the file early depends on TensorBoard's writer thread, so the flushes are counted
    on the real SummaryWriter, and the evaluation read back from the file before the tracker closes.)"""
    t = make_tracker("tensorboard", tmp_path)
    flushes = []

    class CountingWriter(t._writer_class):
        def flush(self):
            flushes.append(len(flushes))
            super().flush()

    t._writer_class = CountingWriter
    t.log(TRAIN)
    t.log({**TRAIN, "step": 8})
    assert flushes == []
    t.log(EVAL)
    assert len(flushes) == 1
    try:
        assert [(e.step, e.value) for e in events(tmp_path).Scalars("eval/val_loss")] == [(8, 1.5)]
        t.log({"kind": "final_eval", "step": 9, "loss": 1.0})
        assert len(flushes) == 2
    finally:
        t.close()
    t.close()  # twice: nothing more to do


def test_tensorboard_closed_before_any_record_writes_nothing(tmp_path):
    make_tracker("tensorboard", tmp_path / "run").close()
    assert not (tmp_path / "run").exists()


def test_tensorboard_without_its_package_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` raises ImportError
    with pytest.raises(GPTSmallError) as e:
        make_tracker("tensorboard", tmp_path)
    assert str(e.value) == ("--logger tensorboard needs the tensorboard package: pip install tensorboard "
                            "(or gpt-small[trackers])")


# ---------------------------------------------------------------- wandb, against a stand-in for its API

class StandInWandb(types.ModuleType):
    """`wandb` as far as the tracker uses it: init(**settings) -> a run with log(data, step=) and finish()."""

    def __init__(self):
        super().__init__("wandb")
        self.calls: list[tuple] = []

    def init(self, **settings):
        self.calls.append(("init", settings))
        wandb = self

        class Run:
            def log(self, data, step):
                wandb.calls.append(("log", data, step))

            def finish(self):
                wandb.calls.append(("finish",))

        return Run()


def test_wandb_logs_offline_into_the_run_folder_from_the_first_record(tmp_path, monkeypatch):
    wandb = StandInWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    run = tmp_path / "runs" / "poem"
    config = {"model": {"n_layer": 2}}
    t = make_tracker("wandb", run, config=config, train_chars_per_token=2.0)
    assert isinstance(t, WandbTracker) and wandb.calls == [] and not run.exists()
    t.log(TRAIN)
    t.log(EVAL)
    t.log({"kind": "final_eval", "loss": 1.25})
    t.close()
    assert run.is_dir()
    assert wandb.calls == [
        ("init", {"project": "gpt-small", "name": "poem", "dir": str(run), "mode": "offline", "config": config}),
        ("log", scalars(TRAIN, 2.0), 7),
        ("log", {"eval/val_loss": 1.5, "eval/val_bpc": 2.25}, 8),
        ("log", {"final_eval/loss": 1.25}, 0),
        ("finish",),
    ]
    assert "train/bits_per_char" in wandb.calls[1][1]


@pytest.mark.parametrize("kind", ["tensorboard", "wandb"])
def test_a_tracker_writes_into_the_run_folder_the_trainer_already_made(tmp_path, monkeypatch, kind):
    """In a run the folder exists (metrics.jsonl, the lock) before the first record: taken as it is."""
    monkeypatch.setitem(sys.modules, "wandb", StandInWandb())
    (tmp_path / "metrics.jsonl").write_text(json.dumps(TRAIN) + "\n")
    t = make_tracker(kind, tmp_path)
    t.log(TRAIN)
    t.close()
    assert (tmp_path / "metrics.jsonl").read_text() == json.dumps(TRAIN) + "\n"
    if kind == "tensorboard":
        assert [(e.step, e.value) for e in events(tmp_path).Scalars("train/loss")] == [(7, 2.0)]
    else:
        assert [c[0] for c in sys.modules["wandb"].calls] == ["init", "log", "finish"]


def test_wandb_closed_before_any_record_starts_no_run(tmp_path, monkeypatch):
    wandb = StandInWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    t = make_tracker("wandb", tmp_path / "run")
    t.close()
    assert wandb.calls == [] and not (tmp_path / "run").exists()
    assert t.config == {}


def test_wandb_without_its_package_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: `import wandb` raises ImportError
    with pytest.raises(GPTSmallError) as e:
        make_tracker("wandb", tmp_path)
    assert str(e.value) == ("--logger wandb needs the wandb package, which is not installed: pip install wandb "
                            "(gpt-small never requires it)")


@pytest.mark.parametrize("kind", ["mlflow", "TensorBoard", "", "wandb "])
def test_an_unknown_logger_is_refused_naming_the_choices(kind, tmp_path):
    with pytest.raises(GPTSmallError) as e:
        make_tracker(kind, tmp_path)
    assert str(e.value) == f"--logger must be one of tensorboard, wandb, got {kind!r}"
