"""The main job, `make poem`: prepare eng-poem, train the CPU preset for a bounded time, write poems.

Run twice, it does the least work it can: prepared data is reused, a finished run is reused, and an
interrupted run is resumed from its last checkpoint (its time budget counts the time already spent).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from . import limits
from .distributed import print0
from .errors import GPTSmallError

PROMPTS = ("The sea", "O moon, ", "When I")


def default_minutes(device: str = "auto") -> float:
    """10 minutes on a CPU; 3 on a GPU (CUDA or MPS), which gets further in less time."""
    from .device import pick_device

    return 3.0 if pick_device(device).type in ("cuda", "mps") else 10.0


def recipe_for(device: str = "auto") -> tuple[str, str]:
    """(config file, run folder) of `make poem` for the device it would train on: the GPU recipe on
    CUDA or MPS, the CPU one elsewhere; `device` as TrainConfig.device names it."""
    from .device import pick_device

    kind = "gpu" if pick_device(device).type in ("cuda", "mps") else "cpu"
    return f"configs/poem-{kind}.toml", f"runs/poem-{kind}"


def device_line(device: str = "auto", dtype: str = "float32") -> str:
    """The one line that says where `make poem` trains and in which precision (TrainConfig's names)."""
    import torch

    from .device import pick_device, pick_dtype

    dev = pick_device(device)
    precision = str(pick_dtype(dtype, dev)).removeprefix("torch.")
    precision = "fp32" if precision == "float32" else f"{precision} autocast"
    if dev.type == "cuda":
        return f"device: cuda ({torch.cuda.get_device_name(dev)}), {precision}"
    if dev.type == "mps":
        return f"device: mps (Apple GPU), {precision}"
    return f"device: cpu ({torch.get_num_threads()} threads), {precision}"


def _device_set(sets: list[str] | None) -> str:
    """The device a `--set device=...` names, else auto."""
    return next((s.partition("=")[2] for s in reversed(sets or []) if s.startswith("device=")), "auto")


def _on_mps(sets: list[str] | None) -> bool:
    from .device import pick_device

    return pick_device(_device_set(sets)).type == "mps"


def ensure_data(data_dir: Path) -> None:
    from .data import prepare

    if (data_dir / "meta.json").is_file():
        print0(f"[1/3] prepared data: reusing {data_dir}")
        return
    print0(f"[1/3] preparing the built-in eng-poem corpus (char tokenizer) into {data_dir}")
    prepare(out=data_dir, corpus="eng-poem", tokenizer="char")


def ensure_model(data_dir: Path, run_dir: Path, config_file: str | None, minutes: float,
                 sets: list[str] | None = None) -> dict[str, Any] | None:
    """Train, resume or reuse; returns the training summary (None when an existing run is reused)."""
    from .device import configure_process
    from .loop import format_summary
    from .run import plan_run
    from .run_folder import run_progress
    from .train import Trainer

    resume = (run_dir / "last").exists()
    if resume:
        progress = run_progress(run_dir)
        if progress.finished:
            print0(f"[2/3] model: reusing the finished run {run_dir} ({progress.step:,} steps, "
                   f"{progress.elapsed / 60:.1f} min); delete that folder to train again")
            return None
        print0(f"[2/3] model: resuming {run_dir} from step {progress.step:,}")
    else:
        print0(f"[2/3] training {config_file} for {minutes:g} minutes into {run_dir}")
    # the same plan as `gpt-small train --config FILE --max-time M [--resume]`: a resumed run
    # keeps its model and optimizer, and its time budget counts the time already spent
    plan = plan_run(run_dir, data=data_dir, resume=resume, config_file=config_file, sets=sets,
                    train_overrides={"max_time": minutes * 60})
    configure_process(device=plan.train.device, threads=plan.train.threads)
    print0(device_line(plan.train.device, plan.train.dtype))
    with Trainer.from_plan(plan) as trainer:
        summary = trainer.fit()
    print0(format_summary(summary))
    if summary["stopped_by"] in ("SIGINT", "SIGTERM"):
        raise KeyboardInterrupt
    return summary


def write_poems(run_dir: Path, *, lines: int = 12, prompts: tuple[str, ...] = PROMPTS, seed: int = 7,
                temperature: float = limits.DEFAULT_TEMPERATURE) -> list[str]:
    from .checkpoint import load_checkpoint
    from .device import pick_device
    from .config import LINE_TOKEN_BUDGET
    from .generate import generate_text

    ckpt = load_checkpoint(run_dir, device=pick_device("auto"), prefer="best")
    print0(f"[3/3] three {lines}-line poems from {ckpt.path}\n")
    poems = []
    for i, prompt in enumerate(prompts):
        if ckpt.tokenizer.count_unknown(prompt):  # a model trained on other text than eng-poem
            print0(f"(the prompt {prompt!r} has characters this model never saw; starting from a new line)")
            prompt = ""
        print0(f"--- poem {i + 1} ---")
        sys.stdout.write(prompt)
        text = generate_text(ckpt.model, ckpt.tokenizer, prompt, lines=lines, max_new_tokens=LINE_TOKEN_BUDGET * lines,
                             temperature=temperature, seed=seed + i,
                             stream=lambda _, piece: (sys.stdout.write(piece), sys.stdout.flush()))[0]
        sys.stdout.write("\n" if not text.endswith("\n") else "")
        print0()
        poems.append(text)
    return poems


def make_poem(*, data_dir: str | Path, run_dir: str | Path | None, config_file: str | None,
              minutes: float | None = None, sets: list[str] | None = None) -> list[str]:
    """`config_file`/`run_dir` None: recipe_for's, for the device the run would take."""
    recipe, default_run = recipe_for(_device_set(sets))
    if config_file is None and not Path(recipe).is_file():
        raise GPTSmallError(f"no --config given and the default {recipe} is not in the current folder "
                            f"({Path.cwd()}); run from the gpt-small checkout or pass --config FILE")
    config_file = recipe if config_file is None else config_file
    data_dir, run_dir = Path(data_dir), Path(default_run if run_dir is None else run_dir)
    minutes = default_minutes(_device_set(sets)) if minutes is None else minutes
    ensure_data(data_dir)
    try:
        ensure_model(data_dir, run_dir, config_file, minutes, sets)
        poems = write_poems(run_dir)
    except NotImplementedError as e:  # what torch raises for an op without an MPS kernel
        if not _on_mps(sets):
            raise
        raise GPTSmallError(f"an op is missing on MPS ({str(e).splitlines()[0]}); run with "
                            "PYTORCH_ENABLE_MPS_FALLBACK=1 to run it on the CPU, or --set device=cpu") from None
    print0(f"The checkpoint is in {run_dir}. Write more with:\n"
           f"  gpt-small generate --checkpoint {run_dir} --lines 12 --prompt \"The night\"")
    return poems
