"""Every bound on a user-given number, and the checkers that apply them, in one place.

The CLI, the Python API, the config dataclasses and the HTTP server check numbers here, so a value
gets the same rule and the same one-line message wherever it enters (`ConfigError`, a
`GPTSmallError`). No torch and no pydantic import: the server's request decoding imports this too.

Why maximums at all: a count with no bound reaches an allocator or C (`torch.manual_seed`, a thread
pool, `torch.empty`) and fails there as MemoryError / OverflowError / RuntimeError after minutes of
work, or never. Each maximum below is far beyond any use the project has (the 150M preset, a day
of sampling) and far below what would overflow a C long. Sizes that do cost memory (the model, a
training batch) are checked against an estimate of the memory they need (`check_fits`).
"""

from __future__ import annotations

import math
import os
from typing import Any

from .errors import ConfigError

C_LONG_MAX = 2**63 - 1

# --- counts with a documented maximum (inclusive) ---
MAX_NEW_TOKENS = 1_000_000      # tokens one sample may ask for (--max-new-tokens, serve's too)
MAX_NUM_SAMPLES = 1_024         # samples per call (--num-samples); the server's n has its own cap
MAX_LINES = 100_000             # --lines, report --lines
MAX_REPORT_SAMPLES = MAX_NUM_SAMPLES  # report --samples: one generate call samples them all
MAX_SEED = C_LONG_MAX           # torch.manual_seed takes a C long
MAX_THREADS = 4_096             # --threads (0 = all cores)
MAX_SERVE_BATCH = 4_096         # serve --max-batch
# Rows the server decodes together by default: on the 2-core machine more rows gave more aggregate
# tokens/s with many clients (benchmarks/long_generation.py --max-batch-sweep, docs/serve.md).
DEFAULT_SERVE_BATCH = 32
# Sequences the server prefills in one forward pass (serve --prefill-batch): arrivals between two
# decode steps are prefilled together, this many at a time, which bounds a prefill's memory.
DEFAULT_PREFILL_BATCH = 8
MAX_SERVE_QUEUE = 1_000_000     # serve --max-queue
MAX_TOP_K = 2**24               # never more than a vocabulary (MAX_VOCAB_SIZE)
MAX_STOP_STRINGS = 4            # stop strings per request (OpenAI's limit)
# Each stop string is searched for at every token of every row (in the server, beside other
# clients' rows), so its length is a cost paid per token; 100 characters is several verse lines.
MAX_STOP_CHARS = 100
MAX_SYLLABLES = 64              # --syllables per verse line
MAX_STANZAS = 1_000             # --stanzas
MAX_CANDIDATES = 4_096          # --candidates per round
MAX_FORM_BUDGET = 1_000_000     # --budget candidate lines per verse line
MAX_STEPS = 10**12              # steps, intervals, warm-up: counts, not sizes
GPT2_VOCAB = 50257              # the gpt2 tokenizer's size (tokenizer.py checks its files against it)

# --- model and batch shapes: structural maximums; check_fits bounds them by memory too ---
MAX_VOCAB_SIZE = 2**24
MAX_BLOCK_SIZE = 2**20
MAX_N_LAYER = 1_024
MAX_N_HEAD = 1_024
MAX_N_EMBD = 2**16
MAX_MLP_RATIO = 64
MAX_NGRAM_BUCKETS = 2**24
MAX_BATCH_SIZE = 2**16          # sequences per micro-batch (train, eval --batch-size)
MAX_GRAD_ACCUM = 2**16

# --- sampling ---
# Below this temperature, sampling is greedy (argmax): logits / 1e-300 overflow to inf and softmax
# turns them into NaN. At 1e-4 the most likely token already takes all the probability a float32
# can hold unless two logits tie within ~1e-3, which argmax then breaks by index.
TEMPERATURE_FLOOR = 1e-4
MAX_TEMPERATURE = 100.0
DEFAULT_TEMPERATURE = 0.8  # generate, verse forms, report, poem and the server's /v1/poem
# A repetition penalty outside [1/100, 100] makes a logit overflow or vanish in float32 ranges
# that a char model reaches; neither end has a use (1.0 = off, 1.1-1.5 is the usual range).
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(value: Any, name: str, *, minimum: int = 0, maximum: int = C_LONG_MAX) -> int:
    """`value` as an int in [minimum, maximum], or a ConfigError naming `name` and the range."""
    if not _is_int(value) or not minimum <= value <= maximum:
        # str() of an int beyond 4,300 digits raises; its length comes from the bit count instead
        shown = (repr(value)[:40] if not _is_int(value) or abs(value) < 10**30
                 else f"an integer of ~{int(abs(value).bit_length() * math.log10(2)) + 1:,} digits")
        raise ConfigError(f"{name} must be an integer >= {minimum:,} and <= {maximum:,}, got {shown}")
    return value


