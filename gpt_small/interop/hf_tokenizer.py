"""Our tokenizers as Hugging Face `tokenizer.json` files that `PreTrainedTokenizerFast` loads.

Contract: for every string (lone surrogates aside, which Rust strings cannot hold) the exported
tokenizer gives exactly the ids of ours, and decodes them to the same text.

  char  a WordLevel model over the vocabulary, behind a pre-tokenizer that cuts every code point
        apart (regex `[\\s\\S]`), and a Fuse decoder that joins them again. The unknown id is named
        U+FFFD, the character ours decodes it to (or `<unk>` where U+FFFD is itself in the
        vocabulary). Characters are never special tokens, so `<unk>` in a text stays 5 characters.
  bpe   our tokenizer.json is already the `tokenizers` JSON: written as it is.
  gpt2  the byte-level BPE built from GPT-2's tables. `<|endoftext|>` stays an ordinary token, as in
        ours: declared as a special token, transformers would match the literal text
        "<|endoftext|>" in a prompt and give another id than ours.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..tokenizer import ByteLevelTokenizer, CharTokenizer, Tokenizer

UNK_NAME = "\ufffd"


def char_unk_name(tok: CharTokenizer) -> str:
    return UNK_NAME if UNK_NAME not in tok.chars else "<unk>"


def tokenizer_json(tok: Tokenizer) -> dict[str, Any]:
    """The Hugging Face `tokenizers` JSON that encodes and decodes as `tok` does."""
    if isinstance(tok, CharTokenizer):
        unk = char_unk_name(tok)
        vocab = {c: i for i, c in enumerate(tok.chars)}
        vocab[unk] = tok.unk_id
        return {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated",
                              "invert": False},
            "post_processor": None,
            "decoder": {"type": "Fuse"},
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": unk},
        }
    if isinstance(tok, ByteLevelTokenizer):
        return json.loads(tok.hf.to_str())
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
    return config


def write_tokenizer(tok: Tokenizer, directory: str | Path, model_max_length: int) -> None:
    directory = Path(directory)
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer_json(tok), ensure_ascii=False), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(tok, model_max_length), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
