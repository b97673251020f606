"""Training: schedule, decay groups, exact resume, kill-safe checkpoints, signals, NaN, DDP, bad flags."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt_small import GPT, GPTConfig, TrainConfig
from gpt_small.checkpoint import find_checkpoint, load_checkpoint, load_trainer_state
from gpt_small.cli import main
from gpt_small.data import PreparedData, prepare
from gpt_small import device
from gpt_small.errors import GPTSmallError
from gpt_small.train import Trainer, lr_at, param_groups


@pytest.fixture(scope="module")
def data_dir(verse_data) -> Path:
    return verse_data


def _configs(data_dir: Path, **train) -> tuple[GPTConfig, TrainConfig]:
    vocab = PreparedData(data_dir).tokenizer.vocab_size
    model = GPTConfig.from_preset("tiny", vocab_size=vocab, dropout=0.1)
    defaults = dict(batch_size=4, max_steps=20, warmup_steps=5, eval_interval=5, eval_batches=2,
                    log_interval=1, checkpoint_interval=10, final_eval=False, threads=1)
    return model, TrainConfig(**{**defaults, **train})


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


# ---------------------------------------------------------------- pure pieces

def test_schedule_values_at_known_steps():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110, schedule="cosine")
    wp = 10 / 110
    assert lr_at(0, 0.0, cfg, wp) == pytest.approx(1e-4)  # (0+1)/10 of lr
    assert lr_at(9, 9 / 110, cfg, wp) == pytest.approx(1e-3)
    assert lr_at(10, 10 / 110, cfg, wp) == pytest.approx(1e-3)  # decay starts at the peak
    assert lr_at(60, 60 / 110, cfg, wp) == pytest.approx(5.5e-4)  # half-way: the mean of lr and min_lr
    assert lr_at(110, 1.0, cfg, wp) == pytest.approx(1e-4)
    wsd = TrainConfig(lr=1e-3, min_lr=0.0, warmup_steps=0, max_steps=100, schedule="wsd", decay_frac=0.2)
    assert lr_at(50, 0.5, wsd) == pytest.approx(1e-3)
    assert lr_at(80, 0.8, wsd) == pytest.approx(1e-3)
    assert lr_at(90, 0.9, wsd) == pytest.approx(5e-4)
    assert lr_at(100, 1.0, wsd) == pytest.approx(0.0)
    const = TrainConfig(lr=2e-3, min_lr=0.0, warmup_steps=4, schedule="constant")
    assert [lr_at(s, 0.5, const) for s in (0, 3, 50)] == pytest.approx([5e-4, 2e-3, 2e-3])


def test_weight_decay_groups():
    model = GPT(GPTConfig.from_preset("tiny", pos_encoding="learned", tie_embeddings=False, ngram=3))
    decay, no_decay, head = param_groups(model, 0.1, head_lr_scale=0.3)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "transformer.wte.weight" in decayed and "transformer.h.0.attn.c_attn.weight" in decayed
    assert "transformer.wpe.weight" in kept  # position table
    assert {"transformer.ngram.tables.0.weight", "transformer.ngram.tables.1.weight"} <= kept  # n-gram tables
    # exactly the vectors (norms, biases) and the two kinds of tables: decay reaches no norm or bias
    assert kept == {n for n, p in model.named_parameters() if p.dim() < 2 or "wpe" in n or ".ngram." in n}
    assert any(".ln_" in n for n in kept) and any(n.endswith("bias") for n in kept)
    # the untied head: decayed, in its own group at lr * head_lr_scale
    assert [names[id(p)] for p in head["params"]] == ["lm_head.weight"]
    assert head["weight_decay"] == 0.1 and head["lr_ratio"] == 0.3
    assert len(decayed) + len(kept) + 1 == len(list(model.parameters()))


def test_tied_head_stays_with_the_matrices():
    model = GPT(GPTConfig.from_preset("tiny", tie_embeddings=True))
    groups = param_groups(model, 0.1, head_lr_scale=0.3)
    assert len(groups) == 2  # the head is the token embedding: no group of its own
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


# ---------------------------------------------------------------- runs

@pytest.mark.parametrize("optimizer, ngram", [("adamw", 1), ("muon", 1), ("muon", 3)])
def test_resume_equals_uninterrupted_run(data_dir, tmp_path, optimizer, ngram):
    model, cfg = _configs(data_dir, max_steps=20, optimizer=optimizer)
    model = dataclasses.replace(model, ngram=ngram, ngram_buckets=512)
    Trainer(model, cfg, data_dir, tmp_path / "a", show_progress=False).fit()

    first = Trainer(model, cfg, data_dir, tmp_path / "b", show_progress=False).fit(stop_after=10)
    assert first["stopped_by"] == "stop_after" and first["steps"] == 10
    Trainer(model, cfg, data_dir, tmp_path / "b", resume=True, show_progress=False).fit()

    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(la) == sorted(lb) == list(range(1, 21))
    for step in la:
        assert la[step] == pytest.approx(lb[step], abs=1e-6), step
    wa = load_file(str(find_checkpoint(tmp_path / "a", "last") / "model.safetensors"))
    wb = load_file(str(find_checkpoint(tmp_path / "b", "last") / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


def test_half_schedule_differs_so_resume_test_means_something(data_dir, tmp_path):
    """A 10-step run decays to min_lr by step 10; its losses must differ from the 20-step run's
    after warm-up, otherwise the resume test above could not tell a wrong schedule apart."""
    model, cfg = _configs(data_dir, max_steps=20)
    Trainer(model, cfg, data_dir, tmp_path / "a", show_progress=False).fit()
    Trainer(model, TrainConfig(**{**cfg.to_dict(), "max_steps": 10}), data_dir, tmp_path / "b",
            show_progress=False).fit()
    assert _losses(tmp_path / "a")[10] != _losses(tmp_path / "b")[10]


def test_checkpoint_contents_and_loading(data_dir, tmp_path):
    model, cfg = _configs(data_dir, max_steps=6, final_eval=True)
    summary = Trainer(model, cfg, data_dir, tmp_path / "run", show_progress=False).fit()
    ckpt = find_checkpoint(tmp_path / "run", "last")
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "config.json", "tokenizer.json",
                                                "trainer_state.pt"}
    meta = json.loads((ckpt / "config.json").read_text())
    assert meta["format_version"] == 1 and meta["step"] == 6 and meta["model"]["n_layer"] == 2
    state = load_trainer_state(ckpt)  # weights_only=True inside
    assert state["step"] == 6 and "optimizer" in state and "sampler" in state
    loaded = load_checkpoint(tmp_path / "run")
    assert loaded.tokenizer.vocab_size == model.vocab_size
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    fv = summary["final_val"]
    assert fv["bits_per_char"] == pytest.approx(fv["loss"] / math.log(2) / fv["chars_per_token"])
    assert fv["tokens"] == len(PreparedData(data_dir).val) - 1  # every val token after the first, once


def test_overfit_run_also_reports_the_best_checkpoints_whole_split_loss(data_dir, tmp_path, monkeypatch):
    """Where validation rose after its best (an overfitting run), `best` (what generate and eval
    load) is scored on the whole split too, and the trainer keeps the final weights."""
    from gpt_small.evaluate import evaluate_tokens
    from gpt_small.loop import format_summary

    monkeypatch.setattr(Trainer, "evaluate", lambda self: float(self.step))  # rises: best = step 5
    model, cfg = _configs(data_dir, max_steps=20, final_eval=True)
    t = Trainer(model, cfg, data_dir, tmp_path / "run", show_progress=False)
    summary = t.fit()
    data = PreparedData(data_dir)

    def whole(prefer):
        return evaluate_tokens(load_checkpoint(tmp_path / "run", prefer=prefer).model, data.val,
                               context=model.block_size, batch_size=8).loss

    best = summary["best_checkpoint_val"]
    assert best["step"] == 5 and Path(best["checkpoint"]).name == "best"
    assert best["loss"] == pytest.approx(whole("best"), abs=1e-6)
    assert summary["final_val"]["loss"] == pytest.approx(whole("last"), abs=1e-6)
    assert abs(best["loss"] - summary["final_val"]["loss"]) > 1e-4  # two different weight sets
    last = load_file(str(find_checkpoint(tmp_path / "run", "last") / "model.safetensors"))
    for k, v in t.model.state_dict().items():  # the final weights were put back
        if k in last:
            torch.testing.assert_close(v, last[k], rtol=0, atol=0)
    assert "best checkpoint (step 5" in format_summary(summary)
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert kinds[-2:] == ["final_eval", "final_eval_best"]


def test_no_best_checkpoint_figure_when_best_is_last(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "evaluate", lambda self: -float(self.step))  # falls: best = last
    model, cfg = _configs(data_dir, max_steps=10, final_eval=True)
    summary = Trainer(model, cfg, data_dir, tmp_path / "run", show_progress=False).fit()
    assert "final_val" in summary and "best_checkpoint_val" not in summary


def test_interval_evaluation_is_deterministic(data_dir, tmp_path):
    model, cfg = _configs(data_dir, max_steps=5)
    t = Trainer(model, cfg, data_dir, tmp_path / "run", show_progress=False)
    t.setup()
    assert t.evaluate() == t.evaluate()


def test_existing_run_needs_resume(data_dir, tmp_path):
    model, cfg = _configs(data_dir, max_steps=2)
    Trainer(model, cfg, data_dir, tmp_path / "run", show_progress=False).fit()
    with pytest.raises(GPTSmallError, match="--resume"):
        Trainer(model, cfg, data_dir, tmp_path / "run", show_progress=False)


def test_muon_run_learns_and_schedules_its_own_lr(data_dir, tmp_path):
    model, cfg = _configs(data_dir, warmup_steps=2, optimizer="muon", muon_lr=0.05)
    Trainer(model, cfg, data_dir, tmp_path / "run", show_progress=False).fit()
    losses = _losses(tmp_path / "run")
    assert losses[20] < losses[1] - 0.3  # it learns
    # the scheduled lr reaches Muon's groups scaled by muon_lr / lr
    t = Trainer(model, cfg, data_dir, tmp_path / "run", resume=True, show_progress=False)
    t.setup()
    t.train_step()
    lrs = {g.get("lr_ratio", 1.0): g["lr"] for g in t.optimizer.param_groups}
    assert lrs[cfg.muon_lr / cfg.lr] == pytest.approx(lrs[1.0] * cfg.muon_lr / cfg.lr)
    # Newton-Schulz in bf16 where bf16 matmuls beat fp32 here, as the Muon reference does
    faster = device.bf16_matmul_is_faster(torch.device("cpu"))
    assert t.optimizer.muon.ns_dtype == (torch.bfloat16 if faster else torch.float32)


@pytest.mark.parametrize("speedup, expected", [(2.6, torch.bfloat16), (0.5, torch.float32), (1.1, torch.float32)])
def test_bfloat16_if_faster_follows_the_measured_cpu_speedup(monkeypatch, speedup, expected):
    """bf16 only where this CPU's bf16 matmul measured faster: the same AVX512-BF16 flag meant
    2.6x faster on one CPU and half as fast on another."""
    monkeypatch.setattr(device, "cpu_bf16_matmul_speedup", lambda threads: speedup)
    cpu = torch.device("cpu")
    assert device.pick_dtype("bfloat16-if-faster", cpu) == expected
    assert device.pick_dtype("auto", cpu) == torch.float32  # auto stays fp32 on the CPU
    assert device.pick_dtype("bfloat16", cpu) == torch.bfloat16


def test_cpu_bf16_speedup_is_measured_once():
    first = device.cpu_bf16_matmul_speedup(torch.get_num_threads())
    assert math.isfinite(first) and first > 0
    assert device.cpu_bf16_matmul_speedup(torch.get_num_threads()) == first  # cached: one answer per run


def test_bf16_run_reports_an_fp32_whole_split_loss(data_dir, tmp_path):
    """Training under bf16 autocast; the final whole-split figure is the fp32 loss of its weights."""
    from gpt_small.evaluate import evaluate_tokens

    model, cfg = _configs(data_dir, max_steps=8, dtype="bfloat16", final_eval=True)
    summary = Trainer(model, cfg, data_dir, tmp_path / "run", show_progress=False).fit()
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["autocast"] == "bfloat16"
    ckpt = load_checkpoint(tmp_path / "run", prefer="last")
    data = PreparedData(data_dir)
    fp32 = evaluate_tokens(ckpt.model, data.val, context=model.block_size, batch_size=8)
    bf16 = evaluate_tokens(ckpt.model, data.val, context=model.block_size, batch_size=8,
                           autocast_dtype=torch.bfloat16)
    assert summary["final_val"]["loss"] == pytest.approx(fp32.loss, abs=1e-6)
    assert abs(bf16.loss - fp32.loss) > 1e-6  # the two differ, so the check above can tell


def test_head_lr_scale_scales_the_untied_heads_lr(data_dir, tmp_path):
    model, cfg = _configs(data_dir, max_steps=3, warmup_steps=0, head_lr_scale=0.25)
    model = dataclasses.replace(model, tie_embeddings=False)
    t = Trainer(model, cfg, data_dir, tmp_path / "run", show_progress=False)
    t.setup()
    t.train_step()
    head = next(g for g in t.optimizer.param_groups if g["params"][0] is t.model.lm_head.weight)
    body = next(g for g in t.optimizer.param_groups if g["params"][0] is t.model.transformer.wte.weight)
    assert head["lr"] == pytest.approx(0.25 * body["lr"]) and body["lr"] > 0


def test_resume_with_another_optimizer_is_refused(data_dir, tmp_path):
    model, cfg = _configs(data_dir, max_steps=2, optimizer="muon")
    Trainer(model, cfg, data_dir, tmp_path / "run", show_progress=False).fit()
    with pytest.raises(GPTSmallError, match="would change optimizer from 'muon'"):
        Trainer(model, TrainConfig(**{**cfg.to_dict(), "optimizer": "adamw"}), data_dir, tmp_path / "run",
                resume=True, show_progress=False)


def test_resume_with_other_parameter_groups_is_refused(data_dir, tmp_path):
    # A checkpoint whose optimizer state has the groups of an older gpt-small (no head group).
    model, cfg = _configs(data_dir, max_steps=2)
    model = dataclasses.replace(model, tie_embeddings=False)
    Trainer(model, cfg, data_dir, tmp_path / "run", show_progress=False).fit()
    path = tmp_path / "run" / "last" / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    state["optimizer"]["param_groups"].pop()
    torch.save(state, path)
    t = Trainer(model, cfg, data_dir, tmp_path / "run", resume=True, show_progress=False)
    with pytest.raises(GPTSmallError, match="--resume: the optimizer state .* parameter groups"):
        t.setup()


def test_resume_refuses_data_from_another_tokenizer(data_dir, tmp_path, verse):
    model, cfg = _configs(data_dir, max_steps=2)
    Trainer(model, cfg, data_dir, tmp_path / "run", show_progress=False).fit()
    (tmp_path / "other.txt").write_text(verse(1500).upper())
    prepare(out=tmp_path / "other", text=tmp_path / "other.txt", tokenizer="char")
    other = PreparedData(tmp_path / "other")
    model2 = GPTConfig(**{**model.to_dict(), "vocab_size": other.tokenizer.vocab_size})
    with pytest.raises(GPTSmallError, match="another tokenizer|differs"):
        Trainer(model2, cfg, other, tmp_path / "run", resume=True, show_progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    model, cfg = _configs(data_dir, max_steps=50, checkpoint_interval=4, eval_interval=100)
    original = GPT.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None, **kw):
        out = original(self, idx, targets, **kw)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] > 6:
                logits, loss = out
                return logits, loss * float("nan")
        return out

    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(GPTSmallError, match="nan at step 7"):
        Trainer(model, cfg, data_dir, tmp_path / "run", show_progress=False).fit()
    ckpt = find_checkpoint(tmp_path / "run", "last")
    assert ckpt.name == "step-000004"
    for v in load_file(str(ckpt / "model.safetensors")).values():
        assert torch.isfinite(v).all()


# ---------------------------------------------------------------- processes

def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gpt_small", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_sigterm_saves_and_resume_continues(data_dir, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli("train", "--data", str(data_dir), "--out", str(run), "--preset", "tiny",
                                 "--max-steps", "100000", "--batch-size", "4", "--eval-interval", "100000",
                                 "--checkpoint-interval", "100000", "--log-interval", "1", "--no-progress",
                                 "--threads", "1"),
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err  # 128 + SIGTERM
    assert "interrupted by SIGTERM" in out
    state = load_trainer_state(find_checkpoint(run, "last"))
    assert state["step"] >= 1 and not state["finished"]
    resumed = subprocess.run(_cli("train", "--data", str(data_dir), "--out", str(run), "--resume",
                                  "--preset", "tiny", "--batch-size", "4", "--max-steps", str(state["step"] + 3),
                                  "--eval-interval", "100000", "--checkpoint-interval", "100000",
                                  "--log-interval", "1", "--no-progress", "--threads", "1"),
                             env=_env(), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert load_trainer_state(find_checkpoint(run, "last"))["step"] == state["step"] + 3


KILLER = """
import sys, torch
from gpt_small import GPT, GPTConfig
from gpt_small.checkpoint import save_checkpoint
from gpt_small.tokenizer import CharTokenizer
model = GPT(GPTConfig(vocab_size=64, block_size=64, n_layer=4, n_head=4, n_embd=256))
tok = CharTokenizer([chr(c) for c in range(33, 96)])  # 63 characters + <unk> = vocab_size 64
step = 0
while True:
    step += 1
    with torch.no_grad():
        model.transformer.wte.weight.fill_(step)
    save_checkpoint(sys.argv[1], step=step, model=model, tokenizer=tok, config={"model": model.config.to_dict()},
                    trainer_state={"step": step, "optimizer": {"big": torch.full((500_000,), float(step))}})
    print(step, flush=True)
