"""The trainer: a model, its optimizer, its data sampler, one step, evaluation, and a state dict
that makes resume exact.

`Trainer` owns everything that changes during a run: the model, the optimizer, the step, the data
sampler's position, the RNG states and the best validation loss. `state_dict()` gathers them into
plain tensors and numbers (saved as `trainer_state.pt`, read back with
`torch.load(weights_only=True)`), `load_state_dict()` puts them back, so 10 steps + resume + 10
steps equals 20 steps. One optimizer step = `grad_accum` micro-batches per process; under torchrun
the gradients are all-reduced once per step (DDP's `no_sync` on the other micro-batches). A NaN or
infinite loss stops before anything is saved, so the last good checkpoint stays.

What the run is comes from a `RunPlan` (run.py: fresh, resume or fine-tune, decided there);
where it is written is the `RunFolder`'s (run_folder.py: the lock, metrics, checkpoints' config,
summary, plot); the loop that calls `train_step`, evaluates, saves and stops is loop.py's
(`fit()` hands over to it). As in torchtitan, checkpointing and metrics sit beside the trainer,
not in it. A Trainer holds its folder's lock from construction to `close()`; `with Trainer(...)
as t:` closes it on every path.

Process-wide settings (CPU threads, the allocator, TF32) are not made here: the entry points call
`gpt_small.device.configure_process` once, before building a Trainer.
"""

from __future__ import annotations

import gc
import math
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import load_trainer_state, load_weights
from .config import GPTConfig, TrainConfig
from .data import BatchSampler, PreparedData, eval_windows
from .device import autocast, bf16_matmul_is_faster, pick_device, pick_dtype
from .distributed import DistInfo, all_reduce_mean, any_rank, setup_distributed
from .errors import GPTSmallError
from .evaluate import evaluate_tokens
from .model import GPT
from .optim import MuonWithAdamW, is_hidden_matrix
from .run import RunPlan, plan_run
from .run_folder import RunFolder

# A resumed rank > 0 reseeds its dropout stream with seed + rank + RESUME_SEED_STRIDE * step: a
# prime larger than any rank count, so no (rank, step) pair repeats another's seed.
RESUME_SEED_STRIDE = 1_000_003


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


class Trainer:
    """Trains `model_config` on `data` into `out_dir` with `train_config` (the Python API; the CLI
    builds a `RunPlan` and calls `Trainer.from_plan`). resume: continue the run in out_dir;
    init_from: a run or checkpoint folder whose weights replace the random init (fine-tuning).
    Both are checked by `plan_run`, the same rules as the CLI's.

    init_weights: called on a fresh model (never on a resumed one) after the trainer built it,
    before the optimizer sees it; the positional-encoding study gives every encoding the same
    starting weights this way. trackers: objects with log(record) and close() that also receive
    every metrics.jsonl record (interop/trackers.py).
    """

    def __init__(self, model_config: GPTConfig, train_config: TrainConfig, data: PreparedData | str | Path,
                 out_dir: str | Path, *, resume: bool = False, show_progress: bool = True,
                 init_weights: Callable[[GPT], None] | None = None, init_from: str | Path | None = None,
                 trackers: Sequence[Any] = ()):
        plan = plan_run(out_dir, data=data, model=model_config, train=train_config, resume=resume, init_from=init_from)
        self._open(plan, show_progress=show_progress, init_weights=init_weights, trackers=trackers)

    @classmethod
    def from_plan(cls, plan: RunPlan, *, show_progress: bool = True, init_weights: Callable[[GPT], None] | None = None,
                  trackers: Sequence[Any] = ()) -> "Trainer":
        trainer = cls.__new__(cls)
        trainer._open(plan, show_progress=show_progress, init_weights=init_weights, trackers=trackers)
        return trainer

    def _open(self, plan: RunPlan, *, show_progress: bool, init_weights: Callable[[GPT], None] | None,
              trackers: Sequence[Any]) -> None:
        self.plan = plan
        self.data, self.model_config, self.train_config, self.out_dir = plan.data, plan.model, plan.train, plan.out
        self.show_progress = show_progress
        self.init_weights = init_weights
        self.dist = DistInfo()
        self.forward_model: torch.nn.Module | None = None
        self.folder = RunFolder(plan, trackers=trackers).__enter__()  # the lock, held until close()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def resume_from(self) -> Path | None:
        return self.plan.resume_from

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
        if self.plan.init_from is not None:  # fine-tuning: the weights only; step, optimizer and schedule start afresh
            load_weights(self.model, self.plan.init_from)
        if self.init_weights is not None and self.resume_from is None:
            self.init_weights(self.model)
        torch.manual_seed(cfg.seed + self.dist.rank)
        random.seed(cfg.seed + self.dist.rank)
        np.random.seed((cfg.seed + self.dist.rank) % 2**32)
        self.optimizer = build_optimizer(self.model, cfg, fused=self.device.type in ("cuda", "cpu"),
                                         ns_dtype=torch.bfloat16 if bf16_faster else torch.float32)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.forward_model = torch.compile(self.model) if cfg.compile else self.model
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
        self.clock_start: float | None = None  # when this process's training began (loop.py starts it)
        self.warmup_progress = cfg.warmup_steps / self.step_limit
        self.finished = False
        self.lr = 0.0  # the learning rate of the last step
        self.saved_step = -1  # the step of this process's last save (a resumed run's checkpoint counts)
        if self.resume_from is not None:
            self.load_state_dict(load_trainer_state(self.resume_from))
            load_weights(self.model, self.resume_from)
            self.saved_step = self.step

    @property
    def step_limit(self) -> float:
        """max_steps, or infinity where max_steps is 0 (the time budget ends the run)."""
        return self.train_config.max_steps or math.inf

    @property
    def tokens_per_step(self) -> int:
        c = self.train_config
        return c.batch_size * c.grad_accum * self.model_config.block_size * self.dist.world_size

    def close(self) -> None:
        """Drop the DistributedDataParallel wrapper (and a compiled module), keeping the model; close
        the trackers and release the run folder."""
        if self.forward_model is not None:
            self.forward_model = self.model
            gc.collect()
        self.folder.close()

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
        return self.elapsed + (time.perf_counter() - self.clock_start if self.clock_start is not None else 0.0)

    def progress(self) -> float:
        p = self.step / self.step_limit
        if self.train_config.max_time:
            p = max(p, self.elapsed_total() / self.train_config.max_time)
        return min(p, 1.0)

    def save(self, *, best: bool = False) -> Path | None:
        """A checkpoint of this step in the run folder, `last` (and `best`) pointed at it; rank 0 only."""
        self.saved_step = self.step
        return self.folder.save(step=self.step, model=self.model, trainer_state=self.state_dict(),
                                best_val=self.best_val, finished=self.finished, elapsed=self.elapsed_total(),
                                best=best)

    def fit(self, stop_after: int | None = None) -> dict[str, Any]:
        """Set up, train until max_steps or max_time (loop.py), return the run's summary.

        stop_after: stop after this many steps of this call, as an interruption would (the
        checkpoint is resumable and the schedule stays that of the whole run).
        """
        from .loop import TrainLoop

        self.setup()
        return TrainLoop(self, stop_after).run()

    # ------------------------------------------------------------------ a step and evaluation

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
                                f"without saving; {self.folder.on_disk()} (try a lower lr or more warm-up)")
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.lr = lr
        return loss_value

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
