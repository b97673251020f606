"""Generation: cached decoding equals the uncached nanoGPT loop; sampling filters; text stopping rules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gpt_small.config import GPTConfig
from gpt_small.errors import GPTSmallError
from gpt_small.evaluate import evaluate_tokens
from gpt_small.generate import (
    apply_repetition_penalty, forced_log_prob, generate_text, generate_tokens, sample, top_p_mask, window_keep,
)
from gpt_small.model import GPT

ENCODINGS = ("learned", "sinusoidal", "rope")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The tensors here are tiny: extra OpenMP threads only add synchronisation, and on a loaded
    # 2-core machine their spin-waits made one forward of the tiny model take 250 ms instead of 0.3.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class StubCharTokenizer:
    """The tokenizer interface generate_text relies on, over a fixed alphabet."""

    def __init__(self, chars: str):
        self.chars = chars
        self.vocab_size = len(chars)

    def encode(self, text: str, *, unknown: str = "unk") -> list[int]:
        for c in text:
            if c not in self.chars:
                raise GPTSmallError(f"unknown character {c!r} in the prompt")
        return [self.chars.index(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


class StubByteTokenizer:
    """Byte-level ids, so one token may be half of a UTF-8 character (as in byte-level BPE)."""

    vocab_size = 256

    def encode(self, text: str, *, unknown: str = "unk") -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class TableModel(nn.Module):
    """A fake GPT whose next-token logits depend on the last token only: table[token] (V,)."""

    def __init__(self, table: torch.Tensor, block_size: int = 8):
        super().__init__()
        V = table.shape[0]
        self.config = GPTConfig(vocab_size=V, block_size=block_size, n_layer=1, n_head=1, n_embd=2)
        self.register_buffer("table", table.float())
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device

    def forward(self, idx, targets=None, *, input_pos=None, last_only=False):
        logits = self.table[idx]  # (B, T, V)
        return logits[:, -1:] if last_only else logits

    def setup_kv_cache(self, batch_size, max_seq_len, dtype=None):
        pass

    def clear_kv_cache(self):
        pass


def successor_model(tokenizer, successor: dict[str, str], block_size: int = 8) -> TableModel:
    """Deterministic: after character c always comes successor[c] (logit 100 against 0)."""
    V = tokenizer.vocab_size
    table = torch.zeros(V, V)
    for c, nxt in successor.items():
        table[tokenizer.encode(c)[-1], tokenizer.encode(nxt)[0]] = 100.0
    return TableModel(table, block_size)


def tiny_gpt(pos_encoding: str = "learned", **overrides) -> GPT:
    """Random weights with a wide spread (std 0.5, not GPT-2's 0.02): at the usual init greedy
    decoding collapses into one repeated token, which would test little about the window."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", pos_encoding=pos_encoding, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5)
    return model


@torch.no_grad()
def uncached_reference(model: GPT, idx: torch.Tensor, max_new_tokens: int, pick) -> torch.Tensor:
    """nanoGPT's generate: the full model on the last block_size tokens at every step."""
    for _ in range(max_new_tokens):
        logits = model(idx[:, -model.config.block_size:])[:, -1]
        idx = torch.cat((idx, pick(logits)[:, None]), dim=1)
    return idx


@torch.no_grad()
def uncached_window_reference(model: GPT, idx: torch.Tensor, max_new_tokens: int, pick, keep: int) -> torch.Tensor:
    """The window rule recomputed without a cache: the full model on seq[start:T] at every step,
    where start moves to T - 1 - keep when the window is full (generate.py's docstring)."""
    W, T0 = model.config.block_size, idx.shape[1]
    start = max(0, T0 - W)
    for _ in range(max_new_tokens):
        T = idx.shape[1]
        if T > T0 and T - 1 - start >= W:
            start = T - 1 - keep
        logits = model(idx[:, start:])[:, -1]
        idx = torch.cat((idx, pick(logits)[:, None]), dim=1)
    return idx


def run(model, prompt, n, **kw) -> torch.Tensor:
    return torch.stack(list(generate_tokens(model, prompt, max_new_tokens=n, **kw)), dim=1)


# --- cached equals uncached ---


