"""Checkpoints: safetensors weights, readable JSON, and a trainer state that holds no pickled code.

A run folder looks like this:

    runs/NAME/
      checkpoints/step-000500/   model.safetensors  config.json  tokenizer.json  trainer_state.pt
      last -> checkpoints/step-000500      (symbolic links, switched atomically)
      best -> checkpoints/step-000250
      metrics.jsonl  curves.png  run_config.json

Atomicity: a checkpoint is written into a temporary folder, every file fsync'd, the folder renamed
to its final name, and only then is the `last`/`best` link replaced with `os.replace` (atomic on
POSIX). A kill -9 at any moment therefore leaves `last` pointing at a complete checkpoint; a
half-written folder keeps its `.tmp-` name and is swept by the next save. Old step folders that no
link points at are deleted after the switch. A failed write (full disk, read-only folder) removes
its temporary folder and raises one line naming the path and the reason; `last` still points at the
previous checkpoint. Loading checks the checkpoint against itself (every tensor's shape against
config.json, the tokenizer's size against its vocab_size) and names any mismatch in one line.

`trainer_state.pt` holds only tensors, numbers, strings, lists and dicts, and is read with
`torch.load(weights_only=True)`, so loading a checkpoint never runs code from the file.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from . import __version__
from .config import GPTConfig
from .errors import GPTSmallError
from .fileio import fsync_dir, strict_json, write_error

FORMAT_VERSION = 1
WEIGHTS, CONFIG, TOKENIZER, TRAINER_STATE = "model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt"


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights to save: the unwrapped model's, without the tied head's duplicate."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_embeddings", False):
        sd.pop("lm_head.weight", None)
    return sd


def save_checkpoint(run_dir: str | Path, *, step: int, model: torch.nn.Module, tokenizer: Any,
                    config: dict[str, Any], trainer_state: dict[str, Any] | None = None,
                    links: tuple[str, ...] = ("last",)) -> Path:
    """Write checkpoint `step` under run_dir/checkpoints atomically and point `links` at it."""
    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f"step-{step:06d}.tmp-{os.getpid()}"
    where = final  # what the user's message names: the checkpoint, not its temporary folder
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_root.glob("*.tmp-*"):  # left by a run killed mid-write (the run lock excludes a live writer)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        # Serialized in memory, then written by plain file writes: torch.save and safetensors
        # report a full disk as "unexpected pos" or a Rust error, a plain write as ENOSPC. The cost
        # is one transient copy of the weights and optimizer state in host memory.
        meta = {"format_version": FORMAT_VERSION, "gpt_small_version": __version__, "step": step, **config}
        files = {WEIGHTS: safetensors_bytes(model_state(model), metadata={"format_version": str(FORMAT_VERSION)}),
                 CONFIG: (strict_json(meta, indent=2) + "\n").encode()}
        if trainer_state is not None:
            buf = io.BytesIO()
            torch.save(trainer_state, buf)
            files[TRAINER_STATE] = buf.getvalue()
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        del files
        tokenizer.save(tmp)  # atomic_write: fsync'd
        fsync_dir(tmp)
        if final.exists():  # the same step saved twice (e.g. interval and end): replace it
            old = final.with_name(final.name + f".old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            _relink_all(run_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(ckpt_root)
        where = run_dir
        for name in links:
            _point(run_dir / name, Path("checkpoints") / final.name)
        fsync_dir(run_dir)
    except (OSError, GPTSmallError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise write_error(where, e) from None
        raise
    _prune(run_dir)
    return final


def _point(link: Path, target: Path) -> None:
    tmp_link = link.with_name(f".{link.name}.tmp-{os.getpid()}")  # not swept by save: overwritten here
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    tmp_link.symlink_to(target)
    os.replace(tmp_link, link)


def _relink_all(run_dir: Path) -> None:
    for name in ("last", "best"):
        link = run_dir / name
        if link.is_symlink():
            _point(link, Path(os.readlink(link)))


def _prune(run_dir: Path) -> None:
    keep = {(run_dir / n).resolve() for n in ("last", "best") if (run_dir / n).is_symlink()}
    for d in (run_dir / "checkpoints").glob("step-*"):
        if ".tmp-" not in d.name and d.resolve() not in keep:
            shutil.rmtree(d, ignore_errors=True)


def find_checkpoint(path: str | Path, prefer: str = "best") -> Path:
    """A checkpoint folder from a run folder (its `prefer` link, else the other) or a checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise GPTSmallError(f"checkpoint not found: {path}")
    if (path / CONFIG).is_file() and (path / WEIGHTS).is_file():
        return path
    for name in (prefer, "last" if prefer == "best" else "best"):
        if (path / name / CONFIG).is_file():
            return (path / name).resolve()
    raise GPTSmallError(f"{path} holds no checkpoint (no {CONFIG} and {WEIGHTS}, no last/ or best/)")


