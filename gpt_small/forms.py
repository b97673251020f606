"""Writing in a form: lines, stanzas, syllables per line and a rhyme scheme, met at sampling time.

The model writes one line at a time. For each line:
1. sample `candidates` whole lines in one batch from the poem so far (the prefix is run through
   the model once and its KV cache copied to every row: form_calls.py), recording each line's
   log-probability under the model (temperature 1, whatever the sampling temperature);
2. keep the most probable line that meets the constraints (verse.py: syllables within the
   tolerance by the CMU dictionary, rhyme with its group's first word by the dictionary, not the
   same word twice in a group; a group's first word needs `min_rhymes` dictionary rhymes and
   must not rhyme with another group);
3. when none does and the line must rhyme, try endings: cut the best sampled lines before their
   last word (the stems) and score stem + each dictionary word that fits (a rhyme of the group's
   word, with the syllables the line still needs) by the model's log-probability, teacher-forced
   from the stem's KV cache; the words are first ranked by the probability of their first token
   (the first where they part: after a character tokenizer's space, say; on a tie the shorter
   word first, then the alphabetical) and the best `endings` are scored in full;
4. repeat until a line meets the form or `budget` candidate lines (sampled or scored) are spent.
   Then the line that breaks the fewest constraints (the most probable among those) is kept and
   the poem's metadata lists the line as over budget with what it breaks. Nothing loops further.

Contract: the same model, prompt, form, search settings and seed give the same poem. The model
sees lines separated by single newlines (the built-in corpus has no blank lines); stanza breaks
are blank lines in the returned text only. Works with any tokenizer of tokenizer.py: lines end at
the first sampled token whose text holds a newline.
"""

from __future__ import annotations

import functools
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import limits, verse
from .config import LINE_TOKEN_BUDGET
from .errors import GPTSmallError
from .form_calls import ModelCalls
from .generate import TextTokenizer, check_sampling_args, prompt_text, window_keep


@dataclass(kw_only=True)
class Form:
    """What to write. `rhyme` is a scheme (verse.parse_scheme) or a named one ("sonnet")."""

    lines: int | None = None  # verse lines; default: the scheme's length
    stanzas: int | None = None  # blank-line-separated stanzas; default: the scheme's, else 1
    syllables: int | None = None  # target syllables per line (None: any)
    tolerance: int = 1  # a line may have syllables +- this many
    rhyme: str | None = None  # "ABAB", "AABB", "ABAB CDCD EFEF GG", "sonnet", ...

    def __post_init__(self) -> None:
        limits.optional_positive_int(self.lines, "lines", limits.MAX_LINES)
        limits.optional_positive_int(self.stanzas, "stanzas", limits.MAX_STANZAS)
        limits.optional_positive_int(self.syllables, "syllables", limits.MAX_SYLLABLES)
        limits.nonneg_int(self.tolerance, "syllable tolerance", limits.MAX_SYLLABLES)
        if self.rhyme is not None and not self.rhyme.strip():
            raise GPTSmallError("rhyme must name a scheme (ABAB, AABB, sonnet, ...), got an empty text")
        if self.lines is None and self.rhyme is None:
            raise GPTSmallError("a form needs --lines or --rhyme")

    def plan(self) -> list[list[str | None]]:
        """Stanzas of per-line rhyme letters (None: the line need not rhyme)."""
        if self.rhyme is not None:
            stanzas = verse.parse_scheme(self.rhyme)
            total = sum(map(len, stanzas))
            if len(stanzas) == 1 and (self.lines or self.stanzas):  # one stanza repeats with fresh letters
                times = math.ceil(self.lines / total) if self.lines else self.stanzas
                stanzas = verse.repeat_scheme(stanzas[0], times)
                if self.lines:  # the last repetition may be cut short
                    flat = "".join(stanzas)[:self.lines]
                    stanzas = [flat[i:i + total] for i in range(0, len(flat), total)]
            elif self.lines is not None and self.lines != total:
                raise GPTSmallError(f"--lines {self.lines} does not match rhyme scheme {self.rhyme!r} "
                                    f"({total} lines); leave --lines out or give a one-stanza scheme to repeat")
            letters: list[str | None] = [c for s in stanzas for c in s]
            sizes = [len(s) for s in stanzas]
        else:
            letters, sizes = [None] * self.lines, [self.lines]
        if self.stanzas is not None and self.stanzas != len(sizes):
            n, k = len(letters), self.stanzas
            if k > n:
                raise GPTSmallError(f"--stanzas {k} is more than the poem's {n} lines")
            sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
        # a letter used once has nothing to rhyme with
        counts = Counter(letters)
        letters = [c if counts[c] > 1 else None for c in letters]
        out, i = [], 0
        for size in sizes:
            out.append(letters[i:i + size])
            i += size
        return out


