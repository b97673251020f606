"""Fine-tuning with `gpt-small train --init-from`, and the experiment trackers (`--logger`).

The end-to-end test imports a random GPT-2 built with transformers, prepares real eng-poem verse
with the gpt2 tokenizer, fine-tunes 20 steps (the loss falls), exports again and loads the result
in transformers. The tracker test reads TensorBoard's event file back with its own reader.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers

from gpt_small.checkpoint import find_checkpoint, load_checkpoint, load_trainer_state
from gpt_small.cli import main
from gpt_small.config import GPTConfig, TrainConfig
from gpt_small.data import PreparedData, prepare
from gpt_small.interop.hf_tokenizer import write_tokenizer
from gpt_small.tokenizer import gpt2_tokenizer
from gpt_small.train import Trainer

SMALL_RUN = ["--batch-size", "4", "--eval-batches", "2", "--warmup-steps", "2", "--threads", "1", "--no-progress"]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"gpt-small {argv[0]}: error:") and captured.err.count("\n") == 1, captured.err
    return captured.err


@pytest.fixture(scope="module")
def imported_gpt2(tmp_path_factory) -> Path:
    """A random GPT-2 (2 layers, 32 wide, 64 positions) made by transformers and imported."""
    root = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2))
    hf.save_pretrained(root / "hf")
    write_tokenizer(gpt2_tokenizer(), root / "hf", 64)
    assert main(["import", "--hf", str(root / "hf"), "--out", str(root / "run")]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def gpt2_poetry(tmp_path_factory, builtin_corpora) -> Path:
    """The first 4,000 lines of eng-poem, prepared with the gpt2 tokenizer."""
    root = tmp_path_factory.mktemp("gpt2_poetry")
    with open(builtin_corpora["eng-poem"], encoding="utf-8") as f:
        lines = [next(f) for _ in range(4000)]
    (root / "verse.txt").write_text("".join(lines), encoding="utf-8")
    prepare(out=root / "data", text=root / "verse.txt", tokenizer="gpt2")
    return root / "data"


def test_fine_tune_an_imported_gpt2_on_poetry_then_export(imported_gpt2, gpt2_poetry, tmp_path):
    data = PreparedData(gpt2_poetry)
    ckpt = load_checkpoint(imported_gpt2)
    # the trainer's model starts as the checkpoint's weights, not a random init
    trainer = Trainer(ckpt.model.config, TrainConfig(threads=1), data, tmp_path / "probe", init_from=ckpt.path,
                      show_progress=False)
    trainer.setup()
    for name, p in ckpt.model.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[name], p), name
    trainer.close()

    run = tmp_path / "ft"
    assert main(["train", "--data", str(gpt2_poetry), "--out", str(run), "--init-from", str(imported_gpt2),
                 "--max-steps", "20", "--eval-interval", "10", "--log-interval", "1", "--lr", "3e-3",
                 *SMALL_RUN]) == 0
    losses = [r["loss"] for r in records(run) if r["kind"] == "train"]
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5  # from ~ln(50257) = 10.8 nats, random weights
    assert losses[0] == pytest.approx(math.log(50257), abs=0.5)
    run_config = json.loads((run / "run_config.json").read_text())
    assert run_config["init_from"] == str(ckpt.path) and run_config["model"] == ckpt.model.config.to_dict()

    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(hf) is transformers.GPT2LMHeadModel
    tuned = load_checkpoint(run).model.eval()
    idx = torch.from_numpy(data.val[:64].astype("int64"))[None]
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, tuned(idx), atol=1e-5, rtol=0)
    card = (tmp_path / "hf" / "README.md").read_text()
    local = f"runs/{ckpt.path.parent.parent.name}/checkpoints/{ckpt.path.name}"  # the card names no absolute path
    assert f"--init-from {local}" in card and f"Fine-tuned from `{local}`." in card and str(tmp_path) not in card


def test_init_from_starts_a_new_run_with_a_fresh_step_and_optimizer(verse_data, tmp_path):
    base = tmp_path / "base"
    assert main(["train", "--data", str(verse_data), "--out", str(base), "--preset", "tiny", "--max-steps", "12",
                 "--eval-interval", "6", "--set", "final_eval=false", *SMALL_RUN]) == 0
    new = tmp_path / "new"
    assert main(["train", "--data", str(verse_data), "--out", str(new), "--init-from", str(base), "--max-steps", "5",
                 "--eval-interval", "5", "--log-interval", "1", "--dropout", "0.1", "--set", "final_eval=false",
                 *SMALL_RUN]) == 0
    rows = [r for r in records(new) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["lr"] == pytest.approx(TrainConfig().lr / 2)  # warm-up starts again: step 1 of 2
    state = load_trainer_state(find_checkpoint(new, prefer="last"))
    assert state["step"] == 5
    assert all(int(s["step"]) == 5 for s in state["optimizer"]["state"].values())
    cfg = load_checkpoint(new).model.config
    assert cfg.dropout == 0.1 and cfg.n_layer == GPTConfig.from_preset("tiny").n_layer
    # the base model's trained weights: a lower loss at step 1 than the base run had at its random step 1
    assert rows[0]["loss"] < [r for r in records(base) if r["kind"] == "train"][0]["loss"]


def test_init_from_refuses_another_tokenizer_and_another_shape(imported_gpt2, verse_data, tmp_path, capsys):
    base = ["train", "--data", str(verse_data), "--out", str(tmp_path / "x"), "--init-from", str(imported_gpt2)]
    err = one_line_error(capsys, base)
    assert "char tokenizer" in err and "gpt2 tokenizer" in err and "--tokenizer gpt2" in err
    gpt2_data = tmp_path / "gpt2-data"
    (tmp_path / "v.txt").write_text((verse_data.parent / "poems.txt").read_text())
    prepare(out=gpt2_data, text=tmp_path / "v.txt", tokenizer="gpt2")
    base[2] = str(gpt2_data)
    assert "--n-layer would change n_layer from 2" in one_line_error(capsys, base + ["--n-layer", "3"])
    assert "--preset does not apply" in one_line_error(capsys, base + ["--preset", "tiny"])
    assert "not found" in one_line_error(capsys, base[:-1] + [str(tmp_path / "nowhere")])
    assert not (tmp_path / "x").exists()


def test_tensorboard_logger_writes_what_metrics_jsonl_holds(verse_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main(["train", "--data", str(verse_data), "--out", str(run), "--preset", "tiny", "--max-steps", "12",
                 "--eval-interval", "4", "--log-interval", "2", "--logger", "tensorboard", *SMALL_RUN]) == 0
    events = list(run.glob("events.out.tfevents.*"))
    assert len(events) == 1 and (run / "metrics.jsonl").is_file()  # side by side in the run folder
    acc = EventAccumulator(str(run))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/bits_per_char", "train/lr", "train/tokens_per_s", "eval/val_loss", "eval/val_bpc",
            "final_eval/loss", "final_eval/bits_per_char"} <= tags
    cpt = PreparedData(verse_data).chars_per_token("train")
    rows = records(run)
    for kind, field, tag in (("train", "loss", "train/loss"), ("train", "lr", "train/lr"),
                             ("eval", "val_loss", "eval/val_loss"), ("eval", "val_bpc", "eval/val_bpc")):
        want = [(r["step"], r[field]) for r in rows if r["kind"] == kind]
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), tag  # stored as float32
    bpc = [e.value for e in acc.Scalars("train/bits_per_char")]
    assert bpc == pytest.approx([r["loss"] / math.log(2) / cpt for r in rows if r["kind"] == "train"], rel=1e-6)
    assert [e.step for e in acc.Scalars("eval/val_loss")] == [4, 8, 12]  # the validation curve


def test_wandb_logger_without_wandb_is_one_line(verse_data, tmp_path, capsys):
    try:
        import wandb  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("wandb is installed here")
    err = one_line_error(capsys, ["train", "--data", str(verse_data), "--out", str(tmp_path / "run"), "--preset",
                                  "tiny", "--logger", "wandb", *SMALL_RUN])
    assert "wandb" in err and "pip install wandb" in err
    assert "must be one of" in one_line_error(capsys, ["train", "--data", str(verse_data), "--out",
                                                       str(tmp_path / "run"), "--logger", "mlflow"])
    assert not (tmp_path / "run").exists()