def read_checkpoint_config(ckpt: Path) -> dict[str, Any]:
    from .schemas import CheckpointConfig, read_json, validate

    meta = read_json(ckpt / CONFIG)
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise GPTSmallError(
            f"{ckpt} is a checkpoint of format {version!r}; this gpt-small {__version__} reads format {FORMAT_VERSION}"
        )
    validate(meta, CheckpointConfig, ckpt / CONFIG)
    return meta


@dataclass
class Checkpoint:
    path: Path
    meta: dict[str, Any]
    model: torch.nn.Module
    tokenizer: Any

    @property
    def model_config(self) -> GPTConfig:
        return self.model.config


def checkpoint_model_config(ckpt: Path, meta: dict[str, Any] | None = None) -> GPTConfig:
    """The GPTConfig a checkpoint folder was saved with (its config.json, read here unless given as
    `meta`); a one-line error if it is bad."""
    meta = read_checkpoint_config(ckpt) if meta is None else meta
    try:
        return GPTConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise GPTSmallError(f"{ckpt / CONFIG}: bad model config: {e}") from None


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu", prefer: str = "best") -> Checkpoint:
    """Load a model and its tokenizer; every problem is a one-line GPTSmallError."""
    from .model import GPT
    from .tokenizer import load_tokenizer

    ckpt = find_checkpoint(path, prefer)
    meta = read_checkpoint_config(ckpt)
    cfg = checkpoint_model_config(ckpt, meta)
    tokenizer = load_tokenizer(ckpt)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise GPTSmallError(f"{ckpt} disagrees with itself: {TOKENIZER} has {tokenizer.vocab_size} tokens, "
                            f"{CONFIG} says vocab_size {cfg.vocab_size}")
    from . import limits

    limits.check_fits(limits.model_bytes(cfg.num_params()), f"the model in {ckpt} ({cfg.num_params():,} parameters)")
    model = GPT(cfg)
    load_weights(model, ckpt)
    return Checkpoint(ckpt, meta, model.to(device), tokenizer)


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Load a checkpoint's safetensors weights into `model` in place (a tied head is re-tied)."""
    try:
        sd = load_file(str(ckpt / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise GPTSmallError(f"{ckpt / WEIGHTS} is unreadable or corrupt: {e}") from None
    if model.config.tie_embeddings and "transformer.wte.weight" in sd:
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    expected = model.state_dict()
    for name, tensor in sd.items():
        if name in expected and tuple(tensor.shape) != tuple(expected[name].shape):
            raise GPTSmallError(f"{ckpt} disagrees with itself: {name} has shape {tuple(tensor.shape)} in {WEIGHTS}, "
                                f"{CONFIG} implies {tuple(expected[name].shape)} (vocab_size {model.config.vocab_size}, "
                                f"block_size {model.config.block_size}, n_embd {model.config.n_embd})")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise GPTSmallError(f"{ckpt / WEIGHTS} does not match its config: missing {missing}, unexpected {unexpected}")


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    path = ckpt / TRAINER_STATE
    if not path.is_file():
        raise GPTSmallError(f"{ckpt} has no {TRAINER_STATE}: it cannot be resumed")
    import warnings

    try:
        with warnings.catch_warnings():  # torch warns about a foreign pickle on stderr before it refuses it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: any unpickling error
        from .errors import one_line

        raise GPTSmallError(f"{path} is unreadable or corrupt: {one_line(e)}") from None
