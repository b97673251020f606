"""PNG plots of training runs and of the positional-encoding study (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from .run_folder import read_metrics


def plot_run(metrics_path: str | Path, out_png: str | Path) -> None:
    """Training loss (every logged step) and validation loss (every evaluation) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]
    val = [(r["step"], r["val_loss"]) for r in rows if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train (batch)", alpha=0.6, lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation (fixed windows)", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(Path(metrics_path).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    from .fileio import atomic_write

    atomic_write(out_png, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def plot_compare(runs: dict[str, list[Path]], out_png: str | Path) -> None:
    """Validation loss against step and against wall time, one colour per label (the study's encodings).

    runs: label -> the metrics.jsonl of each seed. Every seed is a thin line; the thick line is the
    mean over seeds at the steps all of them evaluated (with a time budget they may stop apart).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110, sharey=True)
    for i, (label, paths) in enumerate(runs.items()):
        color = f"C{i}"
        curves = []  # per seed: {step: (elapsed, val_loss)}
        for path in paths:
            rows = {r["step"]: (r["elapsed"], r["val_loss"]) for r in read_metrics(path) if r["kind"] == "eval"}
            curves.append(rows)
            if len(paths) > 1:
                steps = sorted(rows)
                by_step.plot(steps, [rows[s][1] for s in steps], color=color, lw=0.7, alpha=0.35)
                by_time.plot([rows[s][0] for s in steps], [rows[s][1] for s in steps], color=color, lw=0.7, alpha=0.35)
        common = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not common:
            continue
        mean_loss = [sum(c[s][1] for c in curves) / len(curves) for s in common]
        mean_time = [sum(c[s][0] for c in curves) / len(curves) for s in common]
        name = f"{label} (mean of {len(curves)})" if len(curves) > 1 else label
        by_step.plot(common, mean_loss, "o-", color=color, lw=2, ms=3, label=name)
        by_time.plot(mean_time, mean_loss, "o-", color=color, lw=2, ms=3, label=name)
    by_step.set_xlabel("step")
    by_time.set_xlabel("wall time since the start of training (s)")
    by_step.set_ylabel("validation loss (nats per token)")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("validation loss (fixed windows) by positional encoding")
    fig.tight_layout()
    from .fileio import atomic_write

    atomic_write(out_png, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