def positive_int(value: Any, name: str, maximum: int = C_LONG_MAX) -> int:
    """An int in [1, maximum]."""
    return check_int(value, name, minimum=1, maximum=maximum)


def nonneg_int(value: Any, name: str, maximum: int = C_LONG_MAX) -> int:
    """An int in [0, maximum] (0 usually means off / all / none)."""
    return check_int(value, name, minimum=0, maximum=maximum)


def optional_positive_int(value: Any, name: str, maximum: int = C_LONG_MAX) -> int | None:
    return None if value is None else positive_int(value, name, maximum)


def check_float(value: Any, name: str, *, low: float = -math.inf, high: float = math.inf,
                low_open: bool = False, high_open: bool = False) -> float:
    """A finite float in the interval (open or closed at each end); ints are accepted as floats."""
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (low < value if low_open else low <= value) and (value < high if high_open else value <= high))
    if not ok:
        lo = f"{'(' if low_open else '['}{low:g}"
        hi = f"{high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{name} must be a finite number in {lo}, {hi}, got {value!r}")
    return float(value)


def positive_float(value: Any, name: str, maximum: float = math.inf) -> float:
    return check_float(value, name, low=0.0, low_open=True, high=maximum)


def probability(value: Any, name: str, *, zero_ok: bool = True, one_ok: bool = True) -> float:
    """A probability: [0, 1] by default; zero_ok/one_ok=False open that end."""
    return check_float(value, name, low=0.0, high=1.0, low_open=not zero_ok, high_open=not one_ok)


def check_seed(value: Any, name: str = "seed") -> int | None:
    """None (a fresh seed) or an int that torch.manual_seed and numpy accept."""
    return None if value is None else nonneg_int(value, name, MAX_SEED)


def check_threads(value: Any, name: str = "threads") -> int:
    """A thread count: 0 = the cores this process may use."""
    return nonneg_int(value, name, MAX_THREADS)


def check_sampling(temperature: Any, top_k: Any = None, top_p: Any = None, repetition_penalty: Any = 1.0) -> None:
    """The sampling settings shared by generate, forms and report; the server's decoder
    (serve/protocol.py) reads the same bounds, except OpenAI's lower temperature cap."""
    check_float(temperature, "temperature", low=0.0, high=MAX_TEMPERATURE)
    optional_positive_int(top_k, "top_k", MAX_TOP_K)
    if top_p is not None:
        probability(top_p, "top_p", zero_ok=False)
    check_float(repetition_penalty, "repetition_penalty", low=MIN_REPETITION_PENALTY, high=MAX_REPETITION_PENALTY)


def check_text(value: Any, name: str, *, max_chars: int, empty_ok: bool = False) -> str:
    if not isinstance(value, str) or (not value and not empty_ok) or len(value) > max_chars:
        what = "a text" if empty_ok else "a non-empty text"
        shown = f"{len(value):,} characters" if isinstance(value, str) and value else repr(value)
        raise ConfigError(f"{name} must be {what} of at most {max_chars:,} characters, got {shown}")
    return value


# --- memory ---

GiB = 2**30


def available_memory() -> int | None:
    """Bytes this machine can still give a process (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def model_bytes(params: int, *, training: bool = False, bytes_per_param: int = 4) -> int:
    """fp32 weights; training adds gradients and AdamW's two moments (4 copies in all)."""
    return params * bytes_per_param * (4 if training else 1)


def activation_bytes(*, batch_size: int, block_size: int, n_layer: int, n_embd: int, mlp_ratio: int,
                     vocab_size: int) -> int:
    """A rough fp32 estimate of what one training micro-batch keeps for its backward pass: per block
    the residual, norms, q/k/v, attention output and the MLP hidden, plus the logits and their
    gradient. Attention weights (B, nh, T, T) are left out: the fused attention kernels do not keep
    them, so the estimate stays a lower bound, and what it refuses surely cannot fit."""
    per_block = batch_size * block_size * n_embd * (8 + 2 * mlp_ratio)
    return 4 * (n_layer * per_block + 3 * batch_size * block_size * vocab_size)


def check_fits(need: int, what: str, *, available: int | None = None) -> None:
    """Refuse work that needs more memory than the machine has, before any is done."""
    have = available_memory() if available is None else available
    if have is not None and need > have:
        raise ConfigError(f"{what} needs ~{need / GiB:,.1f} GiB of memory; this machine has "
                          f"{have / GiB:,.1f} GiB available; choose a smaller size")
