"""Promises no earlier test observed, each found by a mutation that passed the suite unnoticed.

docs/testing.md lists the campaign (tools/mutation_campaign.py re-runs it); every test
here fails under the mutation named in its docstring.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt_small import GPT, GPTConfig, TrainConfig
from gpt_small.data import BatchSampler, PreparedData
from gpt_small.generate import sample
from gpt_small.train import Trainer


@pytest.fixture(scope="module")
def data_dir(verse_data) -> Path:
    return verse_data


def _trainer(data_dir: Path, out: Path, **train) -> Trainer:
    vocab = PreparedData(data_dir).tokenizer.vocab_size
    model = GPTConfig.from_preset("tiny", vocab_size=vocab)
    cfg = TrainConfig(**{**dict(batch_size=2, max_steps=10, warmup_steps=0, threads=1, final_eval=False,
                                eval_batches=1, grad_clip=0.0), **train})
    return Trainer(model, cfg, data_dir, out, show_progress=False)


# ---------------------------------------------------------------- training

def test_accumulated_gradient_is_the_gradient_of_the_mean_micro_batch_loss(data_dir, tmp_path):
    """grad_accum micro-batches give the gradient of their mean loss, not of the sum (AdamW is
    nearly blind to the gradient's scale, so only the gradient itself shows it).
    Mutation: the loss not divided by grad_accum."""
    t = _trainer(data_dir, tmp_path / "run", grad_accum=3)
    t.setup()
    sampler_state = t.sampler.state_dict()
    weights = {k: v.clone() for k, v in t.model.state_dict().items()}
    seen: dict[str, torch.Tensor] = {}
    step = t.optimizer.step

    def capture(*args, **kwargs):
        seen.update({n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    t.optimizer.step = capture
    t.train_step()

    ref = GPT(t.model_config)
    ref.load_state_dict(weights)
    t.sampler.load_state_dict(sampler_state)
    losses = [ref(*t.sampler.next_batch())[1] for _ in range(3)]
    torch.stack(losses).mean().backward()
    assert seen.keys() == {n for n, p in ref.named_parameters() if p.grad is not None}
    for name, p in ref.named_parameters():
        torch.testing.assert_close(seen[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_grad_clip_bounds_the_gradient_norm_the_optimizer_sees(data_dir, tmp_path):
    """Mutation: clip_grad_norm_ dropped (or clipping to another norm)."""
    t = _trainer(data_dir, tmp_path / "run", grad_clip=0.01)
    t.setup()
    norms = []
    step = t.optimizer.step

    def capture(*args, **kwargs):
        norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in t.model.parameters()
                                                           if p.grad is not None])).item())
        return step(*args, **kwargs)

    t.optimizer.step = capture
    t.train_step()
    assert norms[0] == pytest.approx(0.01, rel=1e-3)  # a tiny model's first gradient is far above 0.01


def test_every_step_starts_from_zero_gradients(data_dir, tmp_path):
    """Mutation: zero_grad dropped after the optimizer step (gradients would pile up)."""
    t = _trainer(data_dir, tmp_path / "run")
    t.setup()
    t.train_step()
    assert all(p.grad is None for p in t.model.parameters())


def test_interval_evaluation_runs_in_eval_mode_and_returns_to_training(data_dir, tmp_path):
    """Dropout is off while the fixed windows are scored, back on afterwards.
    Mutations: model.eval() or model.train() dropped in Trainer.evaluate."""
    vocab = PreparedData(data_dir).tokenizer.vocab_size
    cfg = TrainConfig(batch_size=2, max_steps=2, threads=1, eval_batches=2)
    t = Trainer(GPTConfig.from_preset("tiny", vocab_size=vocab, dropout=0.5), cfg, data_dir, tmp_path / "run",
                show_progress=False)
    t.setup()
    modes = []
    t.model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    first = t.evaluate()
    assert modes and not any(modes) and t.model.training
    assert t.evaluate() == first  # no dropout draw: the same figure twice
    with torch.no_grad():
        expected = np.mean([t.model.eval()(x, y)[1].item() for x, y in t.eval_set])
    assert first == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------- data

def test_sampler_draws_every_start_and_never_reads_past_the_end():
    """With block_size + 2 tokens there are exactly two windows; both come up, nothing past the end.
    Mutations: the start bound one too high (reads a token past the data) or one too low."""
    data = np.arange(18, dtype=np.uint16)  # block 16: windows start at 0 or 1
    s = BatchSampler(data, batch_size=4, block_size=16, seed=3)
    firsts = set()
    for _ in range(50):
        x, y = s.next_batch()
        firsts |= set(x[:, 0].tolist())
        assert int(y.max()) <= 17
    assert firsts == {0, 1}


# ---------------------------------------------------------------- sampling

def test_temperature_divides_the_logits():
    """sample(temperature=T) draws from softmax(logits / T): the same generator gives the same
    tokens as torch.multinomial on those probabilities. Mutation: multiplying by T."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5, 1.5]]).repeat(400, 1)
    for T in (0.5, 2.0):
        got = sample(logits, temperature=T, generator=torch.Generator().manual_seed(0))
        probs = torch.softmax(logits / T, dim=-1)
        want = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(0)).squeeze(-1)
        assert torch.equal(got, want), T


