"""The training loop: `Trainer(...).fit()`, with explicit state so that resume is exact.

The trainer owns everything that changes during a run: the model, the AdamW optimizer, the step,
the data sampler's position, the RNG states and the best validation loss. `state_dict()` gathers
them into plain tensors and numbers (saved as `trainer_state.pt`, read back with
`torch.load(weights_only=True)`), `load_state_dict()` puts them back, so 10 steps + resume + 10
steps equals 20 steps.

One optimizer step = `grad_accum` micro-batches per process; under torchrun the gradients are
all-reduced once per step (DDP's `no_sync` on the other micro-batches). Rank 0 alone logs and
writes checkpoints. SIGINT/SIGTERM finish the current step, save, and stop; a NaN or infinite
loss stops before anything is saved, so the last good checkpoint stays.
"""

from __future__ import annotations

import gc
import json
import math
import random
import signal
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import find_checkpoint, load_trainer_state, load_weights, read_checkpoint_config, save_checkpoint
from .config import GPTConfig, TrainConfig
from .data import BatchSampler, PreparedData, eval_windows
from .device import autocast, bf16_matmul_is_faster, keep_freed_memory, pick_device, pick_dtype, set_threads
from .distributed import DistInfo, all_reduce_mean, broadcast_flag, print0, setup_distributed
from .errors import GPTSmallError
from .evaluate import bits_per_char, evaluate_tokens
from .model import GPT
from .optim import MuonWithAdamW, is_hidden_matrix
from .tokenizer import load_tokenizer, same_tokenizer


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


