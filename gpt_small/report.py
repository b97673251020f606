"""`gpt-small report`: the model's poems judged as poems, against real poems of the corpus.

`make_report` samples `samples` poems of `lines` lines from a checkpoint (plain sampling, no
form), takes as many stretches of `lines` consecutive lines from the validation split, and
writes report.json, report.md and report.png:
- memorisation: the share of the poems' word 8-grams found verbatim in the training split, and
  the longest copied span with the training line it starts in. Words are verse.words (lowercase,
  punctuation dropped) and n-grams run across line ends within a poem. The training split's
  8-grams are hashed (64-bit: a per-word BLAKE2b hash combined polynomially) into a sorted array,
  built once and cached beside the prepared data (else in the gpt-small cache folder), keyed by
  the training text's SHA-256. A hit is then verified word by word (no false spans).
- form: characters and syllables per line, the share of line pairs at distance 1 and 2 that
  rhyme (verse.rhymes, spelling fallback for invented words), stanza lengths (runs of non-blank
  lines; eng-poem has no blank lines, so each stretch is one stanza);
- language: the share of words not in the CMU dictionary, distinct-1/2 (distinct unigrams and
  bigrams over their count, per poem, averaged), repetition (the share of lines that repeat an
  earlier line of the same poem, whatever their case and outer spaces);
- model: loss and bits/char on the whole validation split (evaluate.evaluate_checkpoint, stride
  = context), or on its first `eval_tokens` tokens when that is given.
The training and validation texts are the prepared folder's source file cut at its recorded
split, verified by the source's SHA-256, else the token files decoded.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import limits, verse
from .errors import GPTSmallError
from .fileio import atomic_write

N = 8  # words per n-gram
_P = np.uint64(0x100000001B3)  # FNV's 64-bit prime as the polynomial base (odd, so no bits are lost)


def _word_hashes(words: list[str]) -> np.ndarray:
    table = {w: int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little") for w in set(words)}
    return np.fromiter((table[w] for w in words), dtype=np.uint64, count=len(words))


def _ngram_hashes(wh: np.ndarray, n: int = N) -> np.ndarray:
    """(len - n + 1,) polynomial hashes of every n consecutive word hashes, modulo 2**64."""
    if len(wh) < n:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(len(wh) - n + 1, dtype=np.uint64)
    for k in range(n):  # uint64 arrays wrap modulo 2**64 (numpy checks no overflow on arrays)
        h = h * _P + wh[k:len(wh) - n + 1 + k]
    return h


@dataclass
class NGramIndex:
    """The training text's word n-grams: sorted hashes with their word positions."""

    word_hash: np.ndarray  # (W,) uint64, one per training word
    word_line: np.ndarray  # (W,) uint32, the line each word is on
    sorted_hash: np.ndarray  # (W - n + 1,) uint64
    sorted_pos: np.ndarray  # (W - n + 1,) uint32, where each n-gram starts

    @classmethod
    def build(cls, text: str) -> "NGramIndex":
        words, lines = [], []
        for i, line in enumerate(text.split("\n")):
            ws = verse.words(line)
            words.extend(ws)
            lines.extend([i] * len(ws))
        wh = _word_hashes(words)
        h = _ngram_hashes(wh)
        order = np.argsort(h, kind="stable")
        return cls(wh, np.asarray(lines, dtype=np.uint32), h[order], order.astype(np.uint32))

    @classmethod
    def cached(cls, text: str, folders: list[Path]) -> "NGramIndex":
        key = hashlib.sha256(text.encode()).hexdigest()
        name = f"ngrams{N}-{key[:16]}.npz"
        for folder in folders:
            path = folder / name
            if path.is_file():
                try:
                    with np.load(path) as z:
                        return cls(z["word_hash"], z["word_line"], z["sorted_hash"], z["sorted_pos"])
                except (OSError, ValueError, KeyError):
                    pass  # a damaged cache is rebuilt
        index = cls.build(text)
        for folder in folders:
            try:
                atomic_write(folder / name, lambda f: np.savez(
                    f, word_hash=index.word_hash, word_line=index.word_line, sorted_hash=index.sorted_hash,
                    sorted_pos=index.sorted_pos))
                break
            except GPTSmallError:
                continue  # read-only data folder: try the next
        return index

    def positions(self, h: int) -> np.ndarray:
        lo = np.searchsorted(self.sorted_hash, np.uint64(h), side="left")
        hi = np.searchsorted(self.sorted_hash, np.uint64(h), side="right")
        return self.sorted_pos[lo:hi]


