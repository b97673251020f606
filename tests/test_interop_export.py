"""`gpt-small export` against real transformers: logits, greedy generation, tokenizer ids, model card.

Each positional encoding and the poem-cpu preset (at a tiny size) is exported through the CLI and
loaded with AutoModelForCausalLM / AutoTokenizer; transformers' logits must equal ours to 1e-5 in
fp32 on random ids and on real eng-poem text, and `pipeline("text-generation")` greedy output must
equal `gpt-small generate --temperature 0`. The exported tokenizers must give our ids on the first
100k characters of eng-poem's validation split (the split `prepare` makes: the last 10% of lines).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from gpt_small.checkpoint import load_checkpoint, save_checkpoint
from gpt_small.cli import build_parser, main
from gpt_small.cli_train import configs_from_args
from gpt_small.config import GPTConfig, TrainConfig
from gpt_small.interop.hf_export import choose_architecture
from gpt_small.model import GPT
from gpt_small.tokenizer import CharTokenizer, gpt2_tokenizer, train_bpe
from gpt_small.train import Trainer

BLOCK = 64
TINY = dict(block_size=BLOCK, n_layer=2, n_head=2, n_embd=32)
CASES = {  # name -> (GPTConfig overrides, transformers class)
    "learned": (dict(pos_encoding="learned", activation="gelu", bias=True, tie_embeddings=True), "GPT2LMHeadModel"),
    "sinusoidal": (dict(pos_encoding="sinusoidal", activation="relu", bias=False, tie_embeddings=True),
                   "GPT2LMHeadModel"),
    "rope": (dict(pos_encoding="rope", activation="relu2", bias=True, tie_embeddings=False), "GPTNeoXForCausalLM"),
    "rope-tied": (dict(pos_encoding="rope", activation="gelu", bias=False, tie_embeddings=True, rope_theta=500.0),
                  "GPTNeoXForCausalLM"),
    "poem-cpu": ({**GPTConfig.from_preset("poem-cpu").to_dict(), **TINY, "ngram_buckets": 4096}, "GPTSmallForCausalLM"),
    # the remote code's other paths: a tied head, learned and sinusoidal positions
    "learned-qk-norm": (dict(pos_encoding="learned", activation="gelu", qk_norm=True), "GPTSmallForCausalLM"),
    "sinusoidal-ngram": (dict(pos_encoding="sinusoidal", activation="relu", bias=False, ngram=3, ngram_buckets=999),
                         "GPTSmallForCausalLM"),
}
REMOTE = [name for name, (_, cls) in CASES.items() if cls == "GPTSmallForCausalLM"]


def split_val(path: Path, val_fraction: float = 0.1) -> tuple[str, str]:
    """(train, validation) text of a file split as `gpt-small prepare` splits it, by lines."""
    raw = path.read_bytes()
    newlines = np.flatnonzero(np.frombuffer(raw, dtype=np.uint8) == ord("\n"))
    lines = len(newlines) + (not raw.endswith(b"\n"))
    val_lines = min(lines - 1, max(1, round(lines * val_fraction)))
    cut = int(newlines[lines - val_lines - 1]) + 1
    return raw[:cut].decode("utf-8"), raw[cut:].decode("utf-8")


@pytest.fixture(scope="module")
def eng_poem(builtin_corpora) -> tuple[str, str]:
    """(the first 1 MB of eng-poem's training split, the first 100k characters of its validation split)."""
    train, val = split_val(builtin_corpora["eng-poem"])
    return train[:1_000_000], val[:100_000]


@pytest.fixture(scope="module")
def char_tok(eng_poem) -> CharTokenizer:
    # from 1 MB of training text: some validation characters stay unknown, so <unk> is exercised
    return CharTokenizer.train(eng_poem[0])


def random_model(cfg: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():  # norms, biases and n-gram tables away from their initial 1/0, so a skipped copy shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, char_tok) -> dict[str, tuple[Path, Path, str]]:
    """name -> (our checkpoint folder, exported folder, what export printed), each exported by the CLI."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for i, (name, (overrides, _)) in enumerate(CASES.items()):
        cfg = GPTConfig(**{**overrides, **TINY, "vocab_size": char_tok.vocab_size})
        save_checkpoint(root / name, step=7, model=random_model(cfg, seed=i), tokenizer=char_tok,
                        config={"model": cfg.to_dict()})
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert main(["export", "--checkpoint", str(root / name), "--out", str(root / f"{name}-hf")]) == 0
        out[name] = (root / name, root / f"{name}-hf", printed.getvalue())
    return out


def load_hf(folder: Path):
    remote = (folder / "modeling_gpt_small.py").is_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=remote).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=remote)
    return model, tok


@pytest.mark.parametrize("name", CASES)
def test_export_says_which_architecture_and_why(exported, name):
    _, folder, printed = exported[name]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [CASES[name][1]]
    assert CASES[name][1] in printed and "why:" in printed
    remote = name in REMOTE
    assert ("auto_map" in config) == remote == (folder / "modeling_gpt_small.py").is_file()
    if remote:
        assert "trust_remote_code=True" in printed and ("n-gram" in printed or "QK-norm" in printed)


@pytest.mark.parametrize("name", CASES)
def test_logits_equal_ours_on_random_and_real_text(exported, name, char_tok, eng_poem):
    ckpt_dir, folder, _ = exported[name]
    ours = load_checkpoint(ckpt_dir).model.eval()
    hf, hf_tok = load_hf(folder)
    assert type(hf).__name__ == CASES[name][1]
    real = torch.tensor(char_tok.encode(eng_poem[1][:4 * BLOCK])).view(4, BLOCK)  # real verse, unknowns included
    rand = torch.randint(0, char_tok.vocab_size, (3, BLOCK), generator=torch.Generator().manual_seed(1))
    for idx in (real, rand, real[:, :17]):
        with torch.no_grad():
            torch.testing.assert_close(hf(idx).logits, ours(idx), atol=1e-5, rtol=0)
    assert torch.equal(hf_tok(eng_poem[1][:4 * BLOCK], return_tensors="pt")["input_ids"].view(4, BLOCK), real)


@pytest.mark.parametrize("name", CASES)
def test_pipeline_greedy_equals_gpt_small_generate(exported, name, capsys):
    ckpt_dir, folder, _ = exported[name]
    hf, hf_tok = load_hf(folder)
    pipe = transformers.pipeline("text-generation", model=hf, tokenizer=hf_tok)
    prompt = "The sea"
    # past block_size our generate slides its window; only the remote code does the same
    lengths = (40, 3 * BLOCK) if name in REMOTE else (40, BLOCK - len(prompt))
    for n in lengths:
        theirs = pipe(prompt, max_new_tokens=n, do_sample=False)[0]["generated_text"]
        capsys.readouterr()
        # the remote code slides one token at a time: our `--window-keep slide`
        assert main(["generate", "--checkpoint", str(ckpt_dir), "--prompt", prompt, "--temperature", "0",
                     "--max-new-tokens", str(n), "--no-stream", "--device", "cpu", "--window-keep", "slide"]) == 0
        ours = capsys.readouterr().out
        assert ours == theirs + "\n"
        assert len(theirs) == len(prompt) + n  # one character per token, none skipped


def test_exported_folders_load_without_gpt_small(exported, tmp_path):
    """A fresh interpreter where `import gpt_small` fails loads every folder and gives the same logits."""
    idx = torch.randint(0, 50, (2, BLOCK), generator=torch.Generator().manual_seed(3))
    torch.save(idx, tmp_path / "idx.pt")
    folders = {name: str(folder) for name, (_, folder, _) in exported.items()}
    script = (
        "import sys, json, torch\n"
        "sys.modules['gpt_small'] = None  # any import of our package now raises ImportError\n"
        "import transformers\n"
        f"idx = torch.load({str(tmp_path / 'idx.pt')!r}, weights_only=True)\n"
        f"folders = json.loads({json.dumps(json.dumps(folders))})\n"
        f"remote = {REMOTE!r}\n"
        "out = {}\n"
        "for name, f in folders.items():\n"
        "    m = transformers.AutoModelForCausalLM.from_pretrained(f, trust_remote_code=name in remote).eval()\n"
        "    transformers.AutoTokenizer.from_pretrained(f, trust_remote_code=name in remote)\n"
        "    with torch.no_grad():\n"
        "        out[name] = m(idx).logits\n"
        f"torch.save(out, {str(tmp_path / 'logits.pt')!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    logits = torch.load(tmp_path / "logits.pt", weights_only=True)
    for name, (ckpt_dir, _, _) in exported.items():
        with torch.no_grad():
            torch.testing.assert_close(logits[name], load_checkpoint(ckpt_dir).model.eval()(idx), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["char", "bpe", "gpt2"])
def test_exported_tokenizer_ids_equal_ours_on_validation_text(kind, eng_poem, char_tok, tmp_path, awkward):
    if kind == "char":
        tok = char_tok
    elif kind == "bpe":
        tok = train_bpe(eng_poem[0][:300_000], vocab_size=1024)
    else:
        tok = gpt2_tokenizer()
    cfg = GPTConfig(vocab_size=tok.vocab_size, **TINY)
    save_checkpoint(tmp_path / "run", step=1, model=GPT(cfg), tokenizer=tok, config={"model": cfg.to_dict()})
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert isinstance(hf_tok, transformers.PreTrainedTokenizerFast)
    val = eng_poem[1]
    assert len(val) == 100_000
    ids = hf_tok(val)["input_ids"]
    assert ids == tok.encode(val)
    assert hf_tok.decode(ids) == tok.decode(ids)
    if kind == "char":
        assert tok.unk_id in ids  # the 1 MB vocabulary misses some validation characters
    for text in awkward:
        assert hf_tok(text)["input_ids"] == tok.encode(text), text
        assert hf_tok.decode(tok.encode(text)) == tok.decode(tok.encode(text)), text


def test_bfloat16_export_loads_in_bfloat16(exported, tmp_path):
    ckpt_dir = exported["learned"][0]
    assert main(["export", "--checkpoint", str(ckpt_dir), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16")).eval()
    assert hf.dtype == torch.bfloat16
    ours = load_checkpoint(ckpt_dir).model.eval()
    idx = torch.randint(0, ours.config.vocab_size, (2, BLOCK), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, want = hf(idx).logits.float(), ours(idx)
    # bf16 keeps 8 bits of mantissa: close, not equal
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_export_refuses_a_non_empty_folder_and_a_bad_dtype(exported, tmp_path, capsys):
    ckpt_dir, folder, _ = exported["learned"]
    for argv in (["--out", str(folder)], ["--out", str(tmp_path / "x"), "--dtype", "float16"]):
        capsys.readouterr()
        assert main(["export", "--checkpoint", str(ckpt_dir), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("gpt-small export: error:") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_architecture_choice():
    assert choose_architecture(GPTConfig(pos_encoding="rope", qk_norm=True))[0] == "gpt_small"
    assert choose_architecture(GPTConfig(pos_encoding="learned", ngram=3))[0] == "gpt_small"
    assert choose_architecture(GPTConfig(pos_encoding="rope"))[0] == "gpt_neox"
    assert choose_architecture(GPTConfig(pos_encoding="sinusoidal"))[0] == "gpt2"


def test_model_card_of_a_real_run(verse_data, tmp_path):
    """A real (tiny) training run: the card quotes its whole-split figure and a command that rebuilds
    the same configs."""
    vocab = load_tokenizer_size(verse_data)
    model_cfg = GPTConfig.from_preset("tiny", vocab_size=vocab, pos_encoding="rope", qk_norm=True)
    train_cfg = TrainConfig(batch_size=4, max_steps=12, warmup_steps=2, eval_interval=6, eval_batches=2,
                            log_interval=3, threads=1, lr=2e-3)
    run = tmp_path / "run"
    trainer = Trainer(model_cfg, train_cfg, verse_data, run, show_progress=False)
    summary = trainer.fit()
    trainer.close()
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "hf")]) == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    step = load_checkpoint(run).meta["step"]
    res = summary["final_val"] if summary["steps"] == step else summary["best_checkpoint_val"]
    assert f"{res['bits_per_char']:.4f} bits/char" in card and f"{res['loss']:.4f} nats/token" in card
    assert "poems.txt" in card and "char" in card.lower()
    command = card.split("```sh\n")[1].split("\n```")[0]
    argv = shlex.split(command)
    assert argv[:2] == ["gpt-small", "train"]
    args = build_parser().parse_args(argv[1:])
    _, m, t = configs_from_args(args, vocab_size=vocab)
    assert m == model_cfg and t == train_cfg


def load_tokenizer_size(data_dir: Path) -> int:
    from gpt_small.data import PreparedData

    return PreparedData(data_dir).tokenizer.vocab_size


def test_model_card_scores_the_split_when_the_run_did_not(verse_data, tmp_path):
    """No whole-split figure recorded (final_eval off): export scores the validation split itself,
    as `gpt-small eval` would; --no-eval says it was not measured."""
    from gpt_small.evaluate import evaluate_checkpoint

    model_cfg = GPTConfig.from_preset("tiny", vocab_size=load_tokenizer_size(verse_data))
    train_cfg = TrainConfig(batch_size=4, max_steps=6, warmup_steps=2, eval_interval=3, eval_batches=2,
                            threads=1, final_eval=False)
    trainer = Trainer(model_cfg, train_cfg, verse_data, tmp_path / "run", show_progress=False)
    trainer.fit()
    trainer.close()
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    block = model_cfg.block_size  # every token once: non-overlapping windows, as the trainer's final evaluation
    want = evaluate_checkpoint(tmp_path / "run", data=verse_data, context=block, stride=block, device="cpu")
    assert f"{want['bits_per_char']:.4f} bits/char" in card and "evaluated at export" in card
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf2"), "--no-eval"]) == 0
    assert "not measured" in (tmp_path / "hf2" / "README.md").read_text()
