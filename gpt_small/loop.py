"""The training loop around a `Trainer`: steps, the metrics lines, evaluations, checkpoints, stopping.

`TrainLoop(trainer).run()` is what `Trainer.fit()` runs: a short loop over named steps,
`train_step`, `log_step`, `stop_reason`, then `evaluate_and_save` or a save, and at the end
`finish` (the final checkpoint, the whole-split evaluations, the summary and the plot). Rank 0
alone logs and writes (the run folder knows which rank it is). SIGINT/SIGTERM finish the current
step, save, and stop; the stop reason is in the summary, and an interrupted run is not marked
finished, so `make poem` resumes it.
"""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING, Any

from .checkpoint import load_weights, read_checkpoint_config
from .distributed import any_rank, print0
from .evaluate import bits_per_char

if TYPE_CHECKING:
    from .train import Trainer

INTERRUPTS = ("SIGINT", "SIGTERM")  # the stop reasons that leave a run unfinished (also "stop_after")


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


class TrainLoop:
    """One call of `fit` on a set-up trainer. stop_after: stop after this many steps of this call."""

    def __init__(self, trainer: "Trainer", stop_after: int | None = None):
        self.t = trainer
        self.folder = trainer.folder
        self.stop_after = stop_after

    def run(self) -> dict[str, Any]:
        t = self.t
        self.start()
        stopped_by = "max_steps"
        with StopSignals() as self.signals, self.bar:
            while t.step < t.step_limit:
                loss = t.train_step()
                self.log_step(loss)
                stop = self.stop_reason()
                done = stop is not None or t.step >= t.step_limit
                if done or t.step % t.train_config.eval_interval == 0:
                    self.evaluate_and_save(done=done, interrupted=stop in (*INTERRUPTS, "stop_after"))
                elif t.train_config.checkpoint_interval and t.step % t.train_config.checkpoint_interval == 0:
                    t.save()
                if stop is not None:
                    stopped_by = stop
                    break
        return self.finish(stopped_by)

    def start(self) -> None:
        """Before the first step: the run folder, run_config.json, the clocks, the progress bar."""
        from tqdm import tqdm

        t = self.t
        self.folder.start(t.step, world_size=t.dist.world_size, device=str(t.device),
                          autocast=str(t.amp_dtype).removeprefix("torch."))
        if t.resume_from is not None:
            print0(f"resuming {t.out_dir} at step {t.step}")
        t.clock_start = time.perf_counter()
        self.start_step = t.step
        self.t_log, self.tokens_since_log = time.perf_counter(), 0
        # The bar follows progress(): the fraction of max_steps or of max_time, whichever is further,
        # so its time-left estimate is right for step and for wall-clock budgets alike.
        self.bar = tqdm(total=100, initial=int(t.progress() * 100), unit="%", dynamic_ncols=True,
                        bar_format="{l_bar}{bar}| {elapsed}<{remaining}{postfix}",
                        disable=not (t.show_progress and t.dist.is_main))

    def log_step(self, loss: float) -> None:
        """Advance the bar; every log_interval steps (and after the first), a metrics line."""
        t = self.t
        self.tokens_since_log += t.tokens_per_step
        self.bar.update(max(0, int(t.progress() * 100) - self.bar.n))
        if t.step % t.train_config.log_interval and t.step != 1:
            return
        now = time.perf_counter()
        tps = self.tokens_since_log / (now - self.t_log)
        self.t_log, self.tokens_since_log = now, 0
        self.folder.log({"kind": "train", "step": t.step, "loss": loss, "lr": t.lr,
                         "tokens": t.step * t.tokens_per_step, "elapsed": t.elapsed_total(), "tokens_per_s": tps})
        self.bar.set_postfix_str(f"step {t.step} loss {loss:.4f} lr {t.lr:.2e} {tps:,.0f} tok/s")

    def stop_reason(self) -> str | None:
        """Why to stop after this step (a signal, the time budget, stop_after), or None; every rank
        stops when any rank asks (the reason is this rank's own)."""
        t, cfg = self.t, self.t.train_config
        out_of_time = bool(cfg.max_time) and t.elapsed_total() >= cfg.max_time
        paused = self.stop_after is not None and t.step - self.start_step >= self.stop_after
        if not any_rank(self.signals.name is not None or out_of_time or paused, t.device):
            return None
        return self.signals.name or ("stop_after" if paused else "max_time")

    def evaluate_and_save(self, *, done: bool, interrupted: bool) -> None:
        """Interval evaluation: log it, save `best` on improvement; at the end, the final checkpoint."""
        t = self.t
        val = t.evaluate()
        improved = val < t.best_val
        t.best_val = min(t.best_val, val)
        bpc = bits_per_char(val, t.data.chars_per_token("val"))
        self.folder.log({"kind": "eval", "step": t.step, "val_loss": val, "val_bpc": bpc, "elapsed": t.elapsed_total()})
        if t.dist.is_main:
            self.bar.write(f"step {t.step}: val loss {val:.4f} ({bpc:.3f} bits/char)")
        if done:
            t.finished = not interrupted
            t.save(best=improved)
        elif improved:
            t.save(best=True)

    def finish(self, stopped_by: str) -> dict[str, Any]:
        """The last checkpoint if the loop did not save one, the whole-split evaluations, the summary
        and the plot; returns the summary."""
        t = self.t
        if t.saved_step != t.step:  # max_steps was already reached: nothing trained
            t.finished = True
            t.save()
        wall = time.perf_counter() - t.clock_start
        steps_this_run = t.step - self.start_step
        summary = {
            "out_dir": str(t.out_dir), "stopped_by": stopped_by, "steps": t.step,
            "steps_this_run": steps_this_run, "tokens": t.step * t.tokens_per_step,
            "wall_seconds": wall, "tokens_per_s": steps_this_run * t.tokens_per_step / max(wall, 1e-9),
            "best_val_loss": t.best_val,
            "best_val_bpc": bits_per_char(t.best_val, t.data.chars_per_token("val")),
            "checkpoint": str(t.out_dir / "last"),
        }
        if t.train_config.final_eval and stopped_by in ("max_steps", "max_time"):
            res = t.evaluate_full()
            summary["final_val"] = res.to_dict()
            self.folder.log({"kind": "final_eval", "step": t.step, **res.to_dict()})
            best = self.evaluate_best_checkpoint()
            if best is not None:
                summary["best_checkpoint_val"] = best
                self.folder.log({"kind": "final_eval_best", **best})
        self.folder.finish(summary)
        return summary

    def evaluate_best_checkpoint(self) -> dict[str, Any] | None:
        """The whole-split loss of the `best` checkpoint where it is not the last one (an
        overfitting run: `generate` and `eval` take `best` by default, so its figure is the one a
        user samples from). Chosen on the interval windows, which are part of this split. The
        final weights are put back afterwards. None where `best` is `last` or is not on this
        rank's disk (rank 0 writes checkpoints)."""
        t = self.t
        best, last = t.out_dir / "best", t.out_dir / "last"
        if not (t.dist.is_main and best.exists() and last.exists()) or best.resolve() == last.resolve():
            return None
        final = {k: v.detach().clone() for k, v in t.model.state_dict().items()}
        try:
            load_weights(t.model, best)
            res = t.evaluate_full()
        finally:
            t.model.load_state_dict(final)
        return {"step": read_checkpoint_config(best)["step"], "checkpoint": str(best), **res.to_dict()}


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
