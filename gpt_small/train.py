"""The training loop: `Trainer(...).fit()`, with explicit state so that resume is exact.

The trainer owns everything that changes during a run: the model, the optimizer, the step, the
data sampler's position, the RNG states and the best validation loss. `state_dict()` gathers them
into plain tensors and numbers (saved as `trainer_state.pt`, read back with
`torch.load(weights_only=True)`), `load_state_dict()` puts them back, so 10 steps + resume + 10
steps equals 20 steps.

`fit()` is a short loop over named steps: `train_step`, `log_step`, `stop_reason`, then
`evaluate_and_save` or `save`, and at the end `finish`. One optimizer step = `grad_accum` micro-batches per
process; under torchrun the gradients are all-reduced once per step (DDP's `no_sync` on the other
micro-batches). Rank 0 alone logs and writes checkpoints. SIGINT/SIGTERM finish the current step,
save, and stop; a NaN or infinite loss stops before anything is saved, so the last good checkpoint
stays.

Process-wide settings (CPU threads, the allocator, TF32) are not made here: the entry points call
`gpt_small.device.configure_process` once, before building a Trainer.
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import signal
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import find_checkpoint, load_trainer_state, load_weights, read_checkpoint_config, save_checkpoint
from .config import GPTConfig, TrainConfig
from .data import BatchSampler, PreparedData, eval_windows
from .device import autocast, bf16_matmul_is_faster, pick_device, pick_dtype
from .distributed import DistInfo, all_reduce_mean, any_rank, print0, setup_distributed
from .errors import GPTSmallError
from .evaluate import bits_per_char, evaluate_tokens
from .fileio import FolderLock, append_line, atomic_write, strict_json
from .model import GPT
from .optim import MuonWithAdamW, is_hidden_matrix
from .tokenizer import load_tokenizer, same_tokenizer

# A resumed rank > 0 reseeds its dropout stream with seed + rank + RESUME_SEED_STRIDE * step: a
# prime larger than any rank count, so no (rank, step) pair repeats another's seed.
RESUME_SEED_STRIDE = 1_000_003
INTERRUPTS = ("SIGINT", "SIGTERM")  # the stop reasons that leave a run unfinished (also "stop_after")


def lr_at(step: int, progress: float, cfg: TrainConfig, warmup_progress: float = 0.0) -> float:
    """Learning rate for optimizer step `step` (0-based).

    Warm-up is counted in steps; the decay follows `progress` in [0, 1], the fraction of the run
    done (steps, or wall time when there is a time budget), rescaled to start where warm-up ended.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    q = min(1.0, max(0.0, (progress - warmup_progress) / max(1e-9, 1.0 - warmup_progress)))
    if cfg.schedule == "cosine":
        return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * q)) * (cfg.lr - cfg.min_lr)
    # wsd: warm-up, stable at lr, then a linear decay to min_lr over the last decay_frac
    stable = 1.0 - cfg.decay_frac
    if q <= stable:
        return cfg.lr
    return cfg.lr + (q - stable) / cfg.decay_frac * (cfg.min_lr - cfg.lr)


def param_groups(model: torch.nn.Module, weight_decay: float, *, head_lr_scale: float = 1.0,
                 skip: Callable[[str, torch.nn.Parameter], bool] = lambda name, p: False) -> list[dict[str, Any]]:
    """AdamW groups: decayed matrices, undecayed rest, and an untied head with its own learning rate.

    Decay Linear weights and token embeddings; never norms, biases, position tables or n-gram
    tables (most n-gram rows see a gradient a few times per run, so decay would fade what they
    learn between visits). An untied `lm_head` gets its own group whose `lr_ratio` scales the
    scheduled lr (tied to the embedding, it stays with the matrices). Parameters for which
    skip(name, p) is true belong to another optimizer.
    """
    decay, no_decay, head = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or skip(name, p):
            continue
        if name == "lm_head.weight":
            head.append(p)
        elif p.dim() >= 2 and "wpe" not in name and ".ngram." not in f".{name}":
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if head:
        groups.append({"params": head, "weight_decay": weight_decay, "lr_ratio": head_lr_scale})
    return groups


