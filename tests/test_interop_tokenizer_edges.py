"""Our tokenizers as transformers loads them (gpt_small/interop/hf_tokenizer.py's contract), without
a model: the exported tokenizer gives our ids and decodes to our text on awkward strings, for a
char tokenizer (with U+FFFD unknown, and with U+FFFD in its own vocabulary), our byte-level BPE and
GPT-2's; the unknown character, `<unk>` written in a text, `<|endoftext|>` written in a prompt, the
declared end-of-text token (GPT-2's only), no added BOS/EOS, no space clean-up, the maximum length.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers

from gpt_small.interop.hf_tokenizer import write_tokenizer
from gpt_small.tokenizer import CharTokenizer, gpt2_tokenizer, train_bpe

TEXT = "Shall I compare thee to a summer's day?\nThou art more lovely , and more temperate .\n" * 20
TRICKY = ["", " ", "a , b . c ' d n't", "  two  spaces\n\n", "<unk> stays text", "<|endoftext|> in a prompt",
          "caf\u00e9 \u00fc\u00df \u2014 \u00e6", "\ufffd replacement", "tab\tand\r\nreturn", "emoji \U0001F600!"]


def _load(tok, folder: Path, max_length: int = 77):
    write_tokenizer(tok, folder, max_length)
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert isinstance(hf, transformers.PreTrainedTokenizerFast) and hf.model_max_length == max_length
    return hf


def _kinds():
    return {
        "char": CharTokenizer.train(TEXT),
        "char-with-fffd": CharTokenizer.train(TEXT + "\ufffd<unk>"),  # "<unk>" as 5 known characters
        "bpe": train_bpe(TEXT, vocab_size=300),
        "gpt2": gpt2_tokenizer(),
    }


@pytest.fixture
def loaded(tmp_path):
    # per test, not per module: a mutation tool that runs only the tests reaching a function must
    # see every test that writes the files reach the writer
    root = tmp_path
    return {name: (tok, _load(tok, root / name)) for name, tok in _kinds().items()}


@pytest.mark.parametrize("name", ["char", "char-with-fffd", "bpe", "gpt2"])
def test_exported_tokenizer_gives_our_ids_and_text(loaded, name):
    ours, hf = loaded[name]
    for text in [TEXT, *TRICKY]:
        ids = ours.encode(text)
        assert hf(text)["input_ids"] == ids, text  # no BOS or EOS added
        assert hf.decode(ids) == ours.decode(ids), text  # no space clean-up (" ," stays)
    assert hf.decode(hf("more lovely , and .")["input_ids"]) == "more lovely , and ."


def test_char_unknown_is_named_fffd_unless_fffd_is_a_character(loaded):
    ours, hf = loaded["char"]
    assert "\ufffd" not in ours.chars
    assert hf.unk_token == "\ufffd" and hf.unk_token_id == ours.unk_id
    assert hf("\ufffd#")["input_ids"] == [ours.unk_id, ours.unk_id]  # both unknown to ours too
    assert hf("<unk>")["input_ids"] == ours.encode("<unk>") and len(ours.encode("<unk>")) == 5
    assert json.loads(hf.backend_tokenizer.to_str())["model"]["unk_token"] == "\ufffd"
    ours2, hf2 = loaded["char-with-fffd"]
    fffd = ours2.chars.index("\ufffd")
    assert fffd != ours2.unk_id and hf2("\ufffd")["input_ids"] == [fffd]
    assert hf2.unk_token in (None, "<unk>") and hf2("#")["input_ids"] == [ours2.unk_id]
    # the unknown id decodes to U+FFFD as ours does; "<unk>" written in a text stays itself
    assert hf2.decode([ours2.unk_id]) == ours2.decode([ours2.unk_id]) == "\ufffd"
    ids = ours2.encode("<unk>")
    assert ours2.unk_id not in ids and hf2("<unk>")["input_ids"] == ids and hf2.decode(ids) == "<unk>"


def test_only_gpt2_declares_an_end_of_text_token(loaded, tmp_path):
    _, hf = loaded["gpt2"]
    assert (hf.eos_token, hf.eos_token_id, hf.bos_token, hf.bos_token_id) == ("<|endoftext|>", 50256,
                                                                              "<|endoftext|>", 50256)
    assert hf("<|endoftext|>")["input_ids"] == gpt2_tokenizer().encode("<|endoftext|>") != [50256]
    assert hf.decode([50256]) == "<|endoftext|>"
    # in tokenizer.json itself (llama.cpp's converter reads it), not only as transformers adds it on load
    spec = json.loads((tmp_path / "gpt2" / "tokenizer.json").read_text(encoding="utf-8"))
    declared = [t for t in spec["added_tokens"] if t["content"] == "<|endoftext|>"]
    assert len(declared) == 1 and declared[0]["id"] == 50256 and declared[0]["special"]
    for name in ("char", "char-with-fffd", "bpe"):
        _, hf = loaded[name]
        assert hf.eos_token is None and hf.bos_token is None and hf.eos_token_id is None, name


def test_the_written_files_are_json_that_tokenizers_reads(tmp_path):
    write_tokenizer(CharTokenizer.train("ab\u00e9"), tmp_path, 16)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["model_max_length"] == 16
    assert config["clean_up_tokenization_spaces"] is False
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode("b\u00e9a").ids == \
        CharTokenizer.train("ab\u00e9").encode("b\u00e9a")