def memorisation(poems: list[list[str]], index: NGramIndex, train_lines: list[str], *,
                 max_sources: int = 16) -> dict[str, Any]:
    """Share of the poems' word n-grams in the training text, and the longest verbatim copy."""
    total = found = 0
    best = (0, -1, -1, -1)  # (words, poem, first word in poem, training word position)
    for p, poem in enumerate(poems):
        words = [w for line in poem for w in verse.words(line)]
        wh = _word_hashes(words)
        h = _ngram_hashes(wh)
        total += len(h)
        if not len(h):
            continue
        hit = np.isin(h, index.sorted_hash)
        found += int(hit.sum())
        for i in np.flatnonzero(hit):
            for pos in index.positions(int(h[i]))[:max_sources]:
                pos = int(pos)
                k = 0
                while i + k < len(wh) and pos + k < len(index.word_hash) and wh[i + k] == index.word_hash[pos + k]:
                    k += 1
                if k >= N and k > best[0]:
                    best = (k, p, int(i), pos)
    out: dict[str, Any] = {"ngram": N, "ngrams": total, "ngrams_found": found,
                           "share_found": found / total if total else 0.0, "longest_copy_words": best[0]}
    if best[0]:
        k, p, i, pos = best
        words = [w for line in poems[p] for w in verse.words(line)]
        line_no = int(index.word_line[pos])
        out.update(longest_copy=" ".join(words[i:i + k]), longest_copy_poem=p + 1,
                   source_line_number=line_no + 1, source_line=train_lines[line_no])
    return out


# ---------------------------------------------------------------- form and language

def form_stats(poems: list[list[str]]) -> dict[str, Any]:
    lengths, syllables, stanzas = [], [], []
    pairs = {1: [0, 0], 2: [0, 0]}  # distance -> [rhyming, total]
    for poem in poems:
        run = 0
        for line in poem + [""]:
            if line.strip():
                run += 1
            elif run:
                stanzas.append(run)
                run = 0
        verses = [line for line in poem if line.strip()]
        lengths.extend(len(line) for line in verses)
        syllables.extend(verse.line_syllables(line) for line in verses)
        ends = [verse.last_word(line) for line in verses]
        for d in (1, 2):
            for a, b in zip(ends, ends[d:]):
                pairs[d][1] += 1
                pairs[d][0] += verse.rhymes(a, b)
    return {"line_chars": lengths, "line_syllables": syllables, "stanza_lines": stanzas,
            "rhyme_share_distance_1": pairs[1][0] / pairs[1][1] if pairs[1][1] else 0.0,
            "rhyme_share_distance_2": pairs[2][0] / pairs[2][1] if pairs[2][1] else 0.0}


def language_stats(poems: list[list[str]]) -> dict[str, float]:
    words_all, d1, d2, repeats, n_lines = [], [], [], 0, 0
    for poem in poems:
        ws = [w for line in poem for w in verse.words(line)]
        words_all.extend(ws)
        if ws:
            d1.append(len(set(ws)) / len(ws))
        bigrams = list(zip(ws, ws[1:]))
        if bigrams:
            d2.append(len(set(bigrams)) / len(bigrams))
        seen = set()
        for line in poem:
            key = line.strip().casefold()  # caseless as Unicode defines it: "Straße" repeats "STRASSE"
            if not key:
                continue
            n_lines += 1
            repeats += key in seen
            seen.add(key)
    return {"words": len(words_all),
            "oov_share": sum(not verse.in_dictionary(w) for w in words_all) / len(words_all) if words_all else 0.0,
            "distinct_1": statistics.fmean(d1) if d1 else 0.0, "distinct_2": statistics.fmean(d2) if d2 else 0.0,
            "repeated_line_share": repeats / n_lines if n_lines else 0.0}