# ---------------------------------------------------------------- the model's input

@pytest.mark.parametrize("enc", ["learned", "sinusoidal", "rope"])
def test_first_block_sees_the_scaled_token_embedding_plus_positions(enc):
    """The residual stream entering block 0: wte(idx) (times sqrt(n_embd) for sinusoidal positions,
    Vaswani et al. 3.4) plus the position table where there is one. Mutation: the sinusoidal
    model without its embedding scale."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", pos_encoding=enc)).eval()
    idx = torch.randint(0, 64, (2, 20))
    seen = []
    model.transformer.h[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        model(idx)
        expected = model.transformer.wte(idx)
        if enc == "sinusoidal":
            expected = expected * math.sqrt(model.config.n_embd) + model.transformer.wpe(torch.arange(20))
        elif enc == "learned":
            expected = expected + model.transformer.wpe.weight[:20]
    torch.testing.assert_close(seen[0], expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- checkpoints on disk

class _FileCalls:
    """Records os.fsync (by path) and os.replace/os.rename/os.unlink/os.symlink calls, then does them."""

    def __init__(self, monkeypatch):
        self.events: list[tuple[str, str, str]] = []
        for name in ("fsync", "replace", "rename", "unlink", "symlink", "remove"):
            real = getattr(os, name)
            monkeypatch.setattr(os, name, self._wrap(name, real))

    def _wrap(self, name, real):
        def call(*args, **kwargs):
            if name == "fsync":
                self.events.append(("fsync", os.readlink(f"/proc/self/fd/{args[0]}"), ""))
            else:
                self.events.append((name, os.fspath(args[0]), os.fspath(args[1]) if len(args) > 1 else ""))
            return real(*args, **kwargs)
        return call


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads fsync'd paths from /proc (Linux)")
def test_checkpoint_files_are_fsynced_before_the_folder_is_renamed_into_place(data_dir, tmp_path, monkeypatch):
    """Mutation: the fsync of the written files (or of their folder) dropped before the rename."""
    t = _trainer(data_dir, tmp_path / "run")
    t.setup()
    t.train_step()
    calls = _FileCalls(monkeypatch)
    final = t.save()
    renames = [i for i, (op, src, dst) in enumerate(calls.events)
               if op in ("replace", "rename") and Path(dst) == final]
    assert renames, calls.events
    tmp_dir = calls.events[renames[0]][1]
    synced = {src for op, src, _ in calls.events[:renames[0]] if op == "fsync"}
    # a file written by atomic_write is fsync'd under its temporary name, then renamed into the folder
    synced |= {dst for op, src, dst in calls.events[:renames[0]] if op in ("replace", "rename") and src in synced}
    written = {os.path.join(tmp_dir, f.name) for f in final.iterdir()}
    assert written <= synced, written - synced
    assert tmp_dir in synced  # the folder's entries too


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads fsync'd paths from /proc (Linux)")
def test_last_link_is_switched_atomically(data_dir, tmp_path, monkeypatch):
    """Once `last` exists it is never removed, only replaced in one rename, so a reader (or a kill)
    always finds a complete checkpoint. Mutation: unlink + symlink instead of os.replace."""
    t = _trainer(data_dir, tmp_path / "run")
    t.setup()
    t.train_step()
    t.save()
    first = (tmp_path / "run" / "last").resolve()
    calls = _FileCalls(monkeypatch)
    t.train_step()
    t.save(best=True)
    link = str(tmp_path / "run" / "last")
    removed = [e for e in calls.events if (e[0] in ("unlink", "remove") and e[1] == link)
               or (e[0] == "symlink" and e[2] == link)]  # os.symlink(target, link)
    assert not removed, calls.events
    assert [e for e in calls.events if e[0] in ("replace", "rename") and e[2] == link]
    assert (tmp_path / "run" / "last").resolve() != first and (tmp_path / "run" / "best").exists()


# ---------------------------------------------------------------- progress, make poem, threads

def test_run_progress_says_finished_only_for_a_run_that_reached_its_budget(data_dir, tmp_path):
    """config.json carries step and finished, so make poem decides without the optimizer moments.
    Mutation: an interrupted run marked finished."""
    from gpt_small.run_folder import run_progress

    _trainer(data_dir, tmp_path / "run", max_steps=6).fit(stop_after=3)
    p = run_progress(tmp_path / "run")
    assert (p.step, p.finished) == (3, False) and p.elapsed > 0
    vocab = PreparedData(data_dir).tokenizer.vocab_size
    cfg = TrainConfig(batch_size=2, max_steps=6, warmup_steps=0, threads=1, final_eval=False, eval_batches=1,
                      grad_clip=0.0)
    Trainer(GPTConfig.from_preset("tiny", vocab_size=vocab), cfg, data_dir, tmp_path / "run", resume=True,
            show_progress=False).fit()
    assert run_progress(tmp_path / "run") == run_progress(tmp_path / "run" / "last")
    p = run_progress(tmp_path / "run")
    assert (p.step, p.finished) == (6, True)


def test_progress_follows_the_time_budget_when_it_is_further(data_dir, tmp_path):
    """With max_time, the schedule's progress is the larger of the step and the time fractions.
    Mutation: the smaller."""
    t = _trainer(data_dir, tmp_path / "run", max_steps=100, max_time=60.0)
    t.setup()
    t.step, t.elapsed = 10, 30.0
    assert t.progress() == pytest.approx(0.5, abs=0.01)
    t.elapsed = 1.0
    assert t.progress() == pytest.approx(0.1, abs=0.01)


def test_make_poem_resumes_an_interrupted_run(data_dir, tmp_path, capsys):
    """Mutation: an interrupted run (step > 0, not finished) reused as if finished."""
    from gpt_small.poem import ensure_model

    (tmp_path / "tiny.toml").write_text('preset = "tiny"\n[train]\nbatch_size = 2\nthreads = 1\n'
                                        "eval_batches = 1\nmax_steps = 4\nfinal_eval = false\n")
    vocab = PreparedData(data_dir).tokenizer.vocab_size
    cfg = TrainConfig(batch_size=2, threads=1, eval_batches=1, max_steps=4, final_eval=False)
    Trainer(GPTConfig.from_preset("tiny", vocab_size=vocab), cfg, data_dir, tmp_path / "run",
            show_progress=False).fit(stop_after=2)
    summary = ensure_model(data_dir, tmp_path / "run", str(tmp_path / "tiny.toml"), minutes=1.0)
    assert "resuming" in capsys.readouterr().out
    assert summary is not None and summary["steps"] == 4 and summary["steps_this_run"] == 2


def test_threads_are_shared_among_the_processes_of_one_machine():
    """Mutation: every torchrun process takes all the cores."""
    from gpt_small.device import set_threads

    before = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        assert set_threads(0, local_world_size=2) == max(1, cores // 2)
        assert set_threads(0) == cores and set_threads(3) == 3 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_max_steps_0_means_no_step_limit_and_needs_a_time_budget(data_dir, tmp_path):
    """configs spell "no step limit" as max_steps = 0 (and "no interval checkpoints" as
    checkpoint_interval = 0): the time budget ends the run; without one it is refused."""
    from gpt_small.errors import GPTSmallError

    with pytest.raises(GPTSmallError, match="max_steps 0"):
        _trainer(data_dir, tmp_path / "none", max_steps=0)
    summary = _trainer(data_dir, tmp_path / "run", max_steps=0, max_time=0.5, checkpoint_interval=0,
                       eval_interval=10_000).fit()
    assert summary["stopped_by"] == "max_time" and summary["steps"] >= 1
    steps = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert steps == [f"step-{summary['steps']:06d}"]  # only the final one


def test_banned_ids_are_never_sampled():
    """Mutation: banned_ids ignored (a char model could write its <unk>)."""
    from gpt_small.generate import generate_tokens

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny"))
    free = torch.cat(list(generate_tokens(model, [1, 2, 3], max_new_tokens=8, temperature=0)))
    banned = sorted(set(free.tolist()))  # what greedy decoding picks when nothing is banned
    kept = torch.cat(list(generate_tokens(model, [1, 2, 3], max_new_tokens=8, temperature=0, banned_ids=banned)))
    assert not set(kept.tolist()) & set(banned)


def test_process_settings_are_made_by_configure_process_not_by_the_trainer(data_dir, tmp_path):
    """Building and setting up a Trainer leaves the thread count alone; configure_process sets it."""
    from gpt_small.device import configure_process

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _trainer(data_dir, tmp_path / "run", threads=2).setup()
        assert torch.get_num_threads() == 1
        assert configure_process(device="cpu", threads=2) == torch.device("cpu")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
