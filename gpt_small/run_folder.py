"""A run folder: its lock, its bookkeeping files and its checkpoints' config, apart from training.

    runs/NAME/  .lock  run_config.json  metrics.jsonl  checkpoints/  last  best  summary.json  curves.png

`RunFolder(plan)` is a context manager: entered, it holds the folder's lock (rank 0 of a torchrun
job; the other ranks write nothing) and refuses a fresh run in a folder that already holds one;
left, on every path (an error, Ctrl-C, a normal end), it closes the trackers and releases the
lock. The lock is taken before the already-a-run check so two starts cannot both pass it.

What it writes: run_config.json (the resolved configs, where the run trains), metrics.jsonl (one
JSON line per record, also sent to the trackers), the checkpoints (checkpoint.py, with the
config.json this module composes: configs, data, best loss, progress) and at the end
summary.json and the plot. What it reads back: `run_progress`, where a run stands (from config.json
alone), `read_run_config` and `read_metrics`, the one reader of each of those files.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import find_checkpoint, load_trainer_state, read_checkpoint_config, save_checkpoint
from .errors import GPTSmallError
from .fileio import FolderLock, append_line, atomic_write, strict_json
from .run import RunPlan, recorded_path
from .schemas import RunConfig, read_json


RUN_CONFIG = "run_config.json"


def read_run_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The run_config.json of `run_dir` (checked against schemas.RunConfig; a damaged one is one
    line naming the file), or None where the folder has none (a checkpoint folder, an import)."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        return None
    return read_json(path, RunConfig)


@dataclass(frozen=True, kw_only=True)
class RunProgress:
    """Where a run folder's last checkpoint stands, read from its config.json alone."""

    step: int  # optimizer steps done
    finished: bool  # the run reached its step or time budget (an interrupted run is not finished)
    elapsed: float  # training seconds spent so far


def run_progress(run_dir: str | Path) -> RunProgress:
    """The progress of the run in `run_dir` (its `last` checkpoint) without loading optimizer moments."""
    ckpt = find_checkpoint(run_dir, prefer="last")
    meta = read_checkpoint_config(ckpt)
    progress = meta.get("progress")
    if progress is None:  # a checkpoint written before config.json carried it
        state = load_trainer_state(ckpt)
        progress = {"finished": state.get("finished", False), "elapsed": state["elapsed"]}
    return RunProgress(step=int(meta["step"]), finished=bool(progress["finished"]),
                       elapsed=float(progress["elapsed"]))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records (the plots read them); a line cut short by a kill or a full disk,
    which the next resume trims, is passed over."""
    out = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def trim_metrics(path: Path, step: int) -> None:
    """Drop the log lines written after `step` (a resumed run writes them again; a fresh start, step
    0, drops the log of a run killed before its first checkpoint) and a last line cut short by a
    kill or a full disk."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    atomic_write(path, "".join(line + "\n" for line in keep))


class RunFolder:
    """The folder of `plan`'s run. writer: this process writes (rank 0); trackers: objects with
    log(record) and close() that receive every metrics.jsonl record (interop/trackers.py)."""

    def __init__(self, plan: RunPlan, *, writer: bool | None = None, trackers: Sequence[Any] = ()):
        self.plan = plan
        self.path = plan.out
        # Decided before the process group exists: torchrun's RANK, as setup_distributed reads it.
        self.writer = os.environ.get("RANK", "0") == "0" if writer is None else writer
        self.trackers = list(trackers)
        self._lock = FolderLock(self.path, "--out")

    def __enter__(self) -> "RunFolder":
        if self.writer:
            self._lock.acquire()
        try:
            self.claim()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def claim(self) -> None:
        if self.plan.kind != "resume" and self.holds_run():
            raise GPTSmallError(f"{self.path} already holds a run; pass --resume to continue it or choose another --out")

    def holds_run(self) -> bool:
        """Whether a fresh run here could overwrite a run's work: a `last` or `best` link (a broken
        one too: its checkpoints may still be there) or any saved checkpoint."""
        if any((self.path / name).is_symlink() or (self.path / name).exists() for name in ("last", "best")):
            return True
        root = self.path / "checkpoints"
        return root.is_dir() and any(p.name.startswith("step-") and ".tmp-" not in p.name for p in root.iterdir())

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
        self._lock.release()

    def start(self, step: int, **where: Any) -> None:
        """Before the first step: the folder, run_config.json (configs and `where`: world size,
        device, autocast), and metrics.jsonl trimmed back to `step`."""
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.writer:
            return
        plan = self.plan
        run_config = {"model": plan.model.to_dict(), "train": plan.train.to_dict(),
                      "data": str(recorded_path(plan.data.directory)), **where}
        if plan.init_from is not None:
            run_config["init_from"] = str(plan.init_from)
        atomic_write(self.path / RUN_CONFIG, strict_json(run_config, indent=2) + "\n")
        trim_metrics(self.path / "metrics.jsonl", step)

    def log(self, record: dict[str, Any]) -> None:
        if self.writer:
            append_line(self.path / "metrics.jsonl", strict_json(record))
            for tracker in self.trackers:
                tracker.log(record)

    def save(self, *, step: int, model: Any, trainer_state: dict[str, Any], best_val: float, finished: bool,
             elapsed: float, best: bool = False) -> Path | None:
        """A checkpoint of `step`, `last` (and `best`) pointed at it; the writer only."""
        if not self.writer:
            return None
        plan, data = self.plan, self.plan.data
        config = {"model": plan.model.to_dict(), "train": plan.train.to_dict(),
                  "data": {"directory": str(recorded_path(data.directory)), "tokenizer": data.tokenizer.kind,
                           "chars_per_token": data.chars_per_token("val")},
                  "val_loss": None if math.isinf(best_val) else best_val,
                  "progress": {"finished": finished, "elapsed": elapsed}}
        if plan.init_from is not None:
            config["init_from"] = str(plan.init_from)
        return save_checkpoint(self.path, step=step, model=model, tokenizer=data.tokenizer, config=config,
                               trainer_state=trainer_state, links=("last", "best") if best else ("last",))

    def on_disk(self) -> str:
        """What a stopped run leaves: the step of its last checkpoint, or that there is none."""
        last = self.path / "last"
        if not last.exists():
            return f"no checkpoint was saved in {self.path}"
        return f"the last good checkpoint is step {read_checkpoint_config(last.resolve())['step']} in {last}"

    def finish(self, summary: dict[str, Any]) -> None:
        """summary.json and curves.png (the plot's path goes into the summary)."""
        if not self.writer:
            return
        from .plots import plot_run

        atomic_write(self.path / "summary.json", strict_json(summary, indent=2) + "\n")
        plot_run(self.path / "metrics.jsonl", self.path / "curves.png")
        summary["plot"] = str(self.path / "curves.png")