"""


@pytest.mark.slow
def test_kill_9_during_checkpoint_writes_leaves_last_loadable(tmp_path):
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    rng = random.Random(0)
    for attempt in range(6):
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run")], env=_env(),
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline()  # one checkpoint is complete
        time.sleep(rng.uniform(0.0, 0.6))
        proc.kill()
        proc.wait()
        ckpt = load_checkpoint(tmp_path / "run", prefer="last")
        step = json.loads((ckpt.path / "config.json").read_text())["step"]
        assert float(ckpt.model.transformer.wte.weight[0, 0].detach()) == step  # weights of the same step
        assert load_trainer_state(ckpt.path)["step"] == step


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(data_dir, tmp_path):
    common = ["--data", str(data_dir), "--preset", "tiny", "--max-steps", "4", "--eval-interval", "100",
              "--log-interval", "1", "--no-progress", "--set", "dropout=0", "--set", "final_eval=false",
              "--threads", "1", "--warmup-steps", "1"]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "gpt_small", "train", "--out", str(tmp_path / "ddp"),
                          "--batch-size", "4", *common],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run(_cli("train", "--out", str(tmp_path / "one"), "--batch-size", "8", *common),
                            env=_env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    wd = load_file(str(find_checkpoint(tmp_path / "ddp", "last") / "model.safetensors"))
    ws = load_file(str(find_checkpoint(tmp_path / "one", "last") / "model.safetensors"))
    for k in ws:
        torch.testing.assert_close(wd[k], ws[k], rtol=1e-4, atol=1e-5)
    ld, ls = _losses(tmp_path / "ddp"), _losses(tmp_path / "one")
    # rank 0 logs its own micro-batch loss (half the global batch); the weights are the real check
    assert sorted(ld) == sorted(ls) == [1, 2, 3, 4]


# ---------------------------------------------------------------- bad flags

@pytest.mark.parametrize("flags, message", [
    (["--lr", "-1"], "lr must be positive"),
    (["--set", "nonsense=3"], "unknown --set key 'nonsense'"),
    (["--max-time", "ten minutes"], "max_time must look like 600, 600s, 10m or 1.5h"),
    (["--batch-size", "0"], "batch_size must be an integer >= 1"),
    (["--pos", "spiral"], "pos_encoding must be one of"),
    (["--block-size", "100000"], "fewer than one window"),
])
def test_bad_flags_give_one_line_errors(data_dir, tmp_path, capsys, flags, message):
    code = main(["train", "--data", str(data_dir), "--out", str(tmp_path / "run"), "--preset", "tiny",
                 "--no-progress", *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("gpt-small train: error:") and err.count("\n") == 1
    assert message in err


def test_missing_data_folder(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_resume_block_size_change_is_refused(data_dir, tmp_path, capsys):
    args = ["train", "--data", str(data_dir), "--out", str(tmp_path / "run"), "--preset", "tiny",
            "--max-steps", "2", "--no-progress", "--set", "final_eval=false"]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--resume", "--block-size", "64"]) == 2
    assert "block_size" in capsys.readouterr().err