def _summary(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"mean": 0.0, "sd": 0.0, "median": 0.0}
    return {"mean": statistics.fmean(xs), "sd": statistics.pstdev(xs), "median": float(statistics.median(xs))}


# ---------------------------------------------------------------- texts

def split_texts(data: Any) -> tuple[str, str]:
    """(training text, validation text) of a PreparedData folder."""
    meta = data.meta
    path = Path(meta.get("source_path", ""))
    if meta.get("source_kind") == "corpus" and path.is_file():
        raw = path.read_bytes()
        if hashlib.sha256(raw).hexdigest() == meta.get("source_sha256"):
            cut = meta["train_bytes"]
            return raw[:cut].decode("utf-8"), raw[cut:].decode("utf-8")
    # a text folder, a moved or changed source: the token files are the split
    return data.tokenizer.decode(np.asarray(data.train).tolist()), data.tokenizer.decode(np.asarray(data.val).tolist())


def corpus_poems(val_text: str, samples: int, lines: int) -> list[list[str]]:
    """`samples` stretches of `lines` non-blank consecutive lines, evenly spaced over the text."""
    rows = [line for line in val_text.split("\n") if line.strip()]
    if len(rows) < lines:
        raise GPTSmallError(f"the validation split has {len(rows)} non-blank lines, fewer than --lines {lines}")
    starts = np.linspace(0, len(rows) - lines, samples).round().astype(int)
    return [rows[s:s + lines] for s in starts]


# ---------------------------------------------------------------- the report

def make_report(checkpoint: str | Path, *, samples: int = 50, out: str | Path | None = None,
                data: str | Path | None = None, lines: int = 14, seed: int = 0,
                temperature: float = limits.DEFAULT_TEMPERATURE, eval_tokens: int | None = None,
                device: str = "auto", window_keep: int | str | None = None) -> dict[str, Any]:
    from .checkpoint import load_checkpoint
    from .corpus import cache_dir
    from .data import PreparedData
    from .device import pick_device
    from .evaluate import evaluate_tokens
    from .config import LINE_TOKEN_BUDGET
    from .generate import generate_text, window_keep as check_keep
    from .tokenizer import same_tokenizer

    limits.positive_int(samples, "samples", limits.MAX_REPORT_SAMPLES)
    limits.positive_int(lines, "lines", limits.MAX_LINES)
    limits.check_seed(seed)
    limits.check_sampling(temperature)
    if eval_tokens is not None:
        limits.check_int(eval_tokens, "eval_tokens", minimum=2)
    dev = pick_device(device)
    ckpt = load_checkpoint(checkpoint, device=dev)
    check_keep(ckpt.model_config.block_size, window_keep)
    run_dir = Path(checkpoint)
    if data is None:
        from .run_folder import read_run_config

        recorded = next(filter(None, map(read_run_config, (run_dir, ckpt.path.parent.parent))), None)
        data = recorded.get("data") if recorded else None
        if data is None:
            raise GPTSmallError(f"no --data given and {run_dir} records no data folder; pass --data")
    prepared = PreparedData(data)
    if not same_tokenizer(ckpt.tokenizer, prepared.tokenizer):
        raise GPTSmallError(f"{prepared.directory} was prepared with another tokenizer than the checkpoint's")
    out = Path(out) if out is not None else run_dir / "report"  # the run's, or the checkpoint folder's given
    out.mkdir(parents=True, exist_ok=True)

    train_text, val_text = split_texts(prepared)
    real = corpus_poems(val_text, samples, lines)
    texts = generate_text(ckpt.model, ckpt.tokenizer, "", max_new_tokens=LINE_TOKEN_BUDGET * lines, lines=lines,
                          num_samples=samples, temperature=temperature, seed=seed, keep=window_keep)
    made = [t.split("\n")[:lines] for t in texts]

    index = NGramIndex.cached(train_text, [prepared.directory, cache_dir() / "ngrams"])
    train_lines = train_text.split("\n")
    tokens = prepared.val[:eval_tokens]  # all of it for None
    ctx = ckpt.model_config.block_size
    res = evaluate_tokens(ckpt.model, tokens, context=ctx, stride=ctx, batch_size=8,
                          chars_per_token=prepared.chars_per_token("val"), device=dev)
    sides = {}
    for name, poems in (("model", made), ("corpus", real)):
        form = form_stats(poems)
        sides[name] = {"memorisation": memorisation(poems, index, train_lines), "form": form,
                       "language": language_stats(poems),
                       "line_chars": _summary(form["line_chars"]), "line_syllables": _summary(form["line_syllables"]),
                       "stanza_lines": _summary(form["stanza_lines"])}
    result = {
        "checkpoint": str(ckpt.path), "step": ckpt.meta.get("step"), "data": str(prepared.directory),
        "samples": samples, "lines": lines, "seed": seed, "temperature": temperature,
        "window_keep": check_keep(ckpt.model_config.block_size, window_keep),
        "model_eval": {"loss": res.loss, "bits_per_char": res.bits_per_char, "tokens": res.tokens,
                       "whole_split": eval_tokens is None or eval_tokens >= len(prepared.val)},
        "model": sides["model"], "corpus": sides["corpus"],
        "poems": {"model": made, "corpus": real},
    }
    _write_together(out, {"report.json": json.dumps(result, indent=1, ensure_ascii=False) + "\n",
                          "report.md": format_markdown(result),
                          "report.png": lambda f: plot_report(result, f)})
    result["out"] = str(out)
    return result


