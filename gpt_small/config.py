"""Configuration as data: the model and training dataclasses, the preset table, values by type.

No torch here, so `gpt-small info` and config checks stay instant. Every default lives in exactly
one place: the dataclass field, declared with `setting(default, doc, unit=, flag=, resume=)`. The
field's metadata is what the CLI turns into a flag (config_sources.py: name, help with meaning,
unit and default) and what `--resume` consults: a `resume=True` field may change mid-run
(budgets, intervals, threads, device), any other change of a saved run is refused. A value reaches
a field through `parse_value` (a flag's text or a file's typed value, parsed by the field's type)
or `from_dict` (a saved config); where the values come from (TOML, flags, --set) and in which
order they apply is config_sources.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args, get_type_hints

from . import limits
from .errors import ConfigError

# The allowed choices: each spelled once, as a Literal type; the tuples are derived from it.
Activation = Literal["relu", "gelu", "relu2"]
PosEncoding = Literal["learned", "sinusoidal", "rope"]
Schedule = Literal["cosine", "wsd", "constant"]
Optimizer = Literal["adamw", "muon"]
DType = Literal["auto", "float32", "bfloat16", "float16", "bfloat16-if-faster"]
ACTIVATIONS, POS_ENCODINGS = get_args(Activation), get_args(PosEncoding)
SCHEDULES, OPTIMIZERS, DTYPES = get_args(Schedule), get_args(Optimizer), get_args(DType)
DEVICE_RULE = "auto, cpu, mps or cuda[:N]"


def setting(default: Any, doc: str, *, unit: str = "", flag: str | None = "", resume: bool = False) -> Any:
    """A config field with its documentation. flag: the CLI flag ("" = --field-name, None = no flag);
    resume: whether a resumed run may change it (it changes no weight, no data and no schedule shape
    the saved optimizer state depends on)."""
    return field(default=default, metadata={"doc": doc, "unit": unit, "flag": flag, "resume": resume})


def check_device(name: Any) -> str:
    """The one rule for a device name, used by every verb."""
    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name):
        raise ConfigError(f"device must be {DEVICE_RULE}, got {name!r}")
    return name


def check_threads(n: Any) -> int:
    """The one rule for a thread count, used by every verb (0 = all cores; limits.MAX_THREADS at most)."""
    return limits.check_threads(n)


# GPTConfig's integer fields and their structural maximums (limits.py); memory bounds them further
# where a model is built (limits.check_fits).
_MODEL_INTS = {"vocab_size": limits.MAX_VOCAB_SIZE, "block_size": limits.MAX_BLOCK_SIZE,
               "n_layer": limits.MAX_N_LAYER, "n_head": limits.MAX_N_HEAD, "n_embd": limits.MAX_N_EMBD,
               "mlp_ratio": limits.MAX_MLP_RATIO, "ngram_buckets": limits.MAX_NGRAM_BUCKETS}


def _check_finite(obj: Any) -> None:
    # inf and NaN pass every `> 0` style check below (or fail it with a misleading message), and
    # then poison a run: lr=inf trains to NaN. No float field has a meaning for them.
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name} must be a finite number, got {value!r}")


@dataclass(kw_only=True)
class GPTConfig:
    """Shape of a decoder-only transformer."""

    vocab_size: int = setting(128, "tokens in the vocabulary (set from the tokenizer when training)", flag=None)
    block_size: int = setting(256, "longest context", unit="tokens")
    n_layer: int = setting(6, "transformer blocks")
    n_head: int = setting(6, "attention heads per block")
    n_embd: int = setting(384, "residual stream width")
    dropout: float = setting(0.0, "dropout on attention weights, residual branches and embeddings", unit="probability")
    bias: bool = setting(True, "biases in Linear layers and LayerNorms (GPT-2 has them)")
    activation: Activation = setting("relu", "feed-forward non-linearity")
    mlp_ratio: int = setting(4, "feed-forward hidden width = mlp_ratio * n_embd")
    pos_encoding: PosEncoding = setting("learned", "where positions come from", flag="--pos")
    rope_theta: float = setting(10000.0, "RoPE base: angle of pair j is pos / theta^(2j/head_size)")
    tie_embeddings: bool = setting(True, "the output head shares the token embedding matrix")
    qk_norm: bool = setting(False, "LayerNorm on each head's queries and keys before attention")
    ngram: int = setting(1, "> 1: add hashed embeddings of the 2..ngram tokens ending at each position to the input")
    ngram_buckets: int = setting(16384, "rows of each n-gram table (n-grams are hashed into them)")

    def __post_init__(self) -> None:
        _check_finite(self)
        for name, maximum in _MODEL_INTS.items():
            limits.positive_int(getattr(self, name), name, maximum)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.pos_encoding not in POS_ENCODINGS:
            raise ConfigError(
                f"pos_encoding must be one of {', '.join(POS_ENCODINGS)}, got {self.pos_encoding!r}"
            )
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.pos_encoding == "rope" and self.head_size % 2:
            raise ConfigError(f"rope needs an even head size, got n_embd/n_head = {self.head_size}")
        if self.pos_encoding == "sinusoidal" and self.n_embd % 2:
            raise ConfigError(f"sinusoidal positions need an even n_embd, got {self.n_embd}")
        if not isinstance(self.ngram, int) or isinstance(self.ngram, bool) or not 1 <= self.ngram <= 8:
            raise ConfigError(f"ngram must be 1 (token embeddings only) to 8, got {self.ngram!r}")
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta!r}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "GPTConfig":
        """The named preset with `overrides` applied (`GPTConfig.from_preset("tiny", pos_encoding="rope")`)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        return from_dict(cls, d)

    # --- closed-form sizes, used by `info`, MFU and the parameter-count tests ---

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count from the shape alone (equals the built model's)."""
        C, V, L = self.n_embd, self.vocab_size, self.n_layer
        H = self.mlp_ratio * C
        b = 1 if self.bias else 0
        ln = 2 * C if self.bias else C  # weight (+ bias)
        attn = C * 3 * C + b * 3 * C + C * C + b * C
        mlp = C * H + b * H + H * C + b * C
        qk = 2 * (2 * self.head_size if self.bias else self.head_size) if self.qk_norm else 0
        block = 2 * ln + attn + mlp + qk
        wte = V * C + (self.ngram - 1) * self.ngram_buckets * C  # lookups, not matmuls
        wpe = self.block_size * C if self.pos_encoding == "learned" else 0
        head = 0 if self.tie_embeddings else V * C
        total = wte + wpe + L * block + ln + head
        if non_embedding:  # as in nanoGPT/Kaplan: without the token, n-gram and position tables
            total -= wte + wpe
        return total

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6N for the matmuls plus attention's 6 * L * T * C (PaLM appendix B).

        N counts every matrix that is multiplied (the output head included, the embedding lookups
        not). T is the context; the causal mask halves nothing here, as is the convention for MFU.
        """
        T = seq_len or self.block_size
        N = self.num_params(non_embedding=True)  # includes an untied head already
        if self.tie_embeddings:  # the tied head is the wte matrix that non_embedding left out
            N += self.vocab_size * self.n_embd
        return 6 * N + 6 * self.n_layer * T * self.n_embd


# Token budget per verse line where generation is asked for N lines without a token cap (the CLI's
# --lines, make poem): several times a verse line of a char model, so the cap rarely cuts a poem
# short, yet it bounds a model that never writes a newline.
LINE_TOKEN_BUDGET = 200

DEFAULT_PRESET = "poem-cpu"  # the model a run builds where no preset is named
# Only what differs from the GPTConfig defaults. Parameter counts are in the README (`gpt-small info`).
PRESETS: dict[str, dict[str, Any]] = {
    # A debug size for the tests: a training step takes milliseconds.
    "tiny": dict(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32),
    # nanoGPT's "baby" shape (anchors.md shape A).
    "baby": dict(block_size=64, n_layer=4, n_head=4, n_embd=128),
    # The CPU preset that `make poem` trains in ten minutes on two cores (tuned in configs/poem-cpu.toml).
    "poem-cpu": dict(
        block_size=256, n_layer=4, n_head=4, n_embd=128, activation="relu2",
        pos_encoding="rope", bias=False, tie_embeddings=False, qk_norm=True, ngram=6, ngram_buckets=32768,
    ),
    # nanoGPT's shakespeare_char shape (anchors.md shape B).
    "shakespeare-char": dict(block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2),
    # The original project's model: 12 layers, 16 heads of 64, 1024 wide, ReLU, learned positions.
    "small-150m": dict(vocab_size=115, block_size=512, n_layer=12, n_head=16, n_embd=1024),
    # Exactly OpenAI's GPT-2 small: 124,439,808 parameters.
    "gpt2-124m": dict(
        vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, activation="gelu",
    ),
}


@dataclass(kw_only=True)
class TrainConfig:
    """How to train: optimisation, schedule, budget, evaluation and checkpoints."""

    batch_size: int = setting(12, "sequences per micro-batch (per process)", unit="sequences")
    grad_accum: int = setting(1, "micro-batches per optimizer step", unit="micro-batches")
    lr: float = setting(1e-3, "peak learning rate")
    min_lr: float = setting(1e-4, "learning rate at the end of the decay")
    warmup_steps: int = setting(100, "linear warm-up from 0 to lr", unit="steps")
    schedule: Schedule = setting("cosine", "decay shape after warm-up")
    decay_frac: float = setting(0.2, "wsd only: the last fraction of the run that decays linearly to min_lr")
    weight_decay: float = setting(0.1, "AdamW decay on matrices (never on norms, biases, position or n-gram tables)")
    head_lr_scale: float = setting(1.0, "an untied lm_head trains at lr * head_lr_scale")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    optimizer: Optimizer = setting("adamw", "muon: Muon for the blocks' matrices, AdamW for the rest")
    muon_lr: float = setting(0.02, "muon only: peak learning rate of the Muon matrices (follows the same schedule)")
    muon_momentum: float = setting(0.95, "muon only: Nesterov momentum")
    grad_clip: float = setting(1.0, "clip the gradient norm to this (0 = off)")
    max_steps: int = setting(5000, "optimizer steps (the schedule's length); 0 = no step limit: max_time "
                             "ends the run", unit="steps", resume=True)
    max_time: float = setting(0.0, "wall-clock budget (0 = none; 600, 600s, 10m, 1.5h); stops early, schedule "
                              "follows time", unit="seconds", resume=True)
    eval_interval: int = setting(250, "steps between evaluations", unit="steps", resume=True)
    eval_batches: int = setting(20, "batches in each interval evaluation (fixed windows of the val split)",
                                unit="batches")
    log_interval: int = setting(10, "steps between metrics.jsonl lines", unit="steps", resume=True)
    checkpoint_interval: int = setting(500, "steps between checkpoints (also at the end and on SIGINT/SIGTERM); 0 = none between: only at "
                                       "an improved evaluation and at the end",
                                       unit="steps", resume=True)
    final_eval: bool = setting(True, "evaluate the whole validation split at the end", resume=True)
    seed: int = setting(1337, "seeds the weights, the data order and dropout")
    device: str = setting("auto", "auto, cpu, mps or cuda[:N]; auto = cuda, then mps, then cpu", resume=True)
    dtype: DType = setting(
        "auto", "autocast dtype; auto = bf16 on CUDA, fp32 on the CPU; bfloat16-if-faster = bf16 where a timed "
        "bf16 matmul beats fp32")
    compile: bool = setting(False, "torch.compile the model")
    threads: int = setting(0, "CPU threads for torch (0 = the cores this process may use)", unit="threads", resume=True)

    def __post_init__(self) -> None:
        _check_finite(self)
        limits.positive_int(self.batch_size, "batch_size", limits.MAX_BATCH_SIZE)
        limits.positive_int(self.grad_accum, "grad_accum", limits.MAX_GRAD_ACCUM)
        for name in ("eval_interval", "eval_batches", "log_interval"):
            limits.positive_int(getattr(self, name), name, limits.MAX_STEPS)
        for name in ("warmup_steps", "max_steps", "checkpoint_interval"):  # 0: off
            limits.nonneg_int(getattr(self, name), name, limits.MAX_STEPS)
        limits.check_seed(self.seed)
        check_threads(self.threads)
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr!r}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0 < self.decay_frac <= 1:
            raise ConfigError(f"decay_frac must be in (0, 1], got {self.decay_frac!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not self.head_lr_scale > 0:
            raise ConfigError(f"head_lr_scale must be positive, got {self.head_lr_scale!r}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not self.muon_lr > 0:
            raise ConfigError(f"muon_lr must be positive, got {self.muon_lr!r}")
        if not 0 <= self.muon_momentum < 1:
            raise ConfigError(f"muon_momentum must be in [0, 1), got {self.muon_momentum!r}")
        if self.grad_clip < 0:
            raise ConfigError(f"grad_clip must be >= 0, got {self.grad_clip!r}")
        if self.max_time < 0:
            raise ConfigError(f"max_time must be >= 0 seconds, got {self.max_time!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check_device(self.device)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- values into configs, by the field's type: typed (JSON, TOML) or a flag's text ---

@functools.cache  # get_type_hints compiles every annotation; the CLI asks ~250 times to build its flags
def field_types(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


_A_TYPE = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def parse_value(cls: type, key: str, raw: Any) -> Any:
    """Convert `raw` (a string from the command line, or a TOML value) to the type of `cls.key`."""
    types = field_types(cls)
    if key not in types:
        raise ConfigError(f"unknown {cls.__name__} key {key!r}; known keys: {', '.join(types)}")
    typ = types[key]
    if getattr(typ, "__origin__", None) is Literal:
        choices = get_args(typ)
        if raw not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}, got {raw!r}")
        return raw
    if not isinstance(raw, str):
        if typ is float and isinstance(raw, int) and not isinstance(raw, bool):
            return float(raw)
        if typ is bool and not isinstance(raw, bool) or typ is int and isinstance(raw, bool):
            raise ConfigError(f"{key} must be {_A_TYPE.get(typ, typ.__name__)}, got {raw!r}")
        if not isinstance(raw, typ):
            raise ConfigError(f"{key} must be {_A_TYPE.get(typ, typ.__name__)}, got {raw!r}")
        return raw
    if typ is float and key == "max_time":
        return parse_duration(raw)  # its own message (ConfigError is a ValueError: not inside the try)
    try:
        if typ is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return typ(raw)
    except ValueError:
        raise ConfigError(f"{key} must be {_A_TYPE.get(typ, typ.__name__)}, got {raw!r}") from None


def parse_duration(text: str) -> float:
    """'90' or '90s' -> 90.0, '10m' -> 600.0, '1.5h' -> 5400.0."""
    m = re.fullmatch(r"\s*([-+]?[0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*([smh]?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(f"max_time must look like 600, 600s, 10m or 1.5h, got {text!r}")
    seconds = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2).lower()]
    if seconds < 0:  # here, not only in __post_init__, so the message quotes what was typed
        raise ConfigError(f"max_time must be >= 0 (0 = no limit), got {text!r}")
    return seconds


def from_dict(cls: type, d: dict[str, Any]) -> Any:
    """A config from a file's typed values (JSON, TOML): "32" where an integer belongs is a damaged
    file, not a flag's text, so strings are taken only by str and Literal fields."""
    types = field_types(cls)
    for k, v in d.items():
        typ = types.get(k)
        if isinstance(v, str) and typ is not None and typ is not str and getattr(typ, "__origin__", None) is not Literal:
            raise ConfigError(f"{k} must be {_A_TYPE.get(typ, typ.__name__)}, got the string {v!r}")
    return cls(**{k: parse_value(cls, k, v) for k, v in d.items()})


def apply_overrides(obj: Any, overrides: dict[str, Any]) -> Any:
    """A copy of dataclass `obj` with `overrides` parsed and applied (checks run again)."""
    parsed = {k: parse_value(type(obj), k, v) for k, v in overrides.items()}
    return dataclasses.replace(obj, **parsed)