@dataclass(kw_only=True)
class SearchConfig:
    """How hard to look for lines that fit."""

    candidates: int = 16  # lines sampled per round, in one batch
    budget: int = 512  # candidate lines (sampled or scored) per verse line at most
    endings: int = 64  # dictionary words scored per stem when the sampled lines miss the rhyme
    stems: int = 4  # stems (best sampled lines less their last word) tried per round
    min_rhymes: int = 3  # a rhyme group's first word needs this many rhyming dictionary words
    max_line_tokens: int | None = None  # default: LINE_TOKEN_BUDGET, at most half the model's block_size
    batch_rows: int = 128  # rows per forward pass when scoring endings

    def __post_init__(self) -> None:
        limits.positive_int(self.candidates, "search candidates", limits.MAX_CANDIDATES)
        limits.positive_int(self.budget, "search budget", limits.MAX_FORM_BUDGET)
        for name in ("endings", "stems", "batch_rows"):
            limits.positive_int(getattr(self, name), f"search {name}", limits.MAX_CANDIDATES)
        if self.max_line_tokens is not None and self.max_line_tokens < 2:
            raise GPTSmallError(f"max_line_tokens must be >= 2, got {self.max_line_tokens!r}")


@dataclass
class Poem:
    text: str  # prompt + poem, stanzas apart by blank lines
    lines: list[str]  # the verse lines (the first includes the prompt's unfinished line)
    meta: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- constraints

MAX_POOL = 2000  # dictionary words ranked per stem at most (Judge.ending_words)


@functools.cache
def _rhymable_words(min_rhymes: int) -> tuple[tuple[str, int, int], ...]:
    """(word, fewest, most syllables) of the plain dictionary words with >= min_rhymes rhymes."""
    index = verse.rhyme_index()
    out = set()
    for key, ws in index.items():
        if len(ws) > min_rhymes:
            out.update(ws)
    return tuple((w, *verse.syllable_range(w)) for w in sorted(out))


@dataclass
class _Candidate:
    text: str  # the whole line, without its newline
    log_prob: float
    violations: list[str]
    how: str  # "sampled" or "ending"

    @property
    def ok(self) -> bool:
        return not self.violations


class _Judge:
    """The constraints of one line, given the poem so far."""

    def __init__(self, form: Form, search: SearchConfig, letter: str | None, group_words: dict[str, str],
                 used: dict[str, set[str]]):
        self.form, self.search, self.letter = form, search, letter
        self.partner = group_words.get(letter)  # None: the line opens its group, or need not rhyme
        self.others = [w for c, w in group_words.items() if c != letter]
        self.used = used  # group letter -> its end words so far

    def word_ok(self, word: str) -> str | None:
        """Why `word` cannot end this line, or None."""
        if self.letter is None:
            return None
        if not verse.in_dictionary(word):
            return f"{word!r} is not in the dictionary"
        # by the dictionary: `word` is in it, and so is every group's word (it passed this check)
        if self.partner is not None:
            if word in self.used[self.letter]:
                return f"{word!r} is already a rhyme of group {self.letter}"
            if not verse.rhymes(word, self.partner):
                return f"{word!r} does not rhyme with {self.partner!r}"
            return None
        if len(verse.rhyming_words(word)) < self.search.min_rhymes:
            return f"{word!r} has fewer than {self.search.min_rhymes} rhymes"
        for other in self.others:
            if other == word or verse.rhymes(word, other):
                return f"{word!r} rhymes with {other!r} of another group"
        return None

    def syllables_ok(self, lo: int, hi: int) -> bool:
        t, tol = self.form.syllables, self.form.tolerance
        return t is None or (hi >= t - tol and lo <= t + tol)

    def check(self, line: str) -> list[str]:
        ws = verse.words(line)
        if not ws:
            return ["no words"]
        bad = []
        lo, hi = verse.line_syllable_range(line)
        if not self.syllables_ok(lo, hi):
            bad.append(f"{lo if lo == hi else f'{lo}-{hi}'} syllables, not {self.form.syllables}"
                       f"+-{self.form.tolerance}")
        why = self.word_ok(ws[-1])
        if why:
            bad.append(why)
        return bad

    def ending_words(self, stem: str) -> list[str]:
        """Dictionary words that may end a line beginning with `stem`, syllables included."""
        if self.partner is not None:
            pool = [(w, *verse.syllable_range(w)) for w in verse.rhyming_words(self.partner)
                    if w not in self.used[self.letter]]
        else:  # a new group: any word with enough rhymes that rhymes with no other group's word
            taken = set(self.others).union(*(verse.rhyming_words(o) for o in self.others))
            pool = [e for e in _rhymable_words(self.search.min_rhymes) if e[0] not in taken]
        lo, hi = verse.line_syllable_range(stem)
        fits = [w for w, a, b in pool if self.syllables_ok(lo + a, hi + b)]
        # The dictionary has no frequencies; short words are the common ones (Zipf), and only the
        # shortest MAX_POOL are ranked by the model, which keeps a 100k-word pool cheap to encode.
        return sorted(fits, key=lambda w: (len(w), w))[:MAX_POOL]