def _write_together(out: Path, files: dict[str, Any]) -> None:
    """Write every file to a temporary beside it first, then rename them all: a full disk or a
    failed plot leaves the previous report whole (none of its three files replaced)."""
    import os

    from .fileio import fsync_dir, remove_quietly, write_error, write_temp

    temps: list[tuple[Path, Path]] = []
    try:
        for name, data in files.items():
            temps.append((write_temp(out / name, data)[0], out / name))
        for tmp, path in temps:
            try:
                os.replace(tmp, path)
            except OSError as e:
                raise write_error(path, e) from None
    finally:
        for tmp, _ in temps:
            remove_quietly(tmp)  # gone already where renamed
    fsync_dir(out)


_ROWS = [  # (label, side path, format)
    ("word 8-grams found in the training text", ("memorisation", "share_found"), "{:.1%}"),
    ("longest verbatim copy (words)", ("memorisation", "longest_copy_words"), "{}"),
    ("characters per line (mean)", ("line_chars", "mean"), "{:.1f}"),
    ("syllables per line (mean +- sd)", ("line_syllables",), "syl"),
    ("line pairs rhyming at distance 1", ("form", "rhyme_share_distance_1"), "{:.1%}"),
    ("line pairs rhyming at distance 2", ("form", "rhyme_share_distance_2"), "{:.1%}"),
    ("stanza length in lines (mean)", ("stanza_lines", "mean"), "{:.1f}"),
    ("words not in the CMU dictionary", ("language", "oov_share"), "{:.1%}"),
    ("distinct-1", ("language", "distinct_1"), "{:.3f}"),
    ("distinct-2", ("language", "distinct_2"), "{:.3f}"),
    ("lines repeating an earlier line", ("language", "repeated_line_share"), "{:.1%}"),
]


def _cell(side: dict, path: tuple, fmt: str) -> str:
    v = side
    for k in path:
        v = v[k]
    return f"{v['mean']:.1f} +- {v['sd']:.1f}" if fmt == "syl" else fmt.format(v)