def rng_state() -> dict[str, Any]:
    """Python's, numpy's, torch's and CUDA's global RNG states as tensors and numbers
    (weights_only-loadable)."""
    py_state = random.getstate()
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(rng: dict[str, Any], *, rank: int, seed: int, step: int) -> None:
    """Put back rng_state(). The checkpoint holds rank 0's torch stream: another rank gets its own
    (it drives dropout only), seeded by rank and step."""
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    n = rng["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if rank == 0:
        torch.set_rng_state(rng["torch"])
    else:
        torch.manual_seed(seed + rank + RESUME_SEED_STRIDE * step)
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def build_optimizer(model: GPT, cfg: TrainConfig, *, fused: bool,
                    ns_dtype: torch.dtype) -> torch.optim.Optimizer | MuonWithAdamW:
    """AdamW over param_groups, or Muon for the blocks' matrices with AdamW for the rest."""
    if cfg.optimizer == "muon":
        return MuonWithAdamW(
            [p for name, p in model.named_parameters() if is_hidden_matrix(name, p)],
            param_groups(model, cfg.weight_decay, head_lr_scale=cfg.head_lr_scale, skip=is_hidden_matrix),
            lr=cfg.lr, muon_lr=cfg.muon_lr, momentum=cfg.muon_momentum, betas=(cfg.beta1, cfg.beta2),
            fused=fused, ns_dtype=ns_dtype)
    groups = param_groups(model, cfg.weight_decay, head_lr_scale=cfg.head_lr_scale)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def check_resumable(out_dir: Path, model_config: GPTConfig, train_config: TrainConfig, data: PreparedData) -> Path:
    """The `last` checkpoint of out_dir, checked against the tokenizer, model and optimizer asked for."""
    ckpt = find_checkpoint(out_dir, prefer="last")
    meta = read_checkpoint_config(ckpt)
    # The tokenizer first: another tokenizer also shows as another vocab_size.
    if not same_tokenizer(load_tokenizer(ckpt), data.tokenizer):
        raise GPTSmallError(f"--resume: the data in {data.directory} was prepared with another "
                            f"tokenizer than the checkpoint {ckpt}")
    saved_model = GPTConfig.from_dict(meta["model"])
    if saved_model != model_config:
        diff = "; ".join(f"{k} from {v!r} (the run's) to {getattr(model_config, k)!r}"
                         for k, v in saved_model.to_dict().items() if getattr(model_config, k) != v)
        raise GPTSmallError(f"--resume: the model config would change {diff}; resume with the run's "
                            "config (`gpt-small train --out RUN --resume` takes it from the run)")
    saved_optimizer = meta.get("train", {}).get("optimizer", "adamw")
    if saved_optimizer != train_config.optimizer:
        raise GPTSmallError(f"--resume: the checkpoint was trained with optimizer={saved_optimizer}, "
                            f"not {train_config.optimizer}; its optimizer state cannot be carried over")
    return ckpt


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


class StopSignals:
    """While entered, SIGINT and SIGTERM are noted in `.name` instead of stopping the process (the
    trainer finishes its step, saves and stops); the old handlers come back on exit."""

    def __enter__(self) -> "StopSignals":
        self.name: str | None = None
        self._old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._note)
            except ValueError:  # not the main thread
                pass
        return self

    def _note(self, signum, frame) -> None:
        self.name = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


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


def _holds_run(out_dir: Path) -> bool:
    """Whether a fresh run in `out_dir` could overwrite a run's work: a `last` or `best` link (a
    broken one too: its checkpoints may still be there) or any saved checkpoint."""
    if any((out_dir / name).is_symlink() or (out_dir / name).exists() for name in ("last", "best")):
        return True
    root = out_dir / "checkpoints"
    return root.is_dir() and any(p.name.startswith("step-") and ".tmp-" not in p.name for p in root.iterdir())