def _numpy_state() -> dict[str, Any]:
    """numpy's global MT19937 state as tensors and numbers (weights_only-loadable)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _set_numpy_state(s: dict[str, Any]) -> None:
    np.random.set_state(("MT19937", s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["gauss"]))


class Trainer:
    def __init__(self, model_config: GPTConfig, train_config: TrainConfig, data: PreparedData | str | Path,
                 out_dir: str | Path, *, resume: bool = False, show_progress: bool = True,
                 init_from: str | Path | None = None, trackers: Sequence[Any] = ()):
        """init_from: a checkpoint folder whose weights replace the random init (interop/finetune.py);
        trackers: objects with log(record) and close() that also receive every metrics.jsonl record
        (interop/trackers.py)."""
        self.data = data if isinstance(data, PreparedData) else PreparedData(data)
        self._init_from = Path(init_from) if init_from is not None else None
        self.trackers = list(trackers)
        self.out_dir = Path(out_dir)
        self.show_progress = show_progress
        self.dist = DistInfo()
        if resume:
            ckpt = find_checkpoint(self.out_dir, prefer="last")
            meta = read_checkpoint_config(ckpt)
            saved_model = GPTConfig.from_dict(meta["model"])
            if saved_model != model_config:
                diff = {k: (v, getattr(model_config, k)) for k, v in saved_model.to_dict().items()
                        if getattr(model_config, k) != v}
                raise GPTSmallError(f"--resume: the model differs from the checkpoint's ({diff}); "
                                    "leave the model flags as they were")
            saved_optimizer = meta.get("train", {}).get("optimizer", "adamw")
            if saved_optimizer != train_config.optimizer:
                raise GPTSmallError(f"--resume: the checkpoint was trained with optimizer={saved_optimizer}, "
                                    f"not {train_config.optimizer}; its optimizer state cannot be carried over")
            self._check_same_tokenizer(ckpt)
            self._resume_from = ckpt
        else:
            if (self.out_dir / "last").exists():
                raise GPTSmallError(f"{self.out_dir} already holds a run; pass --resume to continue it "
                                    "or choose another --out")
            self._resume_from = None
        if model_config.vocab_size != self.data.tokenizer.vocab_size:
            raise GPTSmallError(f"the model's vocab_size {model_config.vocab_size} differs from the data's "
                                f"tokenizer ({self.data.tokenizer.vocab_size})")
        self.model_config, self.config = model_config, train_config
        for split, arr in (("train", self.data.train), ("validation", self.data.val)):
            if len(arr) < model_config.block_size + 1:
                raise GPTSmallError(f"the {split} split has {len(arr)} tokens, fewer than one window of "
                                    f"block_size + 1 = {model_config.block_size + 1}; use a smaller "
                                    "block_size or more text")

    def _check_same_tokenizer(self, ckpt: Path) -> None:
        if not same_tokenizer(load_tokenizer(ckpt), self.data.tokenizer):
            raise GPTSmallError(f"--resume: the data in {self.data.directory} was prepared with another "
                                f"tokenizer than the checkpoint {ckpt}")

    # ------------------------------------------------------------------ set-up

    def setup(self) -> None:
        cfg = self.config
        self.device = pick_device(cfg.device)
        self.dist = setup_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if self.device.type == "cpu":
            set_threads(cfg.threads, self.dist.local_world_size)
            keep_freed_memory()
        # Asked only where a choice depends on it (a timed matmul on the CPU), and one answer on
        # every rank, as their own timings could differ (bf16 if any rank found it faster): the
        # autocast dtype and Muon's Newton-Schulz dtype must match across ranks.
        bf16_faster = ((cfg.dtype == "bfloat16-if-faster" or cfg.optimizer == "muon")
                       and broadcast_flag(bf16_matmul_is_faster(self.device), self.device))
        self.amp_dtype = pick_dtype(cfg.dtype, self.device, bf16_faster)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        # Same initial weights on every rank; each rank's dropout stream differs.
        torch.manual_seed(cfg.seed)
        self.model = GPT(self.model_config).to(self.device)
        if self._init_from is not None:  # fine-tuning: the weights only; step, optimizer and schedule start afresh
            load_weights(self.model, self._init_from)
        torch.manual_seed(cfg.seed + self.dist.rank)
        random.seed(cfg.seed + self.dist.rank)
        np.random.seed((cfg.seed + self.dist.rank) % 2**32)
        fused = self.device.type in ("cuda", "cpu")
        if cfg.optimizer == "muon":
            self.optimizer = MuonWithAdamW(
                [p for name, p in self.model.named_parameters() if is_hidden_matrix(name, p)],
                param_groups(self.model, cfg.weight_decay, head_lr_scale=cfg.head_lr_scale, skip=is_hidden_matrix),
                lr=cfg.lr, muon_lr=cfg.muon_lr, momentum=cfg.muon_momentum, betas=(cfg.beta1, cfg.beta2),
                fused=fused, ns_dtype=torch.bfloat16 if bf16_faster else torch.float32)
        else:
            groups = param_groups(self.model, cfg.weight_decay, head_lr_scale=cfg.head_lr_scale)
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.forward_model: torch.nn.Module = self.model
        if cfg.compile:
            self.forward_model = torch.compile(self.model)
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
        self.warmup_progress = cfg.warmup_steps / cfg.max_steps
        self.finished = False
        if self._resume_from is not None:
            self.load_state_dict(load_trainer_state(self._resume_from))

    @property
    def tokens_per_step(self) -> int:
        c = self.config
        return c.batch_size * c.grad_accum * self.model_config.block_size * self.dist.world_size

    def close(self) -> None:
        """Drop the DistributedDataParallel wrapper (and a compiled module), keeping the model."""
        if hasattr(self, "forward_model"):
            self.forward_model = self.model
            gc.collect()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        py_state = random.getstate()
        state = {
            "step": self.step,
            "best_val": self.best_val,
            "elapsed": self.elapsed_total(),
            "warmup_progress": self.warmup_progress,
            "finished": self.finished,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": {
                "python": [py_state[0], list(py_state[1]), py_state[2]],
                "numpy": _numpy_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.best_val = float(state["best_val"])
        self.elapsed = float(state["elapsed"])
        self.warmup_progress = float(state["warmup_progress"])
        self.finished = bool(state.get("finished", False))
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:  # parameter groups laid out otherwise (a checkpoint of an older gpt-small)
            raise GPTSmallError(f"--resume: the optimizer state in {self._resume_from} does not fit this "
                                f"version's parameter groups ({e}); start a new run") from None
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        rng = state["rng"]
        random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
        _set_numpy_state(rng["numpy"])
        if self.dist.rank == 0:
            torch.set_rng_state(rng["torch"])
        else:  # the checkpoint holds rank 0's stream; give this rank its own (dropout only)
            torch.manual_seed(self.config.seed + self.dist.rank + 1_000_003 * self.step)
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        load_weights(self.model, self._resume_from)

    def elapsed_total(self) -> float:
        return self.elapsed + (time.perf_counter() - self._t_start if hasattr(self, "_t_start") else 0.0)

    def progress(self) -> float:
        p = self.step / self.config.max_steps
        if self.config.max_time:
            p = max(p, self.elapsed_total() / self.config.max_time)
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
                               batch_size=max(8, self.config.batch_size), device=self.device,
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
        if not self.dist.is_main:
            return None
        links = ("last", "best") if best else ("last",)
        config = {"model": self.model_config.to_dict(), "train": self.config.to_dict(),
                  "data": {"directory": str(self.data.directory), "tokenizer": self.data.tokenizer.kind,
                           "chars_per_token": self.data.chars_per_token("val")},
                  "val_loss": None if math.isinf(self.best_val) else self.best_val}
        if self._init_from is not None:
            config["init_from"] = str(self._init_from)
        return save_checkpoint(self.out_dir, step=self.step, model=self.model, tokenizer=self.data.tokenizer,
                               config=config, trainer_state=self.state_dict(), links=links)

    def log(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            for tracker in self.trackers:
                tracker.log(record)

    def _trim_metrics(self) -> None:
        """On resume, drop log lines written after the checkpoint (they will be written again)."""
        path = self.out_dir / "metrics.jsonl"
        if self.dist.is_main and path.exists():
            keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= self.step]
            path.write_text("".join(line + "\n" for line in keep))

    # ------------------------------------------------------------------ the loop

    def _install_signal_handlers(self) -> dict:
        self._signal = None

        def handler(signum, frame):
            self._signal = signal.Signals(signum).name

        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return old

    def train_step(self) -> float:
        """One optimizer step over grad_accum micro-batches; returns the mean micro-batch loss."""
        cfg = self.config
        lr = lr_at(self.step, self.progress(), cfg, self.warmup_progress)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_ratio", 1.0)
        total = 0.0
        for micro in range(cfg.grad_accum):
            x, y = self.sampler.next_batch()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
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
                                f"without saving; the last good checkpoint is in {self.out_dir} "
                                "(try a lower lr or more warm-up)")
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._lr = lr
        return loss_value

    def fit(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train until max_steps or max_time; returns the run's summary.

        stop_after: stop after this many steps of this call, as an interruption would (the
        checkpoint is resumable and the schedule stays that of the whole run).
        """
        from tqdm import tqdm

        self.setup()
        cfg = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            run_config = {"model": self.model_config.to_dict(), "train": cfg.to_dict(),
                          "data": str(self.data.directory), "world_size": self.dist.world_size,
                          "device": str(self.device), "autocast": str(self.amp_dtype).removeprefix("torch.")}
            if self._init_from is not None:
                run_config["init_from"] = str(self._init_from)
            (self.out_dir / "run_config.json").write_text(json.dumps(run_config, indent=2) + "\n")
        if self._resume_from is not None:
            self._trim_metrics()
            print0(f"resuming {self.out_dir} at step {self.step}")
        old_handlers = self._install_signal_handlers()
        self._t_start = time.perf_counter()
        start_step = self.step
        # The bar follows progress(): the fraction of max_steps or of max_time, whichever is further,
        # so its time-left estimate is right for step and for wall-clock budgets alike.
        bar = tqdm(total=100, initial=int(self.progress() * 100), unit="%", dynamic_ncols=True,
                   bar_format="{l_bar}{bar}| {elapsed}<{remaining}{postfix}",
                   disable=not (self.show_progress and self.dist.is_main))
        stop_reason = "max_steps"
        last_saved_step = self.step if self._resume_from is not None else -1
        t_log, tokens_since_log = time.perf_counter(), 0
        try:
            while self.step < cfg.max_steps:
                loss = self.train_step()
                tokens_since_log += self.tokens_per_step
                bar.update(max(0, int(self.progress() * 100) - bar.n))
                if self.step % cfg.log_interval == 0 or self.step == 1:
                    now = time.perf_counter()
                    tps = tokens_since_log / (now - t_log)
                    t_log, tokens_since_log = now, 0
                    self.log({"kind": "train", "step": self.step, "loss": loss, "lr": self._lr,
                              "tokens": self.step * self.tokens_per_step, "elapsed": self.elapsed_total(),
                              "tokens_per_s": tps})
                    bar.set_postfix_str(f"step {self.step} loss {loss:.4f} lr {self._lr:.2e} {tps:,.0f} tok/s")
                out_of_time = bool(cfg.max_time) and self.elapsed_total() >= cfg.max_time
                paused = stop_after is not None and self.step - start_step >= stop_after
                stop = broadcast_flag(self._signal is not None or out_of_time or paused, self.device)
                done = stop or self.step >= cfg.max_steps
                if self.step % cfg.eval_interval == 0 or done:
                    val = self.evaluate()
                    improved = val < self.best_val
                    self.best_val = min(self.best_val, val)
                    cpt = self.data.chars_per_token("val")
                    self.log({"kind": "eval", "step": self.step, "val_loss": val,
                              "val_bpc": bits_per_char(val, cpt), "elapsed": self.elapsed_total()})
                    if self.dist.is_main:
                        bar.write(f"step {self.step}: val loss {val:.4f} ({bits_per_char(val, cpt):.3f} bits/char)")
                    if improved and not done:
                        self.save(best=True)
                        last_saved_step = self.step
                    if done:
                        self.finished = not (self._signal or paused)  # an interrupted run is not finished
                        self.save(best=improved)
                        last_saved_step = self.step
                elif self.step % cfg.checkpoint_interval == 0:
                    self.save()
                    last_saved_step = self.step
                if stop:
                    stop_reason = self._signal or ("stop_after" if paused else "max_time")
                    break
        finally:
            bar.close()
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
        if last_saved_step != self.step:
            self.finished = True
            self.save()
        wall = time.perf_counter() - self._t_start
        summary = {
            "out_dir": str(self.out_dir), "stopped_by": stop_reason, "steps": self.step,
            "steps_this_run": self.step - start_step, "tokens": self.step * self.tokens_per_step,
            "wall_seconds": wall, "tokens_per_s": (self.step - start_step) * self.tokens_per_step / max(wall, 1e-9),
            "best_val_loss": self.best_val, "best_val_bpc": bits_per_char(self.best_val, self.data.chars_per_token("val")),
            "checkpoint": str(self.out_dir / "last"),
        }
        if cfg.final_eval and stop_reason in ("max_steps", "max_time"):
            res = self.evaluate_full()
            summary["final_val"] = res.to_dict()
            self.log({"kind": "final_eval", "step": self.step, **res.to_dict()})
            best = self._evaluate_best_checkpoint()
            if best is not None:
                summary["best_checkpoint_val"] = best
                self.log({"kind": "final_eval_best", **best})
        if self.dist.is_main:
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            try:
                from .plots import plot_run

                plot_run(self.out_dir / "metrics.jsonl", self.out_dir / "curves.png")
                summary["plot"] = str(self.out_dir / "curves.png")
            except ImportError:
                pass
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