def report_line(r: dict[str, Any]) -> str:
    """One line: the model's headline figures."""
    m, e = r["model"], r["model_eval"]
    return (f"loss {e['loss']:.4f} ({e['bits_per_char']:.3f} bits/char), 8-grams copied "
            f"{m['memorisation']['share_found']:.1%} (corpus {r['corpus']['memorisation']['share_found']:.1%}), "
            f"rhyme d1/d2 {m['form']['rhyme_share_distance_1']:.0%}/{m['form']['rhyme_share_distance_2']:.0%}, "
            f"invented words {m['language']['oov_share']:.1%}")


def format_markdown(r: dict[str, Any]) -> str:
    e = r["model_eval"]
    out = [f"# Poem report: {r['checkpoint']} (step {r['step']})", "",
           f"{r['samples']} poems of {r['lines']} lines sampled at temperature {r['temperature']} (seed {r['seed']}), "
           f"against {r['samples']} stretches of {r['lines']} lines of the validation split of {r['data']}.", "",
           f"Model: validation loss {e['loss']:.4f} nats/token, {e['bits_per_char']:.4f} bits/char over "
           f"{e['tokens']:,} tokens ({'the whole split' if e['whole_split'] else 'the start of the split'}).", "",
           "| | model | corpus |", "| --- | ---: | ---: |"]
    for label, path, fmt in _ROWS:
        out.append(f"| {label} | {_cell(r['model'], path, fmt)} | {_cell(r['corpus'], path, fmt)} |")
    mem = r["model"]["memorisation"]
    if mem.get("longest_copy"):
        out += ["", f"Longest copy ({mem['longest_copy_words']} words, poem {mem['longest_copy_poem']}): "
                f"\"{mem['longest_copy']}\"; the training text's line {mem['source_line_number']:,}: "
                f"\"{mem['source_line']}\""]
    out += ["", "A sample:", "", "```", *r["poems"]["model"][0], "```", ""]
    return "\n".join(out)


def plot_report(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), dpi=100)
    colours = {"model": "tab:blue", "corpus": "tab:orange"}
    for ax, key, title in ((axes[0, 0], "line_chars", "characters per line"),
                           (axes[0, 1], "line_syllables", "syllables per line"),
                           (axes[1, 0], "stanza_lines", "stanza length (lines)")):
        data = {s: r[s]["form"][key] for s in ("model", "corpus")}
        top = max([1] + [max(v) for v in data.values() if v])
        bins = np.arange(0, top + 2) - 0.5 if top <= 40 else np.linspace(0, top + 1, 41)
        for s, v in data.items():
            if v:
                ax.hist(v, bins=bins, alpha=0.55, density=True, label=s, color=colours[s])
        ax.set_title(title)
        ax.legend()
    labels = ["8-grams\ncopied", "rhyme\nd=1", "rhyme\nd=2", "not in\ndictionary", "distinct-1", "distinct-2",
              "repeated\nlines"]
    ax = axes[1, 1]
    x = np.arange(len(labels))
    for j, s in enumerate(("model", "corpus")):
        side = r[s]
        vals = [side["memorisation"]["share_found"], side["form"]["rhyme_share_distance_1"],
                side["form"]["rhyme_share_distance_2"], side["language"]["oov_share"],
                side["language"]["distinct_1"], side["language"]["distinct_2"],
                side["language"]["repeated_line_share"]]
        ax.bar(x + (j - 0.5) * 0.4, vals, width=0.4, label=s, color=colours[s])
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title("shares")
    ax.legend()
    e = r["model_eval"]
    fig.suptitle(f"{Path(r['checkpoint']).name}: {r['samples']} poems x {r['lines']} lines vs the validation split; "
                 f"{e['bits_per_char']:.3f} bits/char")
    fig.tight_layout()
    fig.savefig(path, format="png")  # a path or an open file
    plt.close(fig)