def _stem(line: str) -> str | None:
    """The line up to its last word (trailing space dropped), or None when that leaves no word."""
    matches = list(verse._WORD.finditer(line.lower().replace("\u2019", "'")))
    if len(matches) < 2:
        return None
    return line[:matches[-1].start()].rstrip()


# ---------------------------------------------------------------- the poem

def _newline_mask(tokenizer: TextTokenizer, vocab_size: int, device: torch.device) -> Tensor:
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    for i in range(vocab_size):
        if "\n" in tokenizer.decode([i]):
            mask[i] = True
    if not bool(mask.any()):
        raise GPTSmallError("the tokenizer has no token holding a newline, so the model cannot end a line")
    return mask


def compose(model: nn.Module, tokenizer: TextTokenizer, form: Form, *, prompt: str = "",
            search: SearchConfig | None = None, temperature: float = limits.DEFAULT_TEMPERATURE,
            top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
            keep: int | str | None = None,
            calls: Callable[[Tensor, dict, list[int]], ModelCalls] | None = None,
            on_line: Callable[[dict[str, Any]], None] | None = None) -> Poem:
    """Write a poem in `form`, continuing `prompt`; see the module docstring. `keep`: the window
    rule past the context (generate.window_keep). `calls(newline, sampling, banned)` gives the
    object that runs the model (default: ModelCalls on `model`, whose KV cache it then owns for the
    poem's length); `on_line` hears of each line as it is chosen."""
    search = search or SearchConfig()
    check_sampling_args(temperature, top_k, top_p)
    plan = form.plan()
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    block = model.config.block_size
    max_line = search.max_line_tokens or LINE_TOKEN_BUDGET
    max_line = max(2, min(max_line, block // 2))
    # generate.py's window rule, line by line: while the poem and a line fit the window, all of it
    # is context; past that, the last `keep` tokens (no more than leaves room for a line)
    context_tokens = max(1, min(window_keep(block, keep), block - max_line))
    newline = _newline_mask(tokenizer, model.config.vocab_size, device)
    banned = [u] if (u := getattr(tokenizer, "unk_id", None)) is not None else []
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    own_model = calls is None
    lm = (ModelCalls(model, newline, generator, sampling, banned, search.batch_rows) if own_model
          else calls(newline, sampling, banned))

    base = prompt_text(prompt)
    tokenizer.encode(base, unknown="error")
    head = base.rpartition("\n")[2]  # the prompt's unfinished line ("" when it ends with a newline)
    lines: list[str] = []
    group_words: dict[str, str] = {}
    used: dict[str, set[str]] = {}
    line_meta: list[dict[str, Any]] = []
    was_training = model.training
    if own_model:
        model.eval()
    try:
        for s, stanza in enumerate(plan):
            for letter in stanza:
                judge = _Judge(form, search, letter, group_words, used)
                context = base + "".join(line[len(head) if k == 0 else 0:] + "\n" for k, line in enumerate(lines))
                line_head = head if not lines else ""
                ids = tokenizer.encode(context)
                if len(ids) + max_line > block:
                    ids = ids[-context_tokens:]
                prefix = torch.tensor(ids, dtype=torch.long, device=device)
                best, tried = _write_line(lm, tokenizer, judge, prefix, line_head, search, max_line, block)
                word = verse.last_word(best.text)
                if letter is not None and word and best.ok:
                    group_words.setdefault(letter, word)
                    used.setdefault(letter, set()).add(word)
                lines.append(best.text)
                lo, hi = verse.line_syllable_range(best.text)
                line_meta.append({"line": len(lines), "stanza": s + 1, "rhyme": letter, "text": best.text,
                                  "end_word": word, "syllables": lo if lo == hi else [lo, hi],
                                  "log_prob": round(best.log_prob, 4), "how": best.how, "candidates": tried,
                                  "met": best.ok, "violations": best.violations,
                                  "over_budget": not best.ok})
                if on_line is not None:
                    on_line(line_meta[-1])
    finally:
        if own_model:
            model.clear_kv_cache()
            model.train(was_training)

    body, k = [], 0
    for stanza in plan:
        body.append("\n".join(lines[k:k + len(stanza)]))
        k += len(stanza)
    poem = "\n\n".join(body) + "\n"
    text = prompt[:len(prompt) - len(head)] + poem  # the unfinished line is the poem's first
    over = [m["line"] for m in line_meta if m["over_budget"]]
    meta = {
        "form": {**asdict(form), "plan": [" ".join("".join(c or "x" for c in st) for st in plan)]},
        "search": asdict(search), "seed": seed, "temperature": temperature,
        "all_met": not over, "over_budget_lines": over,
        "candidates": sum(m["candidates"] for m in line_meta),
        "seconds": round(time.perf_counter() - t0, 3), "lines": line_meta,
    }
    return Poem(text=text, lines=lines, meta=meta)


def _write_line(lm: ModelCalls, tokenizer: TextTokenizer, judge: _Judge, prefix: Tensor, head: str,
                search: SearchConfig, max_line: int, block: int) -> tuple[_Candidate, int]:
    pool: list[_Candidate] = []
    stems_tried: set[str] = set()
    tried = 0
    while tried < search.budget:
        n = min(search.candidates, search.budget - tried)
        for ids, lp, ended in lm.sample_lines(prefix, n, max_line):
            text = head + tokenizer.decode(ids).partition("\n")[0]  # to the first newline
            bad = judge.check(text) + ([] if ended else [f"no newline within {max_line} tokens"])
            pool.append(_Candidate(text, lp, bad, "sampled"))
        tried += n
        if any(c.ok for c in pool):
            break
        if judge.letter is None:  # the endings are for a line that must rhyme
            continue
        # endings: the most probable sampled lines, cut before their last word, with dictionary words
        stems = []
        # finished lines first; a line cut at max_line_tokens still gives a stem (the ending ends it)
        unfinished = lambda c: any("no newline" in v for v in c.violations)  # noqa: E731
        for c in sorted((c for c in pool if c.how == "sampled"), key=lambda c: (unfinished(c), -c.log_prob)):
            stem = _stem(c.text)
            if stem is not None and len(stem) >= len(head) and stem not in stems_tried:
                stems.append(stem)
                stems_tried.add(stem)
            if len(stems) == search.stems:
                break
        for stem in stems:
            if tried >= search.budget:
                break
            cands = _score_endings(lm, tokenizer, judge, prefix, head, stem,
                                   min(search.endings, search.budget - tried), block)
            tried += len(cands)
            pool.extend(cands)
        if any(c.ok for c in pool):
            break
    # a line that meets the form has no violations: it wins, the most probable among them
    best = max(pool, key=lambda c: (-len(c.violations), c.log_prob))
    return best, tried


def _score_endings(lm: ModelCalls, tokenizer: TextTokenizer, judge: _Judge, prefix: Tensor, head: str,
                   stem: str, limit: int, block: int) -> list[_Candidate]:
    stem_ids = tokenizer.encode(stem[len(head):], unknown="unk")
    endings = []
    for w in judge.ending_words(stem):
        ids = tokenizer.encode(" " + w + "\n", unknown="unk")
        if getattr(tokenizer, "unk_id", None) in ids:  # a character the vocabulary lacks
            continue
        endings.append((w, ids))
    if not endings:
        return []
    keep = block - len(stem_ids) - max(len(e) for _, e in endings)
    if keep < 1:
        return []
    prefix = prefix[-keep:]  # prefix + stem + ending within the model's block
    # rank by the probability of each word's first token after their common leading tokens (a char
    # tokenizer's space): one forward pass, then only the best `limit` are scored in full
    common = 0
    while all(len(e) > common + 1 and e[common] == endings[0][1][common] for _, e in endings):
        common += 1
    ctx = torch.cat((prefix, prefix.new_tensor(stem_ids + endings[0][1][:common])))
    first = lm.next_token_logprobs(ctx)
    ranked = sorted(endings, key=lambda e: (-float(first[e[1][common]]), len(e[0]), e[0]))[:limit]
    scores = lm.score_continuations(prefix, [stem_ids + e for _, e in ranked])
    out = []
    for (w, _), lp in zip(ranked, scores):
        text = f"{stem} {w}"
        out.append(_Candidate(text, lp, judge.check(text), "ending"))
    return out


def summary(meta: dict[str, Any]) -> str:
    """One line for the terminal: the form, whether it was met, the work done."""
    f = meta["form"]
    parts = [f"{len(meta['lines'])} lines"]
    if f["rhyme"]:
        parts.append(f"rhyme {meta['form']['plan'][0]}")
    if f["syllables"]:
        parts.append(f"{f['syllables']}+-{f['tolerance']} syllables")
    state = ("every line meets the form" if meta["all_met"] else
             f"budget spent on line(s) {', '.join(map(str, meta['over_budget_lines']))}: "
             + "; ".join(f"line {m['line']}: {', '.join(m['violations'])}" for m in meta["lines"] if m["over_budget"]))
    return f"form: {', '.join(parts)}; {state}; {meta['candidates']:,} candidate lines in {meta['seconds']:.1f} s"
