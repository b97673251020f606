"""Experiment trackers: `gpt-small train --logger tensorboard|wandb`.

A tracker receives every record the trainer writes to metrics.jsonl (`log(record)`, rank 0 only)
and passes its numbers on, tagged `<kind>/<field>`: `train/loss`, `train/bits_per_char`,
`train/lr`, `train/tokens_per_s`, `eval/val_loss`, `eval/val_bpc` (the validation curve),
`final_eval/loss`, `final_eval/bits_per_char`, ... at the record's step. metrics.jsonl stays the
record of truth; a tracker is a view of it in a tool the user already has open.

  tensorboard  event files in the run folder beside metrics.jsonl, through
               torch.utils.tensorboard (the `tensorboard` package): `tensorboard --logdir runs/`.
  wandb        Weights & Biases in offline mode (files under the run folder's wandb/; upload later
               with `wandb sync`), only when wandb is installed: it is never a dependency.

A tracker opens its files at the first record, so building one costs nothing and processes other
than rank 0 (which never log) never open any.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import GPTSmallError

TRACKERS = ("tensorboard", "wandb")


def scalars(record: dict[str, Any], train_chars_per_token: float | None) -> dict[str, float]:
    """A metrics.jsonl record as {tag: value}: its numbers, plus training bits/char."""
    kind = record.get("kind", "train")
    out = {f"{kind}/{k}": float(v) for k, v in record.items()  # the kind is text: never among the numbers
           if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    if kind == "train" and train_chars_per_token and "loss" in record:
        out["train/bits_per_char"] = record["loss"] / math.log(2) / train_chars_per_token
    return out


class Tracker:
    def __init__(self, out_dir: str | Path, *, config: dict[str, Any] | None = None,
                 train_chars_per_token: float | None = None):
        self.out_dir = Path(out_dir)
        self.config = config or {}
        self.train_chars_per_token = train_chars_per_token

    def log(self, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        try:  # checked now, so a missing package fails before training starts
            import tensorboard  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise GPTSmallError("--logger tensorboard needs the tensorboard package: "
                                "pip install tensorboard (or gpt-small[trackers])") from None
        self._writer_class = SummaryWriter
        self.writer = None

    def log(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.writer = self._writer_class(log_dir=str(self.out_dir))
            self.writer.add_text("config", "```\n" + json.dumps(self.config, indent=2) + "\n```")  # at step 0
        step = int(record.get("step", 0))
        for tag, value in scalars(record, self.train_chars_per_token).items():
            self.writer.add_scalar(tag, value, step)
        if record.get("kind") != "train":  # evaluations are rare and worth seeing at once
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class WandbTracker(Tracker):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        try:
            import wandb
        except ImportError:
            raise GPTSmallError("--logger wandb needs the wandb package, which is not installed: "
                                "pip install wandb (gpt-small never requires it)") from None
        self._wandb = wandb
        self.run = None

    def log(self, record: dict[str, Any]) -> None:
        if self.run is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.run = self._wandb.init(project="gpt-small", name=self.out_dir.name, dir=str(self.out_dir),
                                        mode="offline", config=self.config)
        self.run.log(scalars(record, self.train_chars_per_token), step=int(record.get("step", 0)))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


def make_tracker(kind: str, out_dir: str | Path, *, config: dict[str, Any] | None = None,
                 train_chars_per_token: float | None = None) -> Tracker:
    if kind not in TRACKERS:
        raise GPTSmallError(f"--logger must be one of {', '.join(TRACKERS)}, got {kind!r}")
    cls = TensorBoardTracker if kind == "tensorboard" else WandbTracker
    return cls(out_dir, config=config, train_chars_per_token=train_chars_per_token)
