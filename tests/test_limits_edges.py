"""limits.py's checkers at their exact edges, as their docstrings state them: the last accepted
value accepted, the first refused value refused with the one-line message naming the value's name
and its range; bools are not numbers; None where a checker documents it."""

from __future__ import annotations

import math

import pytest

from gpt_small import limits as L
from gpt_small.errors import ConfigError


def _refused(fn, *args, match: str | None = None, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    if match is not None:
        assert match in msg, msg
    return msg


def test_check_int_is_inclusive_at_both_ends_and_names_the_range():
    assert L.check_int(3, "n", minimum=3, maximum=7) == 3
    assert L.check_int(7, "n", minimum=3, maximum=7) == 7
    assert _refused(L.check_int, 2, "n", minimum=3, maximum=7) == "n must be an integer >= 3 and <= 7, got 2"
    _refused(L.check_int, 8, "n", minimum=3, maximum=7, match="got 8")
    _refused(L.check_int, 1_000_000, "n", maximum=999_999, match="<= 999,999, got 1000000")  # thousands separators
    for not_int in (True, False, 3.0, "3", None):
        _refused(L.check_int, not_int, "n", match=f"got {not_int!r}")
    # the defaults: [0, C long max]
    assert L.check_int(0, "n") == 0 and L.check_int(L.C_LONG_MAX, "n") == L.C_LONG_MAX
    _refused(L.check_int, -1, "n", match=">= 0 and")
    _refused(L.check_int, L.C_LONG_MAX + 1, "n")


def test_a_huge_integer_is_described_not_printed():
    msg = _refused(L.check_int, 10**5000, "n")
    assert "an integer of ~5,001 digits" in msg and len(msg) < 200
    assert _refused(L.check_int, 10**29 * 2, "n").endswith(f"got {10**29 * 2}")  # below 10**30: shown
    assert "digits" in _refused(L.check_int, -(10**30), "n")


def test_positive_nonneg_optional_and_their_maximums():
    assert L.positive_int(1, "n") == 1 and L.positive_int(5, "n", 5) == 5
    _refused(L.positive_int, 0, "n", match=">= 1 and")
    _refused(L.positive_int, 6, "n", 5, match="<= 5,")
    assert L.nonneg_int(0, "n") == 0 and L.nonneg_int(5, "n", 5) == 5
    _refused(L.nonneg_int, 6, "n", 5)
    assert L.optional_positive_int(None, "n") is None and L.optional_positive_int(5, "n", 5) == 5
    _refused(L.optional_positive_int, 0, "n")
    _refused(L.optional_positive_int, 6, "n", 5)


def test_check_float_open_and_closed_ends():
    assert L.check_float(1, "x", low=1.0, high=2.0) == 1.0 and isinstance(L.check_float(1, "x"), float)
    assert L.check_float(2.0, "x", low=1.0, high=2.0) == 2.0
    assert _refused(L.check_float, 1.0, "x", low=1.0, high=2.0, low_open=True) == \
        "x must be a finite number in (1, 2], got 1.0"
    assert _refused(L.check_float, 2.0, "x", low=1.0, high=2.0, high_open=True) == \
        "x must be a finite number in [1, 2), got 2.0"
    _refused(L.check_float, 0.999, "x", low=1.0)
    _refused(L.check_float, 2.001, "x", high=2.0)
    for bad in (math.nan, math.inf, -math.inf, True, "1", None):
        _refused(L.check_float, bad, "x")
    assert L.positive_float(1e-300, "x") == 1e-300 and L.positive_float(3.0, "x", 3.0) == 3.0
    _refused(L.positive_float, 0.0, "x", match="(0, inf]")
    _refused(L.positive_float, 3.5, "x", 3.0)


def test_probability_ends():
    assert L.probability(0.0, "p") == 0.0 and L.probability(1.0, "p") == 1.0
    _refused(L.probability, 0.0, "p", zero_ok=False, match="(0, 1]")
    _refused(L.probability, 1.0, "p", one_ok=False, match="[0, 1)")
    assert L.probability(1.0, "p", zero_ok=False) == 1.0 and L.probability(0.0, "p", one_ok=False) == 0.0
    _refused(L.probability, -1e-9, "p")
    _refused(L.probability, 1 + 1e-9, "p")


def test_seed_threads_and_sampling_bounds():
    assert L.check_seed(None) is None and L.check_seed(0) == 0 and L.check_seed(L.MAX_SEED) == L.MAX_SEED
    _refused(L.check_seed, -1, match="seed must be")
    _refused(L.check_seed, L.MAX_SEED + 1)
    assert L.check_threads(0) == 0 and L.check_threads(L.MAX_THREADS) == L.MAX_THREADS
    _refused(L.check_threads, L.MAX_THREADS + 1, match="threads must be an integer >= 0 and <= 4,096")
    L.check_sampling(0.0, None, None, 1.0)  # temperature 0 = greedy; top_k/top_p off
    L.check_sampling(L.MAX_TEMPERATURE, L.MAX_TOP_K, 1.0, L.MIN_REPETITION_PENALTY)
    L.check_sampling(1.0, 1, 1e-9, L.MAX_REPETITION_PENALTY)
    _refused(L.check_sampling, L.MAX_TEMPERATURE * 1.0001, match="temperature")
    _refused(L.check_sampling, -1e-9, match="temperature")
    _refused(L.check_sampling, 1.0, 0, match="top_k")
    _refused(L.check_sampling, 1.0, L.MAX_TOP_K + 1, match="top_k")
    _refused(L.check_sampling, 1.0, None, 0.0, match="top_p")
    _refused(L.check_sampling, 1.0, None, 1.0001, match="top_p")
    _refused(L.check_sampling, 1.0, None, None, L.MIN_REPETITION_PENALTY * 0.999, match="repetition_penalty")
    _refused(L.check_sampling, 1.0, None, None, L.MAX_REPETITION_PENALTY * 1.001, match="repetition_penalty")


def test_check_text_edges():
    assert L.check_text("abc", "stop", max_chars=3) == "abc"
    assert _refused(L.check_text, "abcd", "stop", max_chars=3) == \
        "stop must be a non-empty text of at most 3 characters, got 4 characters"
    assert _refused(L.check_text, "", "stop", max_chars=3) == \
        "stop must be a non-empty text of at most 3 characters, got ''"
    assert L.check_text("", "stop", max_chars=3, empty_ok=True) == ""
    assert "must be a text of at most 1,000 characters" in _refused(L.check_text, None, "s", max_chars=1000,
                                                                    empty_ok=True)
    _refused(L.check_text, 5, "s", max_chars=3, match="got 5")


def test_memory_estimates_and_check_fits():
    assert L.model_bytes(10) == 40 and L.model_bytes(10, training=True) == 160
    assert L.model_bytes(10, bytes_per_param=2) == 20
    a = dict(batch_size=2, block_size=3, n_layer=4, n_embd=5, mlp_ratio=4, vocab_size=7)
    assert L.activation_bytes(**a) == 4 * (4 * 2 * 3 * 5 * (8 + 2 * 4) + 3 * 2 * 3 * 7)
    L.check_fits(L.GiB, "a model", available=L.GiB)  # exactly what is there fits
    assert _refused(L.check_fits, L.GiB + 1, "a model", available=L.GiB) == \
        "a model needs ~1.0 GiB of memory; this machine has 1.0 GiB available; choose a smaller size"
    have = L.available_memory()
    assert have is None or have > 0
    L.check_fits(0, "nothing")
