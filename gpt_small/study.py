"""The positional-encoding study: one model per encoding, everything else identical, side by side.

`compare_encodings` trains a normal `Trainer` run per (encoding, seed) into `out_dir/<enc>-seed<S>/`
and writes `results.json`, `results.md` and `curves.png` beside them.

What is held equal, and how:
- configuration: only `pos_encoding` differs; the seed, data order (the sampler is seeded by the
  same seed), steps, schedule and budget are the same. `--max-time` is a budget *per model*, so a
  faster encoding takes more steps; `--max-steps` compares equal work.
- initial weights: `GPT.reset_parameters` draws in registration order, and the learned table is
  registered after the blocks but before an untied `lm_head`, so with untied embeddings the
  learned model's head would start from other numbers. Every run therefore copies its shared
  weights from a reference model without position parameters built from the same seed
  (`copy_shared_weights`, the Trainer's `init_weights` hook); only the learned table is the
  learned model's own. The reference is built under `fork_rng`, so the dropout stream the
  trainer seeds stays untouched.

Figures, per run: parameters, steps, tokens, training wall time, tokens/s, and the final loss
over the whole validation split (the trainer's `final_val`: non-overlapping windows of
block_size). Length extrapolation: the loss at 1x, 2x and 4x the training context on the first N
tokens of validation (N - 1 a multiple of the longest context, at most about
`extrapolation_tokens`; the same N for every encoding and context), non-overlapping windows, so
the average covers every position 0..context-1. Learned positions have no figure past their
table: "n/a" and the reason, never a number. With several seeds: mean, standard deviation
(n - 1) and every seed's value.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import limits
from .config import POS_ENCODINGS, ConfigError, GPTConfig, TrainConfig
from .data import PreparedData
from .errors import GPTSmallError
from .evaluate import evaluate_tokens
from .fileio import atomic_write, strict_json
from .model import GPT
from .train import Trainer

log = logging.getLogger(__name__)

EXTRAPOLATION_TOKENS = 16_384  # validation tokens scored at each context: seconds on a CPU for small models


def parse_encodings(encodings: str | Sequence[str]) -> list[str]:
    """'learned,rope' or ['learned', 'rope'] -> a checked list (known, distinct, not empty)."""
    if isinstance(encodings, str):
        names = [s.strip() for s in encodings.split(",")] if encodings.strip() else []
    else:
        names = list(encodings)
    if not names:
        raise GPTSmallError(f"give at least one positional encoding to compare ({', '.join(POS_ENCODINGS)})")
    for name in names:
        if name not in POS_ENCODINGS:
            raise GPTSmallError(f"unknown positional encoding {name!r}; choose from {', '.join(POS_ENCODINGS)}")
    for name in names:
        if names.count(name) > 1:
            raise GPTSmallError(f"positional encoding {name!r} is listed {names.count(name)} times")
    return names


# ---------------------------------------------------------------- identical initial weights

def _reference_config(config: GPTConfig) -> GPTConfig | None:
    """The same shape without position parameters (rope or sinusoidal, whichever the shape allows)."""
    for enc in ("rope", "sinusoidal"):
        try:
            return dataclasses.replace(config, pos_encoding=enc)
        except ConfigError:
            continue
    return None


def copy_shared_weights(model: GPT, seed: int) -> None:
    """Overwrite every parameter but the learned table with the reference model's draw for `seed`."""
    ref_config = _reference_config(model.config)
    if ref_config is None:  # odd head size and odd width: only learned positions exist for this shape
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ref = dict(GPT(ref_config).named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ref:
                p.copy_(ref[name])


# ---------------------------------------------------------------- length extrapolation

def extrapolation_plan(n_val: int, block_size: int, factors: Sequence[int], budget: int) -> tuple[int, dict[int, str]]:
    """(N tokens to score, {factor: why it cannot be measured}) for the val split of n_val tokens."""
    too_long = {f: f"the validation split ({n_val:,} tokens) is shorter than one window of {f * block_size} + 1"
                for f in factors if f * block_size > n_val - 1}
    fits = [f * block_size for f in factors if f not in too_long]
    if not fits:
        return 0, too_long
    longest = max(fits)
    windows = max(1, min(budget, n_val - 1) // longest)  # whole windows of the longest context
    return windows * longest + 1, too_long


def _measure_extrapolation(trainer: Trainer, data: PreparedData, factors: Sequence[int], n_tokens: int,
                           too_long: dict[int, str]) -> dict[str, dict[str, Any]]:
    cfg = trainer.model_config
    out = {}
    for f in factors:
        context = f * cfg.block_size
        row: dict[str, Any] = {"context": context, "loss": None, "bits_per_char": None, "reason": None}
        if cfg.pos_encoding == "learned" and f > 1:
            row["reason"] = f"learned positions end at block_size ({cfg.block_size})"
        elif f in too_long:
            row["reason"] = too_long[f]
        else:
            res = evaluate_tokens(trainer.model, data.val[:n_tokens], context=context, stride=context,
                                  batch_size=max(1, max(8, trainer.train_config.batch_size) // f),
                                  chars_per_token=data.chars_per_token("val"), device=trainer.device,
                                  autocast_dtype=trainer.amp_dtype)
            row["loss"], row["bits_per_char"] = res.loss, res.bits_per_char
        out[f"{f}x"] = row
    return out


# ---------------------------------------------------------------- the study

def _stat(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "values": values}


def compare_encodings(encodings: str | Sequence[str], *, model_config: GPTConfig, train_config: TrainConfig,
                      data: PreparedData | str | Path, out_dir: str | Path, seeds: int = 1,
                      extrapolation: Sequence[int] = (1, 2, 4), extrapolation_tokens: int = EXTRAPOLATION_TOKENS,
                      show_progress: bool = True) -> dict[str, Any]:
    """Train `seeds` runs per encoding (seeds train_config.seed, +1, ...) and write the comparison."""
    names = parse_encodings(encodings)
    limits.positive_int(seeds, "seeds", limits.MAX_NUM_SAMPLES)
    factors = sorted(set(extrapolation))
    if not factors or any(not isinstance(f, int) or f < 1 for f in factors):
        raise GPTSmallError(f"extrapolation factors must be positive integers, got {list(extrapolation)}")
    limits.positive_int(extrapolation_tokens, "extrapolation_tokens")
    data = data if isinstance(data, PreparedData) else PreparedData(data)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise GPTSmallError(f"{out_dir} already exists and is not empty; choose another --out")
    configs = {enc: dataclasses.replace(model_config, pos_encoding=enc) for enc in names}  # checks each shape now
    seed_list = [train_config.seed + i for i in range(seeds)]
    n_tokens, too_long = extrapolation_plan(len(data.val), model_config.block_size, factors, extrapolation_tokens)

    runs: dict[str, list[dict[str, Any]]] = {enc: [] for enc in names}
    total, done = len(names) * seeds, 0
    for seed in seed_list:  # seeds outside: an interrupted study still has every encoding of the first seeds
        for enc in names:
            done += 1
            run_dir = out_dir / f"{enc}-seed{seed}"
            log.info("[%d/%d] training %s, seed %d -> %s", done, total, enc, seed, run_dir)
            cfg = dataclasses.replace(train_config, seed=seed, final_eval=True)
            with Trainer(configs[enc], cfg, data, run_dir, show_progress=show_progress,
                         init_weights=lambda model, seed=seed: copy_shared_weights(model, seed)) as trainer:
                summary = trainer.fit()
                if summary["stopped_by"] in ("SIGINT", "SIGTERM"):
                    raise KeyboardInterrupt(f"{summary['stopped_by']} during {run_dir}")
                runs[enc].append(_run_row(trainer, summary, seed, run_dir, data, factors, n_tokens, too_long))

    per_encoding = {enc: _aggregate(rs) for enc, rs in runs.items()}
    results = {
        "study": "positional encodings", "encodings": names, "seeds": seed_list, "data": str(data.directory),
        "model": {k: v for k, v in model_config.to_dict().items() if k != "pos_encoding"},
        "train": train_config.to_dict(),
        "budget": _budget_text(train_config),
        "final_val": "the whole validation split, every token once, non-overlapping windows of block_size",
        "extrapolation": {
            "factors": factors, "contexts": [f * model_config.block_size for f in factors], "tokens": n_tokens,
            "rule": (f"the first {n_tokens:,} tokens of the validation split for every encoding and context "
                     "(tokens 1.. are scored), non-overlapping windows of the context; bits/char use the "
                     "split's chars/token"),
        },
        "results": per_encoding,
        "curves": str(out_dir / "curves.png"),
    }
    results["verdict"] = verdict(results)
    atomic_write(out_dir / "results.json", strict_json(results, indent=2) + "\n")
    atomic_write(out_dir / "results.md", results_markdown(results))
    from .plots import plot_compare

    plot_compare({enc: [Path(r["run_dir"]) / "metrics.jsonl" for r in rs] for enc, rs in runs.items()},
                 out_dir / "curves.png")
    return results


def _run_row(trainer: Trainer, summary: dict[str, Any], seed: int, run_dir: Path, data: PreparedData,
             factors: Sequence[int], n_tokens: int, too_long: dict[int, str]) -> dict[str, Any]:
    """One run's figures (and its extrapolation, measured on the trainer's final weights)."""
    return {
        "seed": seed, "run_dir": str(run_dir), "params": trainer.model.num_params(),
        "steps": summary["steps"], "tokens": summary["tokens"], "tokens_per_step": trainer.tokens_per_step,
        "wall_seconds": summary["wall_seconds"], "tokens_per_s": summary["tokens_per_s"],
        "stopped_by": summary["stopped_by"],
        "final_val_loss": summary["final_val"]["loss"], "final_val_bpc": summary["final_val"]["bits_per_char"],
        "final_val_tokens": summary["final_val"]["tokens"],
        "extrapolation": _measure_extrapolation(trainer, data, factors, n_tokens, too_long),
    }


def _budget_text(cfg: TrainConfig) -> str:
    if cfg.max_time:
        limit = f" (and at most {cfg.max_steps:,} steps)" if cfg.max_steps else ""
        return (f"max_time {cfg.max_time:g} s per model{limit}: faster encodings "
                "take more steps; use --max-steps to compare equal work")
    return f"max_steps {cfg.max_steps:,} per model (equal work for every encoding)"


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    agg: dict[str, Any] = {"params": runs[0]["params"], "runs": runs}
    for key in ("steps", "tokens", "wall_seconds", "tokens_per_s", "final_val_loss", "final_val_bpc"):
        agg[key] = _stat([r[key] for r in runs])
    agg["extrapolation"] = {}
    for label, first in runs[0]["extrapolation"].items():
        row = {"context": first["context"], "reason": first["reason"], "loss": None, "bits_per_char": None}
        if first["reason"] is None:
            row["loss"] = _stat([r["extrapolation"][label]["loss"] for r in runs])
            row["bits_per_char"] = _stat([r["extrapolation"][label]["bits_per_char"] for r in runs])
        agg["extrapolation"][label] = row
    return agg


# ---------------------------------------------------------------- words and tables

def verdict(results: dict[str, Any]) -> str:
    """One plain-words paragraph computed from the numbers."""
    res, n_seeds = results["results"], len(results["seeds"])
    ranked = sorted(res, key=lambda e: res[e]["final_val_loss"]["mean"])
    best = ranked[0]
    b = res[best]["final_val_loss"]
    if len(ranked) == 1:
        text = f"Only {best} was trained (validation loss {b['mean']:.4f}); there is nothing to compare it with."
    else:
        second = ranked[1]
        s = res[second]["final_val_loss"]
        gap = s["mean"] - b["mean"]
        text = (f"{best} has the lowest {'mean ' if n_seeds > 1 else ''}validation loss ({b['mean']:.4f} nats/token), "
                f"{gap:.4f} below {second} ({s['mean']:.4f}).")
        if n_seeds == 1:
            text += " With a single seed this gap cannot be told apart from seed noise; rerun with --seeds 3 or more."
        else:
            spread = max(b["std"], s["std"])
            if gap > 2 * spread:
                text += f" The gap is more than twice the larger seed standard deviation ({spread:.4f}): a real difference."
            else:
                text += (f" The gap is within twice the larger seed standard deviation ({spread:.4f}): "
                         f"{n_seeds} seeds cannot separate them.")
    longest = results["extrapolation"]["factors"][-1]
    if longest > 1:
        label = f"{longest}x"
        measured = {e: res[e]["extrapolation"][label]["loss"]["mean"] for e in res
                    if res[e]["extrapolation"][label]["loss"] is not None}
        if measured:
            top = min(measured, key=measured.get)
            one = res[top]["extrapolation"]["1x"]["loss"] if "1x" in res[top]["extrapolation"] else None
            change = f" (at 1x: {one['mean']:.4f})" if one else ""
            text += (f" At {label} the training context, {top} does best with {measured[top]:.4f}{change}"
                     + ("; " + ", ".join(f"{e} {v:.4f}" for e, v in measured.items() if e != top) if len(measured) > 1 else "")
                     + ".")
        missing = [e for e in res if res[e]["extrapolation"][label]["loss"] is None]
        if missing:
            text += f" No {label} figure for {', '.join(missing)}: {res[missing[0]]['extrapolation'][label]['reason']}."
    return text


def _fmt(stat: dict[str, Any] | None, digits: int = 4, thousands: bool = False) -> str:
    if stat is None:
        return "n/a"
    fmt = (lambda v: f"{v:,.0f}") if thousands else (lambda v: f"{v:.{digits}f}")
    if not stat["std"]:  # one seed, or every seed the same (steps under --max-steps)
        return fmt(stat["mean"])
    return f"{fmt(stat['mean'])} ± {fmt(stat['std'])}"


def results_markdown(results: dict[str, Any]) -> str:
    res, ex = results["results"], results["extrapolation"]
    seeds = results["seeds"]
    lines = [
        "# Positional encodings compared", "",
        f"Data: `{results['data']}`. Seeds: {', '.join(map(str, seeds))}"
        + (" (mean ± standard deviation over seeds)." if len(seeds) > 1 else " (a single seed)."),
        f"Budget: {results['budget']}.",
        f"Validation loss: {results['final_val']}.",
        f"Extrapolation: {ex['rule']}.", "",
    ]
    ex_cols = [f"loss {label} ({row['context']})" for label, row in next(iter(res.values()))["extrapolation"].items()]
    header = ["encoding", "params", "steps", "tokens", "wall s", "tokens/s", "val loss", "val bits/char", *ex_cols]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    reasons = {}
    for enc, r in res.items():
        cells = [enc, f"{r['params']:,}", _fmt(r["steps"], thousands=True), _fmt(r["tokens"], thousands=True),
                 _fmt(r["wall_seconds"], 1), _fmt(r["tokens_per_s"], thousands=True),
                 _fmt(r["final_val_loss"]), _fmt(r["final_val_bpc"])]
        for label, row in r["extrapolation"].items():
            cells.append(_fmt(row["loss"]))
            if row["reason"]:
                reasons[f"{enc} at {label}"] = row["reason"]
        lines.append("| " + " | ".join(cells) + " |")
    if reasons:
        lines += ["", "n/a: " + "; ".join(f"{k}: {v}" for k, v in reasons.items()) + "."]
    if len(seeds) > 1:
        lines += ["", "Every seed's validation loss: " + "; ".join(
            f"{enc} " + ", ".join(f"{v:.4f}" for v in r["final_val_loss"]["values"]) for enc, r in res.items()) + "."]
    lines += ["", f"**Verdict.** {results['verdict']}", "", "Curves: `curves.png` (validation loss against step and "
              "against wall time; thick line = mean over seeds).", ""]
    return "\n".join(lines)


def format_results(results: dict[str, Any]) -> str:
    """What `gpt-small compare` prints at the end."""
    out = Path(results["curves"]).parent
    rows = [f"{enc:<11} val loss {_fmt(r['final_val_loss'])}  bits/char {_fmt(r['final_val_bpc'])}  "
            + "  ".join(f"{label} {_fmt(row['loss'])}" for label, row in r["extrapolation"].items())
            for enc, r in results["results"].items()]
    return "\n".join([*rows, results["verdict"], f"results: {out / 'results.md'}, {out / 'results.json'}, "
                      f"{out / 'curves.png'}"])