@pytest.mark.parametrize("pos_encoding", ENCODINGS)
@pytest.mark.parametrize("T0", [5, 40])  # 40 > block_size 32: the prompt itself is cropped
@pytest.mark.parametrize("ngram", [1, 3])
def test_cached_greedy_equals_uncached_past_the_window(pos_encoding, T0, ngram):
    model = tiny_gpt(pos_encoding, ngram=ngram, ngram_buckets=4225)  # 65^2: bigrams exact, trigrams hashed
    prompt = torch.randint(0, 64, (2, T0), generator=torch.Generator().manual_seed(1))
    n = 70  # runs well past block_size = 32, so the window slides
    ours = run(model, prompt, n, temperature=0, keep="slide")  # the exact per-token slide
    ref = uncached_reference(model, prompt, n, lambda logits: logits.argmax(-1))[:, T0:]
    assert torch.equal(ours, ref)
    # the comparison means something only if greedy did not collapse into a one- or two-token loop
    assert min(len(set(row.tolist())) for row in ours) > 2


@pytest.mark.parametrize("pos_encoding", ENCODINGS)
def test_cached_sampling_equals_uncached_sampling(pos_encoding):
    # Greedy on random weights soon repeats one token; sampling keeps the contexts varied.
    model = tiny_gpt(pos_encoding)
    prompt = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    ours = run(model, prompt, 60, temperature=1.0, seed=123, keep="slide")
    g = torch.Generator().manual_seed(123)
    ref = uncached_reference(model, prompt, 60, lambda logits: sample(logits, generator=g))[:, 7:]
    assert torch.equal(ours, ref)
    assert len(set(ours[0].tolist())) > 10


# --- the window rule past block_size ---


@pytest.mark.parametrize("pos_encoding", ENCODINGS)
@pytest.mark.parametrize("keep", ["half", 0, 5, 31])  # 31 = block_size - 1, the slide's boundary
@pytest.mark.parametrize("T0", [5, 40])
def test_cached_window_rule_equals_its_uncached_recomputation(pos_encoding, keep, T0):
    model = tiny_gpt(pos_encoding, ngram=3, ngram_buckets=4225)
    prompt = torch.randint(0, 64, (2, T0), generator=torch.Generator().manual_seed(1))
    n = 100  # several moves of the window at block_size 32
    ours = run(model, prompt, n, temperature=1.0, seed=7, keep=keep)
    g = torch.Generator().manual_seed(7)
    ref = uncached_window_reference(model, prompt, n, lambda logits: sample(logits, generator=g),
                                    window_keep(32, keep))[:, T0:]
    assert torch.equal(ours, ref)
    assert len(set(ours[0].tolist())) > 10


@pytest.mark.parametrize("pos_encoding", ENCODINGS)
@pytest.mark.parametrize("keep,stride", [("half", 16), (None, 16), (5, 27), ("slide", 1), (0, 32)])
def test_forced_log_prob_through_the_window_rule_equals_eval_at_the_matching_stride(pos_encoding, keep, stride):
    # eval aligns its last window with the text's end; on 1 + block_size + k * stride tokens that
    # window is a full stride on, as every window of the generator is
    model = tiny_gpt(pos_encoding, ngram=2)
    length = 1 + 32 + max(4, 100 // stride) * stride
    tokens = torch.randint(0, 64, (length,), generator=torch.Generator().manual_seed(3))
    total, n = forced_log_prob(model, tokens, keep=keep)
    res = evaluate_tokens(model, tokens.numpy(), context=32, stride=stride, batch_size=4)
    assert n == res.tokens == length - 1
    assert abs(-total / n - res.loss) < 1e-4


def test_window_keep_defaults_to_half_and_checks_its_range():
    assert window_keep(32) == window_keep(32, "half") == 16
    assert window_keep(33) == 17  # block_size - eval's default stride (33 // 2)
    assert window_keep(1) == 0 and window_keep(32, "slide") == 31
    assert window_keep(32, 0) == 0 and window_keep(32, "31") == 31
    for bad in (32, -1, "most", 2.5, True):
        with pytest.raises(GPTSmallError, match="window keep"):
            window_keep(32, bad)


def test_default_generation_past_the_window_follows_the_half_rule():
    model = tiny_gpt("rope")
    prompt = torch.randint(0, 64, (1, 3), generator=torch.Generator().manual_seed(4))
    ours = run(model, prompt, 80, temperature=0)
    ref = uncached_window_reference(model, prompt, 80, lambda logits: logits.argmax(-1), 16)[:, 3:]
    assert torch.equal(ours, ref)


def test_top_k_1_and_temperature_0_are_greedy():
    model = tiny_gpt("rope")
    greedy = run(model, [1, 2, 3], 20, temperature=0)
    assert torch.equal(run(model, [1, 2, 3], 20, top_k=1, seed=5), greedy)
    assert torch.equal(run(model, [1, 2, 3], 20, temperature=0, top_k=5, top_p=0.5, seed=5), greedy)
    logits = torch.randn(16, 50)
    assert torch.equal(sample(logits, top_k=1), logits.argmax(-1))
    assert torch.equal(sample(logits, temperature=0), logits.argmax(-1))


def test_generation_restores_train_mode_and_frees_the_cache():
    model = tiny_gpt().train()
    run(model, [1, 2], 5, seed=0)
    assert model.training and model.kv_cache_capacity == 0


def test_batch_prompts_and_num_samples():
    model = tiny_gpt()
    out = run(model, torch.tensor([[1, 2, 3], [4, 5, 6]]), 4, num_samples=3, temperature=0)
    assert out.shape == (6, 4)
    assert torch.equal(out[0], out[2]) and torch.equal(out[3], out[5])  # greedy rows of one prompt agree


# --- sampling filters ---


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])  # shuffled, so the mask must undo the sort
    assert top_p_mask(probs, 0.8).tolist() == [[False, True, False, True]]
    assert top_p_mask(probs, 0.81).tolist() == [[True, True, False, True]]
    assert top_p_mask(probs, 0.1).tolist() == [[False, True, False, False]]  # always one token
    assert top_p_mask(probs, 1.0).all()