class Trainer:
    """Trains `model_config` on `data` into `out_dir` with `train_config`.

    init_weights: called on a fresh model (never on a resumed one) after the trainer built it,
    before the optimizer sees it; the positional-encoding study gives every encoding the same
    starting weights this way. init_from: a checkpoint folder whose weights replace the random init
    (fine-tuning, interop/finetune.py). trackers: objects with log(record) and close() that also
    receive every metrics.jsonl record (interop/trackers.py).
    """

    def __init__(self, model_config: GPTConfig, train_config: TrainConfig, data: PreparedData | str | Path,
                 out_dir: str | Path, *, resume: bool = False, show_progress: bool = True,
                 init_weights: Callable[[GPT], None] | None = None, init_from: str | Path | None = None,
                 trackers: Sequence[Any] = ()):
        self.data = data if isinstance(data, PreparedData) else PreparedData(data)
        self._init_from = Path(init_from) if init_from is not None else None
        self.trackers = list(trackers)
        self.out_dir = Path(out_dir)
        self.show_progress = show_progress
        self.init_weights = init_weights
        self.dist = DistInfo()
        self.model_config, self.train_config = model_config, train_config
        # One process per run folder for the trainer's life (rank 0 of a torchrun job: the others
        # write nothing); taken before the already-a-run check so two starts cannot both pass it.
        self._lock = FolderLock(self.out_dir, "--out")
        if os.environ.get("RANK", "0") == "0":
            self._lock.acquire()
        try:
            self._check_run(resume)
        except BaseException:
            self._lock.release()
            raise

    def _check_run(self, resume: bool) -> None:
        """Refuse a run that cannot start: a resume that changes the model, optimizer or tokenizer, a
        folder that holds another run, no way to end, data too short for one window."""
        model_config, train_config = self.model_config, self.train_config
        self.resume_from = check_resumable(self.out_dir, model_config, train_config, self.data) if resume else None
        if not resume and _holds_run(self.out_dir):
            raise GPTSmallError(f"{self.out_dir} already holds a run; pass --resume to continue it "
                                "or choose another --out")
        if not (train_config.max_steps or train_config.max_time):
            raise GPTSmallError("max_steps 0 (no step limit) needs a max_time (--max-time) to end the run")
        if model_config.vocab_size != self.data.tokenizer.vocab_size:
            raise GPTSmallError(f"the model's vocab_size {model_config.vocab_size} differs from the data's "
                                f"tokenizer ({self.data.tokenizer.vocab_size})")
        for split, arr in (("train", self.data.train), ("validation", self.data.val)):
            if len(arr) < model_config.block_size + 1:
                raise GPTSmallError(f"the {split} split has {len(arr)} tokens, fewer than one window of "
                                    f"block_size + 1 = {model_config.block_size + 1}; use a smaller "
                                    "block_size or more text")

    # ------------------------------------------------------------------ set-up

    def setup(self) -> None:
        """Device, process group, model, optimizer, sampler, evaluation windows; then the resumed state."""
        cfg = self.train_config
        self.device = pick_device(cfg.device)
        self.dist = setup_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        # Asked only where a choice depends on it (a timed matmul on the CPU), and one answer on
        # every rank, as their own timings could differ (bf16 if any rank found it faster): the
        # autocast dtype and Muon's Newton-Schulz dtype must match across ranks.
        bf16_faster = ((cfg.dtype == "bfloat16-if-faster" or cfg.optimizer == "muon")
                       and any_rank(bf16_matmul_is_faster(self.device), self.device))
        self.amp_dtype = pick_dtype(cfg.dtype, self.device, bf16_faster)
        # Same initial weights on every rank; each rank's dropout stream differs.
        torch.manual_seed(cfg.seed)
        self.model = GPT(self.model_config).to(self.device)
        if self._init_from is not None:  # fine-tuning: the weights only; step, optimizer and schedule start afresh
            load_weights(self.model, self._init_from)
        if self.init_weights is not None and self.resume_from is None:
            self.init_weights(self.model)
        torch.manual_seed(cfg.seed + self.dist.rank)
        random.seed(cfg.seed + self.dist.rank)
        np.random.seed((cfg.seed + self.dist.rank) % 2**32)
        self.optimizer = build_optimizer(self.model, cfg, fused=self.device.type in ("cuda", "cpu"),
                                         ns_dtype=torch.bfloat16 if bf16_faster else torch.float32)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.forward_model: torch.nn.Module = torch.compile(self.model) if cfg.compile else self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.forward_model = DDP(self.forward_model,
                                     device_ids=[self.dist.local_rank] if self.device.type == "cuda" else None)
        self.sampler = BatchSampler(self.data.train, batch_size=cfg.batch_size,
                                    block_size=self.model_config.block_size, seed=cfg.seed,
                                    rank=self.dist.rank, world_size=self.dist.world_size)
        self.eval_set = eval_windows(self.data.val, block_size=self.model_config.block_size,
                                     n_batches=cfg.eval_batches, batch_size=cfg.batch_size)
        self.step = 0
        self.best_val = float("inf")
        self.elapsed = 0.0  # training seconds before this process (resume)
        self.warmup_progress = cfg.warmup_steps / self.step_limit
        self.finished = False
        self.lr = 0.0  # the learning rate of the last step
        if self.resume_from is not None:
            self.load_state_dict(load_trainer_state(self.resume_from))
            load_weights(self.model, self.resume_from)

    @property
    def step_limit(self) -> float:
        """max_steps, or infinity where max_steps is 0 (the time budget ends the run)."""
        return self.train_config.max_steps or math.inf

    @property
    def tokens_per_step(self) -> int:
        c = self.train_config
        return c.batch_size * c.grad_accum * self.model_config.block_size * self.dist.world_size

    def close(self) -> None:
        """Drop the DistributedDataParallel wrapper (and a compiled module), keeping the model."""
        if hasattr(self, "forward_model"):
            self.forward_model = self.model
            gc.collect()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
        self._lock.release()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "best_val": self.best_val,
            "elapsed": self.elapsed_total(),
            "warmup_progress": self.warmup_progress,
            "finished": self.finished,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back a state_dict() (the weights travel apart, in model.safetensors)."""
        self.step = int(state["step"])
        self.best_val = float(state["best_val"])
        self.elapsed = float(state["elapsed"])
        self.warmup_progress = float(state["warmup_progress"])
        self.finished = bool(state.get("finished", False))
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:  # parameter groups laid out otherwise (a checkpoint of an older gpt-small)
            raise GPTSmallError(f"--resume: the optimizer state in {self.resume_from} does not fit this "
                                f"version's parameter groups ({e}); start a new run") from None
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"], rank=self.dist.rank, seed=self.train_config.seed, step=self.step)

    def elapsed_total(self) -> float:
        return self.elapsed + (time.perf_counter() - self._t_start if hasattr(self, "_t_start") else 0.0)

    def progress(self) -> float:
        p = self.step / self.step_limit
        if self.train_config.max_time:
            p = max(p, self.elapsed_total() / self.train_config.max_time)
        return min(p, 1.0)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss on the fixed validation windows (the same windows at every evaluation)."""
        self.model.eval()
        losses = []
        for x, y in self.eval_set:
            x, y = x.to(self.device), y.to(self.device)
            with autocast(self.device, self.amp_dtype):
                _, loss = self.model(x, y)
            losses.append(loss.item())
        self.model.train()
        return all_reduce_mean(float(np.mean(losses)), self.device)

    def evaluate_full(self):
        """Loss on the whole validation split, every token predicted once (non-overlapping windows),
        without autocast whatever the training dtype: the run's headline figure compares across
        dtypes (on CUDA the trainer's TF32 matmuls stay on)."""
        return evaluate_tokens(self.model, self.data.val, context=self.model_config.block_size,
                               batch_size=max(8, self.train_config.batch_size), device=self.device,
                               chars_per_token=self.data.chars_per_token("val"), autocast_dtype=torch.float32)

    def _evaluate_best_checkpoint(self) -> dict[str, Any] | None:
        """The whole-split loss of the `best` checkpoint where it is not the last one (an
        overfitting run: `generate` and `eval` take `best` by default, so its figure is the one a
        user samples from). Chosen on the interval windows, which are part of this split. The
        final weights are put back afterwards. None where `best` is `last` or is not on this
        rank's disk (rank 0 writes checkpoints)."""
        best, last = self.out_dir / "best", self.out_dir / "last"
        if not (self.dist.is_main and best.exists() and last.exists()) or best.resolve() == last.resolve():
            return None
        final = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        try:
            load_weights(self.model, best)
            res = self.evaluate_full()
        finally:
            self.model.load_state_dict(final)
        return {"step": read_checkpoint_config(best)["step"], "checkpoint": str(best), **res.to_dict()}

    # ------------------------------------------------------------------ checkpoints and logs

    def save(self, *, best: bool = False) -> Path | None:
        """A checkpoint of this step, `last` (and `best`) pointed at it; rank 0 only."""
        self._last_saved_step = self.step
        if not self.dist.is_main:
            return None
        links = ("last", "best") if best else ("last",)
        config = {"model": self.model_config.to_dict(), "train": self.train_config.to_dict(),
                  "data": {"directory": str(self.data.directory), "tokenizer": self.data.tokenizer.kind,
                           "chars_per_token": self.data.chars_per_token("val")},
                  "val_loss": None if math.isinf(self.best_val) else self.best_val,
                  "progress": {"finished": self.finished, "elapsed": self.elapsed_total()}}
        if self._init_from is not None:
            config["init_from"] = str(self._init_from)
        return save_checkpoint(self.out_dir, step=self.step, model=self.model, tokenizer=self.data.tokenizer,
                               config=config, trainer_state=self.state_dict(), links=links)

    def log(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            append_line(self.out_dir / "metrics.jsonl", strict_json(record))
            for tracker in self.trackers:
                tracker.log(record)

    # ------------------------------------------------------------------ the loop

    def fit(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train until max_steps or max_time; returns the run's summary.

        stop_after: stop after this many steps of this call, as an interruption would (the
        checkpoint is resumable and the schedule stays that of the whole run).
        """
        self.setup()
        self.start(stop_after)
        stopped_by = "max_steps"
        with StopSignals() as self.signals, self._bar:
            while self.step < self.step_limit:
                loss = self.train_step()
                self.log_step(loss)
                stop = self.stop_reason()
                done = stop is not None or self.step >= self.step_limit
                if done or self.step % self.train_config.eval_interval == 0:
                    self.evaluate_and_save(done=done, interrupted=stop in (*INTERRUPTS, "stop_after"))
                elif self.train_config.checkpoint_interval and self.step % self.train_config.checkpoint_interval == 0:
                    self.save()
                if stop is not None:
                    stopped_by = stop
                    break
        return self.finish(stopped_by)

    def start(self, stop_after: int | None = None) -> None:
        """Before the first step: the run folder, run_config.json, the clocks, the progress bar."""
        from tqdm import tqdm

        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            run_config = {"model": self.model_config.to_dict(), "train": self.train_config.to_dict(),
                          "data": str(self.data.directory), "world_size": self.dist.world_size,
                          "device": str(self.device), "autocast": str(self.amp_dtype).removeprefix("torch.")}
            if self._init_from is not None:
                run_config["init_from"] = str(self._init_from)
            atomic_write(self.out_dir / "run_config.json", strict_json(run_config, indent=2) + "\n")
        if self.dist.is_main:
            trim_metrics(self.out_dir / "metrics.jsonl", self.step)
        if self.resume_from is not None:
            print0(f"resuming {self.out_dir} at step {self.step}")
        self._t_start = time.perf_counter()
        self._start_step = self.step
        self._stop_after = stop_after
        self._last_saved_step = self.step if self.resume_from is not None else -1
        self._t_log, self._tokens_since_log = time.perf_counter(), 0
        # The bar follows progress(): the fraction of max_steps or of max_time, whichever is further,
        # so its time-left estimate is right for step and for wall-clock budgets alike.
        self._bar = tqdm(total=100, initial=int(self.progress() * 100), unit="%", dynamic_ncols=True,
                         bar_format="{l_bar}{bar}| {elapsed}<{remaining}{postfix}",
                         disable=not (self.show_progress and self.dist.is_main))

    def train_step(self) -> float:
        """One optimizer step over grad_accum micro-batches; returns the mean micro-batch loss."""
        cfg = self.train_config
        lr = lr_at(self.step, self.progress(), cfg, self.warmup_progress)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_ratio", 1.0)
        total = 0.0
        for micro in range(cfg.grad_accum):
            x, y = self.sampler.next_batch(self.device)
            last = micro == cfg.grad_accum - 1
            sync = nullcontext() if last or not self.dist.enabled else self.forward_model.no_sync()
            with sync, autocast(self.device, self.amp_dtype):
                _, loss = self.forward_model(x, y)
                self.scaler.scale(loss / cfg.grad_accum).backward()
            total += loss.item()
        loss_value = total / cfg.grad_accum
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            raise GPTSmallError(f"the loss became {loss_value} at step {self.step + 1} (lr {lr:.3g}); stopped "
                                f"without saving; {self._on_disk()} (try a lower lr or more warm-up)")
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.lr = lr
        return loss_value

    def _on_disk(self) -> str:
        """What a stopped run leaves: the step of its last checkpoint, or that there is none."""
        last = self.out_dir / "last"
        if not last.exists():
            return f"no checkpoint was saved in {self.out_dir}"
        return f"the last good checkpoint is step {read_checkpoint_config(last.resolve())['step']} in {last}"

    def log_step(self, loss: float) -> None:
        """Advance the bar; every log_interval steps (and after the first), a metrics line."""
        self._tokens_since_log += self.tokens_per_step
        self._bar.update(max(0, int(self.progress() * 100) - self._bar.n))
        if self.step % self.train_config.log_interval and self.step != 1:
            return
        now = time.perf_counter()
        tps = self._tokens_since_log / (now - self._t_log)
        self._t_log, self._tokens_since_log = now, 0
        self.log({"kind": "train", "step": self.step, "loss": loss, "lr": self.lr,
                  "tokens": self.step * self.tokens_per_step, "elapsed": self.elapsed_total(), "tokens_per_s": tps})
        self._bar.set_postfix_str(f"step {self.step} loss {loss:.4f} lr {self.lr:.2e} {tps:,.0f} tok/s")

    def stop_reason(self) -> str | None:
        """Why to stop after this step (a signal, the time budget, stop_after), or None; every rank
        stops when any rank asks (the reason is this rank's own)."""
        cfg = self.train_config
        out_of_time = bool(cfg.max_time) and self.elapsed_total() >= cfg.max_time
        paused = self._stop_after is not None and self.step - self._start_step >= self._stop_after
        if not any_rank(self.signals.name is not None or out_of_time or paused, self.device):
            return None
        return self.signals.name or ("stop_after" if paused else "max_time")

    def evaluate_and_save(self, *, done: bool, interrupted: bool) -> None:
        """Interval evaluation: log it, save `best` on improvement; at the end, the final checkpoint."""
        val = self.evaluate()
        improved = val < self.best_val
        self.best_val = min(self.best_val, val)
        bpc = bits_per_char(val, self.data.chars_per_token("val"))
        self.log({"kind": "eval", "step": self.step, "val_loss": val, "val_bpc": bpc, "elapsed": self.elapsed_total()})
        if self.dist.is_main:
            self._bar.write(f"step {self.step}: val loss {val:.4f} ({bpc:.3f} bits/char)")
        if done:
            self.finished = not interrupted
            self.save(best=improved)
        elif improved:
            self.save(best=True)

    def finish(self, stopped_by: str) -> dict[str, Any]:
        """The last checkpoint if the loop did not save one, the whole-split evaluations, the summary
        and the plot; returns the summary."""
        if self._last_saved_step != self.step:  # max_steps was already reached: nothing trained
            self.finished = True
            self.save()
        wall = time.perf_counter() - self._t_start
        steps_this_run = self.step - self._start_step
        summary = {
            "out_dir": str(self.out_dir), "stopped_by": stopped_by, "steps": self.step,
            "steps_this_run": steps_this_run, "tokens": self.step * self.tokens_per_step,
            "wall_seconds": wall, "tokens_per_s": steps_this_run * self.tokens_per_step / max(wall, 1e-9),
            "best_val_loss": self.best_val,
            "best_val_bpc": bits_per_char(self.best_val, self.data.chars_per_token("val")),
            "checkpoint": str(self.out_dir / "last"),
        }
        if self.train_config.final_eval and stopped_by in ("max_steps", "max_time"):
            res = self.evaluate_full()
            summary["final_val"] = res.to_dict()
            self.log({"kind": "final_eval", "step": self.step, **res.to_dict()})
            best = self._evaluate_best_checkpoint()
            if best is not None:
                summary["best_checkpoint_val"] = best
                self.log({"kind": "final_eval_best", **best})
        if self.dist.is_main:
            from .plots import plot_run

            atomic_write(self.out_dir / "summary.json", strict_json(summary, indent=2) + "\n")
            plot_run(self.out_dir / "metrics.jsonl", self.out_dir / "curves.png")
            summary["plot"] = str(self.out_dir / "curves.png")
        return summary


def format_summary(s: dict[str, Any]) -> str:
    """The one-paragraph summary printed at the end of `gpt-small train`."""
    text = (f"Trained {s['steps']:,} steps ({s['steps_this_run']:,} in this run, {s['tokens']:,} tokens in all) "
            f"in {s['wall_seconds']:.0f} s at {s['tokens_per_s']:,.0f} tokens/s; stopped by {s['stopped_by']}. "
            f"Best interval validation loss {s['best_val_loss']:.4f} nats/token ({s['best_val_bpc']:.3f} bits/char).")
    if "final_val" in s:
        f = s["final_val"]
        text += (f" Whole validation split: {f['loss']:.4f} nats/token, perplexity {f['perplexity']:.2f}, "
                 f"{f['bits_per_char']:.3f} bits/char over {f['tokens']:,} tokens.")
    if "best_checkpoint_val" in s:
        b = s["best_checkpoint_val"]
        text += (f" The best checkpoint (step {b['step']:,}, what generate and eval load by default) on the "
                 f"whole split: {b['loss']:.4f} nats/token, {b['bits_per_char']:.3f} bits/char.")
    text += f" Checkpoint: {s['checkpoint']}"
    if "plot" in s:
        text += f"; curves: {s['plot']}"
    return text + "."
