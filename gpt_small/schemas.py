"""One schema per JSON file gpt-small reads, checked where the file is read.

A file that parses is not yet a file we can use: `[1]` for meta.json, `"chars": 5` in a tokenizer,
`"model": null` in a checkpoint config, `"n_embd": "32"` in an imported config.json each used to
end in a KeyError or a ZeroDivisionError three calls later. `read_json(path, Schema)` reads,
parses and validates in one step and turns any failure into one `GPTSmallError` line that names the
file, the field and what was expected:

    data/x/meta.json: field 'dtype': expected one of 'uint8', 'uint16', 'uint32', got 'float64'

pydantic (strict mode: "32" is not an int, 1.0 is not an int, true is not a number) does the
checking; extra keys are allowed everywhere, since newer versions may add fields. Each schema
holds what the reader relies on; the deeper rules of a section (a model config's field ranges)
stay with their dataclass (config.py), which the reader calls next and whose message is also one
line. Bounds come from limits.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import limits
from .errors import GPTSmallError

PosInt = Annotated[int, Field(strict=True, ge=1, le=limits.C_LONG_MAX)]
Count = Annotated[int, Field(strict=True, ge=0, le=limits.C_LONG_MAX)]
Vocab = Annotated[int, Field(strict=True, ge=1, le=limits.MAX_VOCAB_SIZE)]
Ratio = Annotated[float, Field(strict=False, gt=0, allow_inf_nan=False)]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, frozen=True)


class DataMeta(_Schema):
    """`meta.json` of a prepared data folder (data.py writes it)."""

    format_version: int
    tokenizer: str
    vocab_size: Vocab
    dtype: Literal["uint8", "uint16", "uint32"]
    train_tokens: Count
    val_tokens: Count
    train_chars_per_token: Ratio
    val_chars_per_token: Ratio
    val_unknown_chars: Count = 0
    val_unknown_top: dict[str, Count] = {}


class CharTokenizerFile(_Schema):
    type: Literal["char"]
    version: Literal[1]
    chars: Annotated[list[Annotated[str, Field(min_length=1, max_length=1)]],
                     Field(min_length=1, max_length=limits.MAX_VOCAB_SIZE)]
    unk_id: Count

    @field_validator("chars")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("expected distinct characters")
        return v


class Gpt2TokenizerFile(_Schema):
    type: Literal["gpt2"]
    version: Literal[1]


class BpeModel(_Schema):
    type: Literal["BPE"]
    vocab: Annotated[dict[str, Count], Field(min_length=1, max_length=limits.MAX_VOCAB_SIZE)]
    merges: list[Any]


class BpeTokenizerFile(_Schema):
    """A Hugging Face tokenizers JSON with a byte-level BPE model (the tokenizers library checks the rest)."""

    model: BpeModel


class ModelShape(_Schema):
    """A checkpoint's model config: the shape must be there, since a missing field would take
    GPTConfig's default and build another model than the weights (on --resume the mismatch showed
    only as an optimizer state that does not fit). The values, and every other field (a newer one
    may be absent from an older file), are checked by GPTConfig.from_dict."""

    vocab_size: Any
    block_size: Any
    n_layer: Any
    n_head: Any
    n_embd: Any


class CheckpointConfig(_Schema):
    """`config.json` of a checkpoint folder (checkpoint.py writes it)."""

    format_version: int
    step: Count = 0
    model: ModelShape
    train: dict[str, Any] = {}
    data: dict[str, Any] | None = None


class RunConfig(_Schema):
    """`run_config.json` of a run folder (train.py writes it); readers use `data`."""

    model: dict[str, Any] = {}
    train: dict[str, Any] = {}
    data: str | None = None


class HFConfig(_Schema):
    """A transformers GPT-2 `config.json` (import): sizes are strict positive ints with our maximums."""

    model_type: str | None = None
    architectures: list[str] | None = None
    vocab_size: Annotated[int, Field(strict=True, ge=1, le=limits.MAX_VOCAB_SIZE)] = 50257
    n_positions: Annotated[int, Field(strict=True, ge=1, le=limits.MAX_BLOCK_SIZE)] = 1024
    n_layer: Annotated[int, Field(strict=True, ge=1, le=limits.MAX_N_LAYER)] = 12
    n_head: Annotated[int, Field(strict=True, ge=1, le=limits.MAX_N_HEAD)] = 12
    n_embd: Annotated[int, Field(strict=True, ge=1, le=limits.MAX_N_EMBD)] = 768
    n_inner: Annotated[int, Field(strict=True, ge=1, le=limits.MAX_N_EMBD * limits.MAX_MLP_RATIO)] | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: Annotated[float, Field(strict=False, allow_inf_nan=False)] = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    add_cross_attention: bool = False
    tie_word_embeddings: bool = True


class ShardIndex(_Schema):
    """`model.safetensors.index.json`: every shard a plain file name inside the model folder."""

    weight_map: Annotated[dict[str, str], Field(min_length=1)]

    @field_validator("weight_map")
    @classmethod
    def _inside(cls, v: dict[str, str]) -> dict[str, str]:
        for shard in set(v.values()):
            p = Path(shard)
            if not shard or p.is_absolute() or ".." in p.parts or "\0" in shard:
                raise ValueError(f"shard {shard!r} is not a file name inside the model folder")
        return v


S = TypeVar("S", bound=BaseModel)


def _describe(e: ValidationError) -> str:
    """The first error of a ValidationError as 'field 'a.b': expected ..., got ...'."""
    err = e.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"])
    got = err.get("input")
    shown = repr(got)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    where = f"field '{loc}': " if loc else ""
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        return f"{where}missing"
    if err["type"] == "value_error":  # our own validators say what they got
        return f"{where}{msg}"
    return f"{where}{msg[0].lower() + msg[1:]}, got {shown}"


def validate(data: Any, schema: type[S], where: str | Path) -> S:
    """`data` (already parsed) checked against `schema`; a one-line GPTSmallError naming `where`."""
    if not isinstance(data, dict):
        raise GPTSmallError(f"{where}: expected a JSON object, got {type(data).__name__} {str(data)[:40]!r}")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise GPTSmallError(f"{where}: {_describe(e)}") from None
    except RecursionError:
        raise GPTSmallError(f"{where}: nested too deeply") from None


def read_json(path: str | Path, schema: type[BaseModel] | None = None) -> Any:
    """The parsed JSON of `path` (as plain dicts and lists, as json.load gives it), after checking it
    against `schema` if one is given; every failure one line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GPTSmallError(f"{path} does not exist") from None
    except UnicodeDecodeError as e:
        raise GPTSmallError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    except OSError as e:
        from .fileio import reason

        raise GPTSmallError(f"cannot read {path}: {reason(e)}") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, and ints beyond 4300 digits
        raise GPTSmallError(f"cannot read {path}: not valid JSON ({str(e)[:120]})") from None
    if schema is not None:
        validate(data, schema, path)
    return data


def tokenizer_schema(data: Any) -> type[BaseModel]:
    """The schema a tokenizer.json claims by its "type" (char, gpt2) or its "model" (BPE)."""
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == "char":
        return CharTokenizerFile
    if kind == "gpt2":
        return Gpt2TokenizerFile
    return BpeTokenizerFile