def test_sampling_never_returns_a_filtered_token():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    drawn = set(sample(logits, top_p=0.8, generator=g).tolist())
    assert drawn == {0, 1}
    drawn = set(sample(logits, top_k=3, generator=g).tolist())
    assert drawn == {0, 1, 2}


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]])
    prev = torch.tensor([[0, 1, 1], [3, 3, 3]])  # repeats count once
    out = apply_repetition_penalty(logits, prev, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0], [2.0, -1.0, 0.5, 1.5]]
    assert logits[0, 0] == 2.0  # pure: the input is untouched


# --- seeds ---


def test_same_seed_same_text_and_different_seeds_differ():
    tok = StubCharTokenizer("\nabcdefgh ")
    model = tiny_gpt(vocab_size=tok.vocab_size)
    a = generate_text(model, tok, "ab", max_new_tokens=50, seed=7, num_samples=2)
    assert a == generate_text(model, tok, "ab", max_new_tokens=50, seed=7, num_samples=2)
    assert a != generate_text(model, tok, "ab", max_new_tokens=50, seed=8, num_samples=2)
    assert a[0] != a[1]  # rows of a batch are independent samples
    assert all(s.startswith("ab") and len(s) == 52 for s in a)


# --- text: lines, stop, prompt, streaming ---

CYCLE = {"a": "b", "b": "\n", "\n": "a"}  # "ab\nab\nab\n..."


def test_lines_stops_after_the_nth_newline():
    tok = StubCharTokenizer("\nab")
    model = successor_model(tok, CYCLE)
    assert generate_text(model, tok, "a", lines=2, max_new_tokens=100) == ["ab\nab\n"]
    assert generate_text(model, tok, "a", lines=3, max_new_tokens=4) == ["ab\nab"]  # budget first


def test_stop_string_is_kept_and_ends_the_sample():
    tok = StubCharTokenizer("\nab")
    model = successor_model(tok, CYCLE)
    assert generate_text(model, tok, "a", stop="\na", max_new_tokens=100) == ["ab\na"]
    assert generate_text(model, tok, "a", stop="\na", lines=1, max_new_tokens=100) == ["ab\n"]


def test_empty_prompt_starts_from_a_newline():
    tok = StubCharTokenizer("\nab")
    model = successor_model(tok, CYCLE)
    assert generate_text(model, tok, "", lines=1) == ["ab\n"]  # "a" follows the implicit "\n"


def test_unknown_prompt_character_is_named():
    tok = StubCharTokenizer("\nab")
    with pytest.raises(GPTSmallError, match="'z'"):
        generate_text(successor_model(tok, CYCLE), tok, "abz")


