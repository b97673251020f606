"""Exports where users take them: the model card's own snippet, generation at the context's edge,
EOS, permissions under the umask, a killed export, `--target` refusals, and a card that leaks no path.

The slow test builds one clean virtual environment per session from the lock's pinned wheels
(transformers, torch, safetensors, tokenizers and what they need; gpt_small is not importable
there) and runs each card's snippet as written, plus the checks the card states, in it.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from packaging.requirements import Requirement

from gpt_small.checkpoint import load_checkpoint, save_checkpoint
from gpt_small.cli import main
from gpt_small.config import GPTConfig
from gpt_small.interop.model_card import model_card, portable_command, tags
from gpt_small.model import GPT
from gpt_small.tokenizer import CharTokenizer, gpt2_tokenizer, train_bpe
from disk_util import tmpfs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TEXT = "The sea, the moon and the stars.\nO wind that blows!\n"
SHAPES = {  # name -> (preset, overrides): GPT-2 (learned, sinusoidal), GPT-NeoX, remote code
    "tiny-learned": ("tiny", dict(pos_encoding="learned", activation="gelu", bias=True, tie_embeddings=True)),
    "baby-learned": ("baby", dict(pos_encoding="learned", activation="gelu", bias=True, tie_embeddings=True)),
    "tiny-sinusoidal": ("tiny", dict(pos_encoding="sinusoidal", activation="relu", bias=False)),
    "tiny-rope": ("tiny", dict(pos_encoding="rope", activation="relu2", tie_embeddings=False)),
    "tiny-remote": ("tiny", dict(pos_encoding="rope", activation="gelu", qk_norm=True)),
}


@pytest.fixture(scope="module")
def char_tok() -> CharTokenizer:
    return CharTokenizer.train(TEXT)


def checkpoint(root: Path, name: str, tok, preset: str = "tiny", seed: int = 0, **overrides) -> Path:
    cfg = GPTConfig.from_preset(preset, **{**overrides, "vocab_size": tok.vocab_size})
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    save_checkpoint(root / name, step=3, model=model, tokenizer=tok, config={"model": cfg.to_dict()})
    return root / name


def export(ckpt: Path, out: Path, *argv: str) -> Path:
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--no-eval", *argv]) == 0
    return out


def card_snippet(folder: Path) -> str:
    """The card's Python snippet as written, with its "DIR" pointed at `folder`."""
    card = (folder / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("\n```")[0]
    assert snippet.count('"DIR"') == 2
    return snippet.replace('"DIR"', json.dumps(str(folder)))


def snippet_request(snippet: str) -> tuple[str, int]:
    m = re.search(r"\)\((.+), max_new_tokens=(\d+)\)", snippet)
    return eval(m.group(1)), int(m.group(2))  # the prompt literal the card wrote (repr of a str)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, char_tok) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runtimes")
    out = {}
    for i, (name, (preset, overrides)) in enumerate(SHAPES.items()):
        out[name] = export(checkpoint(root, name, char_tok, preset, seed=i, **overrides), root / f"{name}-hf")
    gpt2 = checkpoint(root, "tiny-gpt2tok", gpt2_tokenizer(), "tiny", pos_encoding="learned", activation="gelu")
    out["tiny-gpt2tok"] = export(gpt2, root / "tiny-gpt2tok-hf")
    return out


# ---------------------------------------------------------------- generation at the context's edge

@pytest.mark.parametrize("name", SHAPES)
def test_card_snippet_stays_within_what_the_export_can_generate(folders, name, char_tok):
    snippet = card_snippet(folders[name])
    prompt, n = snippet_request(snippet)
    block = json.loads((folders[name] / "config.json").read_text())["gpt_small"]["model"]["block_size"]
    if name == "tiny-remote":
        assert n == 60 and len(prompt) + n > block  # the remote code slides past the context
    else:
        assert len(char_tok.encode(prompt)) + n == block  # as much as the context holds, not one more


def test_card_snippet_runs_as_written_on_a_tiny_gpt2_export(folders, capfd):
    folder = folders["tiny-learned"]
    exec(card_snippet(folder), {})
    printed = capfd.readouterr().out
    prompt, n = snippet_request(card_snippet(folder))
    assert printed.startswith(prompt) and len(printed) == len(prompt) + n + 1  # one character per token, newline


def test_gpt2_export_past_the_context_fails_as_the_card_says(folders):
    """At the card's boundary: prompt + max_new_tokens = 33 (32 tokens read, the 33rd only generated)
    works, 34 raises IndexError in transformers' GPT-2 (its position table ends), as the card states;
    without max_new_tokens, generation_config stops at the context."""
    folder = folders["tiny-learned"]
    card = (folder / "README.md").read_text()
    assert "**Context: 32 tokens, prompt included.**" in card
    assert "raises `IndexError` when it must read more than 32 tokens, i.e. when prompt + `max_new_tokens` exceeds 33" \
        in card
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    ids = tok("The sea", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model.generate(ids, max_new_tokens=33 - 7, do_sample=False).shape[1] == 33
        with pytest.raises(IndexError):
            model.generate(ids, max_new_tokens=33 - 7 + 1, do_sample=False)
        assert model.generate(ids, do_sample=False).shape[1] == 32  # max_length from generation_config.json
    assert 'pass `handle_long_generation="hole"` to the pipeline' in card
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tok)
    long_prompt = "The sea, the moon and the stars. " * 2  # 66 characters
    with pytest.raises(IndexError):
        pipe(long_prompt, max_new_tokens=20, do_sample=False)
    text = pipe(long_prompt, max_new_tokens=20, do_sample=False, handle_long_generation="hole")[0]["generated_text"]
    assert text.startswith(long_prompt) and len(text) == len(long_prompt) + 20


def test_card_states_limits_temperature_licence_and_eos(folders):
    card = (folders["tiny-rope"] / "README.md").read_text()
    assert "license: other" in card and "## Licence" in card and "MIT" in card
    assert "temperature 0.8" in card and "positions the model never trained on" in card
    assert "No end-of-text token" in card
    remote = (folders["tiny-remote"] / "README.md").read_text()
    assert "slides its window" in remote
    assert "Generation stops at `<|endoftext|>` (id 50256" in (folders["tiny-gpt2tok"] / "README.md").read_text()


# ---------------------------------------------------------------- EOS

def test_gpt2_tokenizer_exports_declare_eos_everywhere(folders):
    folder = folders["tiny-gpt2tok"]
    for name in ("config.json", "generation_config.json"):
        assert json.loads((folder / name).read_text())["eos_token_id"] == 50256, name
    assert json.loads((folder / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"
    added = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
    assert {"id": 50256, "content": "<|endoftext|>", "special": True}.items() <= added[-1].items()
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 50256
    ours = gpt2_tokenizer()
    for text in ("a poem<|endoftext|>another", "<|endoftext|>", " <|endoftext|> "):  # the text stays characters
        assert tok(text)["input_ids"] == ours.encode(text), text
    assert 50256 not in tok("x<|endoftext|>y")["input_ids"]


def test_transformers_stops_at_the_declared_eos(tmp_path):
    """A model whose every prediction is <|endoftext|> (head row 50256 along ln_f's bias, the rest
    zero): transformers generates that one token and stops."""
    cfg = GPTConfig.from_preset("tiny", vocab_size=50257, pos_encoding="learned", activation="gelu",
                                tie_embeddings=False)
    model = GPT(cfg).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(torch.linspace(-1, 1, cfg.n_embd))
        model.lm_head.weight.zero_()
        model.lm_head.weight[50256] = 10 * model.transformer.ln_f.bias
    save_checkpoint(tmp_path / "run", step=1, model=model, tokenizer=gpt2_tokenizer(), config={"model": cfg.to_dict()})
    folder = export(tmp_path / "run", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ids = torch.tensor([[464, 5417]])  # "The sea"
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=10, do_sample=False)
    assert out[0].tolist() == [464, 5417, 50256]


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_tokenizers_without_an_end_of_text_declare_none(kind, tmp_path, char_tok):
    tok = char_tok if kind == "char" else train_bpe(TEXT * 50, vocab_size=300)
    folder = export(checkpoint(tmp_path, "run", tok), tmp_path / "hf")
    for name in ("config.json", "generation_config.json"):
        assert json.loads((folder / name).read_text())["eos_token_id"] is None, name
    assert "eos_token" not in json.loads((folder / "tokenizer_config.json").read_text())
    assert transformers.AutoTokenizer.from_pretrained(str(folder)).eos_token_id is None


# ---------------------------------------------------------------- permissions, a killed export

@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_exported_folder_modes_follow_the_umask_as_checkpoints_do(umask, tmp_path, char_tok):
    old = os.umask(umask)
    try:
        ckpt = checkpoint(tmp_path, "run", char_tok, qk_norm=True)  # remote code: its .py files too
        folder = export(ckpt, tmp_path / "hf")
    finally:
        os.umask(old)
    ckpt_dir = next((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask == stat.S_IMODE(ckpt_dir.stat().st_mode)
    files = sorted(folder.iterdir())
    assert {"model.safetensors", "config.json", "README.md", "modeling_gpt_small.py"} <= {f.name for f in files}
    want = 0o666 & ~umask
    assert want == stat.S_IMODE((ckpt_dir / "model.safetensors").stat().st_mode)
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: want for f in files}


PAUSED_EXPORT = textwrap.dedent("""
    import sys, time
    from gpt_small.interop import hf_export
    real = hf_export.write_tokenizer
    def write_then_pause(*args, **kwargs):  # mid-way: weights and config written, not yet renamed
        real(*args, **kwargs)
        print("paused", flush=True)
        time.sleep(600)
    hf_export.write_tokenizer = write_then_pause
    hf_export.export_checkpoint(sys.argv[1], sys.argv[2], evaluate=False)
""")


def paused_export(ckpt: Path, out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_EXPORT, str(ckpt), str(out)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout.readline() == "paused\n"
    return proc


def temp_folders(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name)


@pytest.mark.slow
def test_an_export_killed_mid_way_is_swept_by_the_next(tmp_path, char_tok):
    ckpt = checkpoint(tmp_path, "run", char_tok)
    out = tmp_path / "exports" / "hf"
    proc = paused_export(ckpt, out)
    (tmp,) = temp_folders(out.parent)
    assert re.fullmatch(rf"\.hf\.tmp-{proc.pid}-[0-9a-f]{{8}}", tmp)
    assert (out.parent / tmp / "model.safetensors").is_file() and not out.exists()
    export(ckpt, out.parent / "other")  # a live export's folder is not touched
    assert len(temp_folders(out.parent)) == 1
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not out.exists() and len(temp_folders(out.parent)) == 1
    export(ckpt, out)  # the same command again: sweeps the dead export's folder, then writes
    assert temp_folders(out.parent) == [] and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["hf", "other"]


def test_export_on_a_full_disk_gives_one_line_and_leaves_nothing(tmp_path, capsys):
    """A real 1 MB tmpfs; the weights (~6.5 MB: GPT-2's 50,257-token table) do not fit."""
    ckpt = checkpoint(tmp_path, "run", gpt2_tokenizer(), pos_encoding="learned")
    with tmpfs(tmp_path / "disk", "size=1m") as disk:
        capsys.readouterr()
        assert main(["export", "--checkpoint", str(ckpt), "--out", str(disk / "hf"), "--no-eval"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no space left on device" in err and str(disk / "hf") in err, err
        assert ".tmp-" not in err and list(disk.iterdir()) == []


# ---------------------------------------------------------------- other runtimes

@pytest.mark.parametrize("target, tokenizer, overrides, says", [
    ("vllm", "char", dict(pos_encoding="learned", tie_embeddings=False), "vLLM's GPT-2 ties the head"),
    ("vllm", "char", dict(pos_encoding="sinusoidal"), "sinusoidal positions"),
    ("vllm", "char", dict(qk_norm=True), "vLLM has no GPTSmallForCausalLM"),
    ("llama.cpp", "gpt2", dict(pos_encoding="learned", activation="relu"), "compute GELU"),
    ("llama.cpp", "gpt2", dict(pos_encoding="rope", activation="relu2"), "compute GELU"),
    ("llama.cpp", "gpt2", dict(pos_encoding="learned", activation="gelu", mlp_ratio=2), "4x MLP"),
    ("llama.cpp", "char", dict(pos_encoding="learned", activation="gelu"), "this model's is char"),
    ("llama.cpp", "gpt2", dict(ngram=3, activation="gelu"), "no GPTSmallForCausalLM"),
    ("cuda", "char", dict(), "--target must be one of transformers, vllm, llama.cpp"),
])
def test_target_refuses_what_the_runtime_would_compute_differently(target, tokenizer, overrides, says, tmp_path,
                                                                  char_tok, capsys):
    tok = char_tok if tokenizer == "char" else gpt2_tokenizer()
    ckpt = checkpoint(tmp_path, "run", tok, **overrides)
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf"), "--target", target]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and (target == "cuda" or f"cannot export for {target}:" in err)
    assert not (tmp_path / "hf").exists() and temp_folders(tmp_path) == []


@pytest.mark.parametrize("target, tokenizer, overrides, cls", [
    ("vllm", "char", dict(pos_encoding="learned", tie_embeddings=True), "GPT2LMHeadModel"),
    ("vllm", "char", dict(pos_encoding="rope", tie_embeddings=False, activation="relu2"), "GPTNeoXForCausalLM"),
    ("llama.cpp", "gpt2", dict(pos_encoding="learned", activation="gelu", tie_embeddings=False), "GPT2LMHeadModel"),
])
def test_target_accepts_what_the_runtime_computes_as_we_do(target, tokenizer, overrides, cls, tmp_path, char_tok):
    tok = char_tok if tokenizer == "char" else gpt2_tokenizer()
    folder = export(checkpoint(tmp_path, "run", tok, **overrides), tmp_path / "hf", "--target", target)
    assert json.loads((folder / "config.json").read_text())["architectures"] == [cls]


# ---------------------------------------------------------------- the model card names no local path

def test_model_card_names_no_absolute_path(verse_data, tmp_path):
    from gpt_small.data import PreparedData

    tok = PreparedData(verse_data).tokenizer
    cfg = GPTConfig.from_preset("tiny", vocab_size=tok.vocab_size)
    run = tmp_path / "home" / "me" / "runs" / "poem-ft"
    save_checkpoint(run, step=5, model=GPT(cfg), tokenizer=tok,
                    config={"model": cfg.to_dict(), "data": {"directory": str(verse_data), "tokenizer": "char"},
                            "init_from": str(tmp_path / "home" / "me" / "runs" / "base")})
    command = (f"gpt-small train --data {verse_data} --out={run} --init-from {tmp_path}/home/me/runs/base "
               f"--set train.lr=0.001")
    (run / "run_config.json").write_text(json.dumps({"model": cfg.to_dict(), "train": {}, "command": command}))
    folder = export(run, tmp_path / "hf")
    card = (folder / "README.md").read_text()
    assert str(tmp_path) not in card and "/home/me" not in card
    assert (f"gpt-small train --data data/{verse_data.name} --out=runs/poem-ft --init-from runs/base "
            "--set train.lr=0.001") in card
    assert "Fine-tuned from `runs/base`." in card
    assert "`poems.txt` (" in card and "validation the last 10% of the lines (val_fraction 0.1)" in card
    assert "tags: [gpt-small, text-generation, char-tokenizer]" in card  # a user's text: not tagged poetry

    ckpt = load_checkpoint(run)
    ckpt.meta["imported_from"] = str(tmp_path / "downloads" / "gpt2-medium")
    imported = model_card(ckpt, architecture="gpt2", reason="learned positions", dtype="float32", evaluate=False)
    assert "Imported from the transformers folder `gpt2-medium`" in imported and str(tmp_path) not in imported


def test_model_card_finds_a_relative_data_folder_beside_runs(verse_data, tmp_path):
    """A run recorded `--data data/d` from its project folder; exported from elsewhere, the card still
    reads data/d/meta.json beside runs/."""
    import shutil

    from gpt_small.data import PreparedData

    tok = PreparedData(verse_data).tokenizer
    shutil.copytree(verse_data, tmp_path / "proj" / "data" / "d")
    cfg = GPTConfig.from_preset("tiny", vocab_size=tok.vocab_size)
    save_checkpoint(tmp_path / "proj" / "runs" / "r", step=1, model=GPT(cfg), tokenizer=tok,
                    config={"model": cfg.to_dict(), "data": {"directory": "data/d", "tokenizer": "char"}})
    assert not Path("data/d").exists()  # the tests' own working folder has no such data
    card = (export(tmp_path / "proj" / "runs" / "r", tmp_path / "hf") / "README.md").read_text()
    assert "`poems.txt` (" in card and "val_fraction 0.1" in card


def test_card_tags_follow_the_data():
    assert "poetry" in tags({"source_kind": "corpus", "source": "eng-poem"}, "char")
    assert "poetry" not in tags({"source_kind": "text", "source": "poems.txt"}, "bpe")
    assert "poetry" not in tags(None, "gpt2")
    assert portable_command("gpt-small train --data 'my data/x' --out /a/b/c") == \
        "gpt-small train --data 'my data/x' --out runs/c"


# ---------------------------------------------------------------- a clean environment: transformers only

VENV_ROOTS = ("transformers", "torch", "safetensors", "tokenizers")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_requirements() -> str:
    """The lock's entries (pins and hashes) for transformers, torch, safetensors, tokenizers and
    everything they need on this platform (their installed metadata gives the closure)."""
    need, todo = set(), list(VENV_ROOTS)
    while todo:
        name = _norm(todo.pop())
        if name in need:
            continue
        need.add(name)
        for r in md.requires(name) or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    entries, current = {}, None
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==", line)
        if m:
            current = _norm(m.group(1))
            entries[current] = [line.rstrip(" \\")]
        elif current and line.strip().startswith("--hash="):
            entries[current].append("    " + line.strip().rstrip(" \\"))
        elif not line.startswith(" "):
            current = None
    assert need <= set(entries), f"not in the lock: {need - set(entries)}"
    return "\n".join(" \\\n".join(entries[n]) for n in sorted(need)) + "\n"


@pytest.fixture(scope="session")
def clean_python(tmp_path_factory) -> Path:
    """A virtual environment with the lock's transformers stack and no gpt_small, once per session
    (pip's cache and /opt/wheels keep it offline; --no-compile keeps it near a minute)."""
    root = tmp_path_factory.mktemp("clean-venv")
    (root / "requirements.txt").write_text(locked_requirements())
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    python = root / "venv" / "bin" / "python"
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                           "--no-compile", "--require-hashes", "-r", str(root / "requirements.txt")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return python


CLEAN_CHECKS = textwrap.dedent("""
    import contextlib, io, json, sys
    try:
        import gpt_small
        sys.exit("gpt_small is importable in the clean environment")
    except ImportError:
        pass
    import torch, transformers
    folders, out = json.loads(sys.argv[1]), {}
    for name, f in folders.items():
        snippet = json.loads(sys.argv[2])[name]
        printed = io.StringIO()
        torch.manual_seed(0)
        with contextlib.redirect_stdout(printed):
            exec(snippet, {})  # the card's snippet as written
        res = {"printed": printed.getvalue(), "transformers": transformers.__version__}
        cfg = json.loads(open(f + "/config.json").read())
        if cfg["model_type"] == "gpt2":  # the card's word: reading one token past the context is an IndexError
            model = transformers.AutoModelForCausalLM.from_pretrained(f)
            tok = transformers.AutoTokenizer.from_pretrained(f)
            ids = tok("The sea", return_tensors="pt")["input_ids"]
            try:
                model.generate(ids, max_new_tokens=cfg["n_positions"] + 2 - ids.shape[1], do_sample=False)
                res["past_context"] = "generated"
            except IndexError:
                res["past_context"] = "IndexError"
            res["eos"] = [cfg["eos_token_id"], model.generation_config.eos_token_id, tok.eos_token_id]
            res["endoftext_text_ids"] = tok("a<|endoftext|>b")["input_ids"]
        out[name] = res
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_card_snippets_run_in_a_clean_environment(clean_python, folders, tmp_path, char_tok):
    snippets = {name: card_snippet(f) for name, f in folders.items()}
    proc = subprocess.run([str(clean_python), "-c", CLEAN_CHECKS, json.dumps({k: str(v) for k, v in folders.items()}),
                           json.dumps(snippets)], capture_output=True, text=True, cwd=tmp_path,
                          env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "OMP_NUM_THREADS": "1",
                               "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.splitlines()[-1])
    for name, r in res.items():
        prompt, n = snippet_request(snippets[name])
        assert r["printed"].startswith(prompt), name
        if name != "tiny-gpt2tok":  # characters: one per token, and no end-of-text to stop early
            assert len(r["printed"]) == len(prompt) + n + 1, name
    for name in ("tiny-learned", "baby-learned", "tiny-sinusoidal", "tiny-gpt2tok"):
        assert res[name]["past_context"] == "IndexError", name
    assert res["tiny-gpt2tok"]["eos"] == [50256, 50256, 50256]
    assert res["tiny-gpt2tok"]["endoftext_text_ids"] == gpt2_tokenizer().encode("a<|endoftext|>b")
    assert res["tiny-learned"]["eos"] == [None, None, None]
