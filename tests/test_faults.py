"""Faults as a user meets them: Ctrl-C/SIGTERM then the printed `continue with:` line, kill -9 at
random moments, two processes on one folder, a full disk, a read-only folder.

Real parts only: real processes and signals, the real flock, a real tmpfs (mounted where the test
may mount one: root on Linux; skipped otherwise).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt_small.checkpoint import find_checkpoint, load_checkpoint, load_trainer_state
from gpt_small.cli import main
from gpt_small.data import PreparedData, prepare
from disk_util import tmpfs  # noqa: E402

VENV_BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gpt_small", *args]


def _wait_for(predicate, timeout: float = 120.0, every: float = 0.05) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError("timed out")
        time.sleep(every)


def _step(run: Path) -> int:
    return load_trainer_state(find_checkpoint(run, "last"))["step"]


def _logged_step(run: Path) -> int:
    """The last training step in the run's metrics.jsonl (0 if none; a line cut short is skipped)."""
    path, last = run / "metrics.jsonl", 0
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                record = json.loads(line)
                if record["kind"] == "train":
                    last = record["step"]
    return last


# ---------------------------------------------------------------- the printed continue line

@pytest.mark.slow
def test_the_printed_continue_line_works_verbatim(verse_data, tmp_path):
    run = tmp_path / "my run"  # a space: the printed line must quote it
    long = ["--preset", "poem-cpu", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32",
            "--ngram-buckets", "1024", "--batch-size", "4", "--max-steps", "100000", "--eval-interval", "100000", "--log-interval", "1",
            "--checkpoint-interval", "100000", "--no-progress", "--threads", "1", "--lr", "3e-3"]
    proc = subprocess.Popen(_cli("train", "--data", str(verse_data), "--out", str(run), *long), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (run / "metrics.jsonl").exists())
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    line = out.strip().splitlines()[-1]
    assert "continue with: " in line
    command = line.split("continue with: ", 1)[1]
    first = _step(run)

    # the line as printed, through a shell, with `gpt-small` found on PATH: it resumes (no model
    # flag repeated), and is stopped again the same way
    proc = subprocess.Popen(command, shell=True, executable="/bin/bash", env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: len((run / "metrics.jsonl").read_text().splitlines()) > first + 1)
    proc.send_signal(signal.SIGTERM)  # bash -c execs a single simple command: this is gpt-small
    out2, err2 = proc.communicate(timeout=120)
    assert proc.returncode == 143, err2
    assert f"resuming {run} at step {first}" in out2
    assert _step(run) > first
    cfg = json.loads((run / "last" / "config.json").read_text())
    assert (cfg["model"]["n_layer"], cfg["model"]["n_embd"], cfg["model"]["ngram"]) == (1, 32, 6)

    # what may change mid-run does: a new budget ends the run
    target = _step(run) + 2
    done = subprocess.run(shlex.split(command) + ["--max-steps", str(target)], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert _step(run) == target


# ---------------------------------------------------------------- kill -9 at random moments

KILLS = 20


def _train_in_child(argv: list[str]) -> int:
    """fork: the child runs `gpt-small train` in-process (no interpreter start, so 20 kills fit in
    seconds), its output discarded; returns the child's pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os._exit(main(argv))
        except BaseException:
            os._exit(99)
    return pid


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_equals_an_uninterrupted_run(verse_data, tmp_path, capsys):
    # Big n-gram tables make each checkpoint tens of MB while a step stays cheap (lookups), so a
    # good share of the run is spent inside checkpoint writes, where half the kills are aimed.
    flags = ["--data", str(verse_data), "--preset", "tiny", "--block-size", "16", "--batch-size", "4",
             "--ngram", "2", "--ngram-buckets", "60000", "--max-steps", "80", "--warmup-steps", "5",
             "--checkpoint-interval", "2", "--eval-interval", "10", "--eval-batches", "1", "--log-interval", "1",
             "--threads", "1", "--final-eval", "false", "--no-progress", "--dropout", "0.1"]
    assert main(["train", "--out", str(tmp_path / "straight"), *flags]) == 0

    run, rng = tmp_path / "killed", random.Random(1234)
    kills, inside_write, finished = 0, 0, False
    while kills < KILLS and not finished:
        resume = (run / "last").exists()
        pid = _train_in_child(["train", "--out", str(run), *(["--resume"] if resume else flags)])
        if kills % 2 == 0:  # aim at a checkpoint write: wait for a temporary folder to appear
            deadline = time.time() + 30
            while time.time() < deadline and not list((run / "checkpoints").glob("*.tmp-*")):
                if os.waitpid(pid, os.WNOHANG) != (0, 0):
                    finished = True
                    break
                time.sleep(0.0005)
            time.sleep(rng.uniform(0, 0.01))
        else:  # a random moment once this child trains: a few steps in, at most, whatever the CPU's speed
            start = _logged_step(run)
            deadline = time.time() + 30
            while time.time() < deadline and _logged_step(run) <= start:
                if os.waitpid(pid, os.WNOHANG) != (0, 0):
                    finished = True
                    break
                time.sleep(0.0005)
            time.sleep(rng.uniform(0, 0.02))
        if finished:
            break
        inside_write += bool(list((run / "checkpoints").glob("*.tmp-*")))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            kills += 1
            if (run / "last").exists():  # the last complete checkpoint loads, every time
                load_checkpoint(run, prefer="last")
        else:
            finished = True
    assert kills == KILLS, f"the run finished after {kills} kills; give it more steps"
    assert inside_write >= 3, inside_write
    if not finished:
        assert main(["train", "--out", str(run), "--resume"]) == 0, capsys.readouterr().err
    assert _step(run) == 80
    a = load_file(str(find_checkpoint(tmp_path / "straight", "last") / "model.safetensors"))
    b = load_file(str(find_checkpoint(run, "last") / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert not list((run / "checkpoints").glob("*.tmp-*"))
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 81))  # the log was trimmed back to each resumed checkpoint


# ---------------------------------------------------------------- two processes, one folder

HOLD = """
import sys, time
from gpt_small.fileio import FolderLock
with FolderLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


@contextlib.contextmanager
def _holder(folder: Path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_a_second_train_into_the_same_folder_exits_2_naming_the_holder(verse_data, tmp_path, capsys):
    run = tmp_path / "run"
    with _holder(run) as pid:
        code = main(["train", "--data", str(verse_data), "--out", str(run), "--preset", "tiny", "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2
        assert f"{run} is in use by another gpt-small process (pid {pid})" in err and err.count("\n") == 1
    # killed (-9) holder: the kernel released its lock, the folder is usable at once
    assert main(["train", "--data", str(verse_data), "--out", str(run), "--preset", "tiny", "--block-size", "16",
                 "--max-steps", "2", "--final-eval", "false", "--no-progress"]) == 0


def test_a_second_prepare_into_the_same_folder_exits_2_naming_the_holder(poem_file, tmp_path, capsys):
    out = tmp_path / "data"
    with _holder(out) as pid:
        code = main(["prepare", "--text", str(poem_file), "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and f"(pid {pid})" in err and err.count("\n") == 1
    assert main(["prepare", "--text", str(poem_file), "--out", str(out)]) == 0


@pytest.mark.slow
def test_two_real_trains_at_once_one_wins(verse_data, tmp_path):
    run = tmp_path / "run"
    # the first is given far more steps than it needs while the second starts (on a loaded machine
    # a short one could end first), and is stopped with Ctrl-C once the second has been refused
    args = ["train", "--data", str(verse_data), "--out", str(run), "--preset", "tiny", "--block-size", "16",
            "--max-steps", "100000", "--eval-interval", "100", "--final-eval", "false", "--no-progress",
            "--threads", "1"]
    first = subprocess.Popen(_cli(*args), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (run / "metrics.jsonl").exists())
    second = subprocess.run(_cli(*args), env=_env(), capture_output=True, text=True, timeout=120)
    assert first.poll() is None  # still training while the second was refused
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=300)
    assert second.returncode == 2 and f"(pid {first.pid})" in second.stderr, second.stderr
    assert first.returncode == 130  # stopped by Ctrl-C, its checkpoint saved
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == sorted(set(steps))  # one writer's log


# ---------------------------------------------------------------- full disk, read-only folder

def _leftovers(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name)


def test_prepare_on_a_full_disk_gives_one_line_and_keeps_the_old_data(tmp_path, verse, capsys):
    (tmp_path / "small.txt").write_text(verse(100))
    (tmp_path / "big.txt").write_text(verse(40_000))  # ~1.6 MB of text: 1.6M uint16 tokens won't fit
    with tmpfs(tmp_path / "disk", "size=1m") as disk:
        assert main(["prepare", "--text", str(tmp_path / "small.txt"), "--out", str(disk / "data")]) == 0
        old = PreparedData(disk / "data").meta["source_sha256"]
        capsys.readouterr()
        code = main(["prepare", "--text", str(tmp_path / "big.txt"), "--out", str(disk / "data"), "--force"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert "no space left on device" in err and str(disk / "data") in err
        assert _leftovers(disk) == []
        assert PreparedData(disk / "data").meta["source_sha256"] == old


def test_train_on_a_full_disk_gives_one_line_and_keeps_the_last_checkpoint(verse_data, tmp_path, capsys):
    # room for about two checkpoints of this model (~0.9 MB each with optimizer state): the third write fails
    flags = ["--data", str(verse_data), "--preset", "tiny", "--block-size", "16", "--n-embd", "64",
             "--max-steps", "40", "--checkpoint-interval", "2", "--eval-interval", "1000", "--final-eval", "false",
             "--no-progress", "--threads", "1"]
    with tmpfs(tmp_path / "disk", "size=2m") as disk:
        code = main(["train", "--out", str(disk / "run"), *flags])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert "no space left on device" in err and str(disk / "run") in err
        assert _leftovers(disk) == []
        ckpt = load_checkpoint(disk / "run", prefer="last")  # the previous checkpoint still loads
        assert load_trainer_state(ckpt.path)["step"] >= 2


def test_read_only_folder_gives_one_line(verse_data, tmp_path, poem_file, capsys):
    with tmpfs(tmp_path / "disk", "size=4m") as disk:
        assert main(["train", "--data", str(verse_data), "--out", str(disk / "run"), "--preset", "tiny",
                     "--block-size", "16", "--max-steps", "2", "--final-eval", "false", "--no-progress"]) == 0
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        capsys.readouterr()
        for argv in (["train", "--out", str(disk / "run"), "--resume", "--max-steps", "4"],
                     ["prepare", "--text", str(poem_file), "--out", str(disk / "data")]):
            code = main(argv)
            err = capsys.readouterr().err
            assert code == 2 and err.count("\n") == 1, err
            assert "read-only file system" in err and str(disk) in err
        load_checkpoint(disk / "run", prefer="last")


def test_out_under_a_regular_file(verse_data, poem_file, capsys):
    for argv in (["train", "--data", str(verse_data), "--out", f"{poem_file}/run", "--preset", "tiny"],
                 ["prepare", "--text", str(poem_file), "--out", f"{poem_file}/data"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "not a directory" in err and str(poem_file) in err


def test_write_helpers_leave_nothing_behind_on_failure(tmp_path):
    from gpt_small.errors import GPTSmallError
    from gpt_small.fileio import atomic_write

    with tmpfs(tmp_path / "disk", "size=64k") as disk:
        atomic_write(disk / "a.json", "{}")
        with pytest.raises(GPTSmallError, match=r"cannot write .*b\.bin: no space left on device"):
            atomic_write(disk / "b.bin", b"\0" * 200_000)
        assert sorted(p.name for p in disk.iterdir()) == ["a.json"]
        assert (disk / "a.json").read_text() == "{}"


def test_metrics_and_summary_are_strict_json(verse_data, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--data", str(verse_data), "--out", str(run), "--preset", "tiny", "--block-size", "16",
                 "--max-steps", "2", "--eval-interval", "1000", "--final-eval", "false", "--no-progress"]) == 0

    def strict(text: str):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))

    for line in (run / "metrics.jsonl").read_text().splitlines():
        strict(line)
    strict((run / "summary.json").read_text())
    assert torch.isfinite(torch.tensor(strict((run / "summary.json").read_text())["best_val_loss"]))