def test_finished_rows_stop_while_others_go_on_and_stream_matches():
    # After "a" or "b" comes "a", "b" or "\n" with equal odds: lines end at random times.
    tok = StubCharTokenizer("\nab")
    table = torch.full((3, 3), 0.0)
    table[0] = torch.tensor([-100.0, 0.0, 0.0])  # no empty lines
    model = TableModel(table)
    pieces: dict[int, str] = {}
    out = generate_text(model, tok, "", lines=3, num_samples=4, temperature=1.0, seed=3,
                        max_new_tokens=500, stream=lambda i, s: pieces.__setitem__(i, pieces.get(i, "") + s))
    assert len(set(out)) > 1
    for i, sample_text in enumerate(out):
        assert sample_text.count("\n") == 3 and sample_text.endswith("\n")
        assert pieces[i] == sample_text


def test_streaming_holds_back_split_utf8_characters():
    tok = StubByteTokenizer()
    e1, e2 = "é".encode()  # two bytes, one character
    table = torch.zeros(256, 256)
    table[ord("x"), e1] = table[e1, e2] = table[e2, ord("\n")] = table[ord("\n"), ord("x")] = 100.0
    model = TableModel(table)
    pieces: list[str] = []
    out = generate_text(model, tok, "x", lines=2, stream=lambda i, s: pieces.append(s))
    assert out == ["xé\nxé\n"]
    assert "".join(pieces) == "é\nxé\n" and not any("\ufffd" in p for p in pieces)


def test_stop_callable_ends_generate_tokens_when_all_rows_stop():
    tok = StubCharTokenizer("\nab")
    model = successor_model(tok, CYCLE)
    out = run(model, [1], 50, num_samples=2, stop=lambda t: t == 0)  # 0 is "\n"
    assert out.tolist() == [[2, 0], [2, 0]]


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(num_samples=0), "num_samples"),
    (dict(lines=0), "lines"),
    (dict(stop=""), "stop"),
])
def test_bad_arguments_are_one_line_errors(kwargs, match):
    tok = StubCharTokenizer("\nab")
    with pytest.raises(GPTSmallError, match=match):
        generate_text(successor_model(tok, CYCLE), tok, "a", **kwargs)


def test_bad_prompt_ids_are_errors():
    model = tiny_gpt()
    with pytest.raises(GPTSmallError, match="token ids"):
        generate_tokens(model, [1, 64], max_new_tokens=3)
    with pytest.raises(GPTSmallError, match="at least one token"):
        generate_tokens(model, [], max_new_tokens=3)


def test_a_row_that_stopped_stays_stopped_while_the_others_go_on():
    """Rows stop at different steps: the loop ends when the last one has stopped, even though the
    first row's later tokens no longer match `stop`."""
    table = torch.zeros(4, 4)
    for token, nxt in {0: 1, 1: 0, 2: 3, 3: 0}.items():  # 1 -> 0 -> 1 ...; 2 -> 3 -> 0 -> 1 ...
        table[token, nxt] = 100.0
    out = run(TableModel(table), torch.tensor([[1], [2]]), 50, stop=lambda t: t == 0, temperature=0)
    assert out.tolist() == [[0, 1], [3, 0]]


# --- --window-keep on the command line ---


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    from serve_util import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("window") / "run")  # block_size 64


@pytest.mark.parametrize("keep", ["half", "slide", "0", "63"])
def test_cli_generate_takes_window_keep(char_run, keep, capsys):
    from gpt_small.cli import main

    assert main(["generate", "--checkpoint", str(char_run), "--prompt", "the ", "--max-new-tokens", "150",
                 "--seed", "1", "--window-keep", keep]) == 0
    assert len(capsys.readouterr().out) >= len("the ") + 150  # past the 64-token window


@pytest.mark.parametrize("verb,extra", [("generate", []), ("generate", ["--rhyme", "AABB"]), ("serve", [])])
@pytest.mark.parametrize("keep", ["64", "-1", "most"])
def test_cli_bad_window_keep_is_one_line(char_run, verb, extra, keep, capsys):
    from gpt_small.cli import main

    assert main([verb, "--checkpoint", str(char_run), "--window-keep", keep, *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "window keep" in captured.err
