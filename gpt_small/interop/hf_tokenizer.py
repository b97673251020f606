"""Our tokenizers as Hugging Face `tokenizer.json` files that `PreTrainedTokenizerFast` loads.

Contract: for every string (lone surrogates aside, which Rust strings cannot hold) the exported
tokenizer gives exactly the ids of ours, and decodes them to the same text.

  char  a WordLevel model over the vocabulary, behind a pre-tokenizer that cuts every code point
        apart (regex `[\\s\\S]`), and a Fuse decoder that joins them again. The unknown id is named
        U+FFFD, the character ours decodes it to (or `<unk>` where U+FFFD is itself in the
        vocabulary: a vocabulary maps one name to one id; the decoder then writes that `<unk>` back
        as U+FFFD, as ours decodes it). Characters are never special tokens, so `<unk>` in a text
        stays 5 characters.
  bpe   our tokenizer.json is already the `tokenizers` JSON: written as it is.
  gpt2  the byte-level BPE built from GPT-2's tables. `<|endoftext|>` (50256) is declared the EOS
        token (and BOS, as GPT-2's own files do), so that transformers and llama.cpp stop there;
        `split_special_tokens` keeps the literal text "<|endoftext|>" in a prompt encoded as the
        characters it is, as ours does, instead of matching it as that one id.

Char and our own BPE tokenizers have no end-of-text token (none is in their vocabulary), so their
exports declare none (eos_token_id null): generation runs to max_new_tokens, as `gpt-small generate`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..fileio import atomic_write
from ..tokenizer import ByteLevelTokenizer, CharTokenizer, Tokenizer

UNK_NAME = "\ufffd"


GPT2_EOS = "<|endoftext|>"


def eos_token(tok: Tokenizer) -> tuple[str, int] | None:
    """(text, id) of the tokenizer's end-of-text token, or None where it has none."""
    if tok.kind == "gpt2":
        return GPT2_EOS, tok.hf.token_to_id(GPT2_EOS)
    return None


def char_unk_name(tok: CharTokenizer) -> str:
    return UNK_NAME if UNK_NAME not in tok.chars else "<unk>"


def tokenizer_json(tok: Tokenizer) -> dict[str, Any]:
    """The Hugging Face `tokenizers` JSON that encodes and decodes as `tok` does."""
    if isinstance(tok, CharTokenizer):
        unk = char_unk_name(tok)
        vocab = {c: i for i, c in enumerate(tok.chars)}
        vocab[unk] = tok.unk_id
        decoder: dict[str, Any] = {"type": "Fuse"}
        if unk != UNK_NAME:  # each token is replaced alone, so the 5 characters "<unk>" of a text stay
            decoder = {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": unk}, "content": UNK_NAME}, decoder]}
        return {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated",
                              "invert": False},
            "post_processor": None,
            "decoder": decoder,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": unk},
        }
    if isinstance(tok, ByteLevelTokenizer):
        spec = json.loads(tok.hf.to_str())
        eos = eos_token(tok)
        if eos and not any(t["content"] == eos[0] for t in spec.get("added_tokens") or []):
            spec["added_tokens"] = [*(spec.get("added_tokens") or []), {
                "id": eos[1], "content": eos[0], "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True}]
        return spec
    raise TypeError(f"no Hugging Face form for {tok!r}")


def tokenizer_config(tok: Tokenizer, model_max_length: int) -> dict[str, Any]:
    """tokenizer_config.json: PreTrainedTokenizerFast, no space clean-up (it would change the text)."""
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "add_bos_token": False, "add_eos_token": False,
    }
    if isinstance(tok, CharTokenizer) and char_unk_name(tok) == UNK_NAME:
        config["unk_token"] = UNK_NAME  # matched as a special token: U+FFFD is unknown to ours too
    eos = eos_token(tok)
    if eos:
        config.update(eos_token=eos[0], bos_token=eos[0], split_special_tokens=True)
    return config


def write_tokenizer(tok: Tokenizer, directory: str | Path, model_max_length: int) -> None:
    directory = Path(directory)
    atomic_write(directory / "tokenizer.json", json.dumps(tokenizer_json(tok), ensure_ascii=False))
    atomic_write(directory / "tokenizer_config.json",
                 json.dumps(tokenizer_config(tok, model_max_length), indent=2, ensure_ascii=False) + "\n")
