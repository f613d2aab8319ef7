"""Cleaning steps of the data stage: text normalisation, boilerplate, exact and near dedup.

Plain functions over strings and lists of keys; the pipeline decides which ones run and
counts what they drop. The dedup functions return, for every item, the index of the item
it duplicates (None: keep it), so the caller can both filter and report.

Protection: items marked `protected` (rows of explicit validation/test sources) are never
removed and win over unprotected ones whatever their order. A training row that repeats a
validation/test row is therefore the one dropped, and nothing leaks from train into eval.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from datasketch import MinHash, MinHashLSH

__all__ = [
    "DEFAULT_BOILERPLATE", "dedup_key", "exact_duplicates", "find_boilerplate", "near_duplicates",
    "normalize_text", "shingles", "strip_boilerplate",
]

# --------------------------------------------------------------------------------------
# Normalisation

# Zero-width joiners carry meaning (emoji sequences, Persian/Indic scripts): keep them.
_KEEP_FORMAT_CHARS = {"\u200c", "\u200d"}
_NEWLINES = re.compile(r"\r\n|[\r\x0b\x0c\x85\u2028\u2029]")
_INNER_SPACE = re.compile(r"(?<=\S)[^\S\n]+(?=\S)")  # a run of horizontal space between two words
_TRAILING_SPACE = re.compile(r"[^\S\n]+(?=\n|$)")
_BLANK_LINES = re.compile(r"\n{3,}")
_ASCII_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _is_invisible(ch: str) -> bool:
    """Control (Cc) and format (Cf: zero-width space, BOM, soft hyphen, bidi marks) characters."""
    if ch in "\n\t" or ch in _KEEP_FORMAT_CHARS:
        return False
    return unicodedata.category(ch) in ("Cc", "Cf")


@lru_cache(maxsize=None)
def _invisible_table() -> dict[int, None]:
    """str.translate table deleting invisible characters of the BMP (covers practically all)."""
    return {c: None for c in range(0x10000) if _is_invisible(chr(c))}


def normalize_text(text: str, unicode_form: str | None = "NFKC", whitespace: bool = True) -> str:
    """Normalise Unicode and whitespace so equal-looking texts compare (and tokenize) equal.

    - `unicode_form` ("NFKC", "NFC", ... or None): NFKC folds full-width forms, ligatures,
      non-breaking spaces, superscript digits etc. onto their plain equivalents.
    - Line breaks (\\r\\n, \\r, U+2028, ...) become \\n; control and zero-width characters
      (except \\n, \\t, ZWJ/ZWNJ) are removed. This is done whatever `whitespace` says.
    - `whitespace`: strip the text and trailing space of every line, collapse runs of
      spaces/tabs between words to one space, keep at most one blank line (two \\n in a row).
      Single newlines and leading indentation are kept: they structure lists, poems and code.
    """
    if text.isascii() and text.replace("\n", " ").isprintable():
        # Printable ASCII and \n only (most text): no Unicode form, control character or odd line
        # break to fix. Without a double space, a space before a line break or a run of blank lines,
        # the whitespace rules below change nothing but the ends either.
        if not whitespace:
            return text
        if "  " not in text and " \n" not in text and "\n\n\n" not in text:
            return text.strip()
    return _normalize(text, unicode_form, whitespace)


def _normalize(text: str, unicode_form: str | None, whitespace: bool) -> str:
    """normalize_text for any text (no shortcut)."""
    if text.isascii():  # ASCII is NFKC-invariant; its only invisibles are C0 controls and DEL
        text = _ASCII_CONTROLS.sub("", _NEWLINES.sub("\n", text))
    else:
        if unicode_form:
            text = unicodedata.normalize(unicode_form, text)
        text = _NEWLINES.sub("\n", text).translate(_invisible_table())
    if whitespace:
        text = _INNER_SPACE.sub(" ", text)
        text = _TRAILING_SPACE.sub("", text)
        text = _BLANK_LINES.sub("\n\n", text).strip()
    return text


# --------------------------------------------------------------------------------------
# Boilerplate

DEFAULT_BOILERPLATE: tuple[str, ...] = (
    "As an AI language model",
    "As a large language model",
    "As an AI assistant",
    "As an AI developed by",
    "As an artificial intelligence",
    "I'm sorry, but as an AI",
    "I am sorry, but as an AI",
    "I'm just an AI",
    "I am an AI language model",
    "I cannot fulfill that request",
    "I cannot fulfill this request",
    "I can't assist with that",
    "I don't have personal opinions",
    "I do not have personal opinions",
    "I don't have personal feelings",
)


def _phrase_pattern(phrase: str) -> str:
    """Regex for a phrase: any whitespace between words, straight or curly apostrophe, whole words."""
    words = [re.escape(w).replace("'", "['\u2019]") for w in phrase.split()]
    body = r"\s+".join(words)
    start = r"\b" if phrase[:1].isalnum() else ""
    end = r"\b" if phrase[-1:].isalnum() else ""
    return start + body + end


@lru_cache(maxsize=64)
def _anchors(phrases: tuple[str, ...]) -> tuple[str, ...]:
    """The longest plain word of each phrase: a match is impossible unless one of them occurs,
    which a substring test rules out far faster than the regex for almost every text. Each
    anchor once, and none that contains another (finding "assist" covers "assistant")."""
    words = dict.fromkeys(max((w for w in p.lower().split() if w.isalnum()), key=len, default=p.lower())
                          for p in phrases)
    return tuple(w for w in words if not any(other != w and other in w for other in words))


@lru_cache(maxsize=64)
def _boilerplate_regex(phrases: tuple[str, ...]) -> tuple[re.Pattern[str] | None, tuple[str, ...]]:
    """One alternation with a group per phrase: one scan of the text finds any of them."""
    phrases = tuple(p for p in phrases if p.strip())
    if not phrases:
        return None, phrases
    return re.compile("|".join(f"({_phrase_pattern(p)})" for p in phrases), re.IGNORECASE), phrases


def find_boilerplate(text: str, phrases: Sequence[str] = DEFAULT_BOILERPLATE) -> str | None:
    """The first boilerplate phrase found in `text` (as written in `phrases`), or None.

    Case-insensitive, on whole words ("has an AI" does not match "as an AI"), tolerant of
    extra whitespace and of curly apostrophes.
    """
    regex, phrases = _boilerplate_regex(tuple(phrases))
    lowered = text.lower()
    if regex is None or not any(map(lowered.__contains__, _anchors(phrases))):
        return None
    match = regex.search(text)
    return phrases[match.lastindex - 1] if match is not None else None


_SENTENCE_BREAK = re.compile(r"[.!?]+[\"')\]]*[^\S\n]+|\n")  # end of a sentence, or of a line
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)|(?=\n)|$")


def strip_boilerplate(text: str, phrases: Sequence[str] = DEFAULT_BOILERPLATE) -> str:
    """Remove every sentence that contains a boilerplate phrase; return the rest, stripped.

    "As an AI language model, I can't browse. However, 2 + 2 = 4." -> "However, 2 + 2 = 4."
    Sentences end at . ! ? followed by whitespace, or at a line break; the other lines keep
    their layout. May return "" when the whole text was boilerplate (the caller decides).
    """
    regex, _ = _boilerplate_regex(tuple(phrases))
    if regex is None:
        return text.strip()
    while (match := regex.search(text)) is not None:
        begin = 0
        for brk in _SENTENCE_BREAK.finditer(text, 0, match.start()):
            begin = brk.end()
        end = _SENTENCE_END.search(text, match.end()).end()
        rest = text[end:].lstrip(" \t")
        if (begin == 0 or text[begin - 1] == "\n") and rest.startswith("\n"):
            rest = rest[1:]  # the sentence was a whole line: drop its line break too
        text = text[:begin] + rest
    return text.strip()


# --------------------------------------------------------------------------------------
# Dedup


def dedup_key(text: str) -> str:
    """What two texts must share to be duplicates: casefolded, whitespace collapsed."""
    return " ".join(text.casefold().split())


def _check_protected(keys: Sequence[str], protected: Sequence[bool] | None) -> list[bool]:
    if protected is None:
        return [False] * len(keys)
    if len(protected) != len(keys):
        raise ValueError(f"protected has {len(protected)} entries for {len(keys)} keys")
    return [bool(p) for p in protected]


def _protected_first(protected: list[bool]) -> list[int]:
    """Visiting order of the dedup passes: protected items first, then the rest, each in order."""
    return [i for i, p in enumerate(protected) if p] + [i for i, p in enumerate(protected) if not p]


def exact_duplicates(keys: Sequence[str], protected: Sequence[bool] | None = None) -> list[int | None]:
    """For each key, the index of an earlier-kept key it equals after `dedup_key`, or None (keep).

    Unprotected items keep their first occurrence. Protected items are always kept (even
    when they repeat each other) and win over unprotected ones regardless of order: an
    unprotected item equal to a protected one points at the first such protected item.
    Keys are compared by a 128-bit hash of the normalised text, so memory stays small.
    """
    is_protected = _check_protected(keys, protected)
    seen: dict[bytes, int] = {}
    out: list[int | None] = [None] * len(keys)
    for i in _protected_first(is_protected):
        digest = hashlib.blake2b(dedup_key(keys[i]).encode("utf-8"), digest_size=16).digest()
        first = seen.setdefault(digest, i)
        if first != i and not is_protected[i]:
            out[i] = first
    return out


def shingles(text: str, size: int = 5) -> set[bytes]:
    """Character `size`-grams of `dedup_key(text)`, UTF-8 encoded (the whole text if shorter).

    Character n-grams rather than word n-grams: on short texts (a prompt, a one-line answer)
    a single changed word changes only about len(word) + size - 1 of them, so small edits
    keep a high Jaccard similarity, while word 5-grams of a 20-word text would mostly change.
    """
    key = dedup_key(text)
    if len(key) <= size:
        return {key.encode("utf-8")}
    return {key[i:i + size].encode("utf-8") for i in range(len(key) - size + 1)}


def _minhashes(keys: Sequence[str], num_perm: int, shingle: int, seed: int) -> list[MinHash]:
    """One MinHash per key. `MinHash.generator` shares the permutations between all of them;
    zlib.crc32 (C, deterministic) hashes the shingles about twice as fast as the default SHA-1,
    and datasketch's affine32 scheme mixes its output before permuting, so estimates are as good.
    """
    from datasketch import MinHash

    gen = MinHash.generator((shingles(k, shingle) for k in keys), num_perm=num_perm, seed=seed, hashfunc=zlib.crc32)
    return list(gen)


def _lsh_index(threshold: float, num_perm: int) -> MinHashLSH:
    """An LSH index tuned for recall: its candidates are re-checked against the threshold anyway,
    so a false positive costs one comparison while a false negative is a missed duplicate.
    Weights (0.05, 0.95) give b=12 bands of r=10 rows at 0.85 / 128: a pair at J=0.9 is proposed
    with probability ~0.99 (~0.8 with datasketch's default equal weights), one at J=0.5 ~0.01.
    """
    from datasketch import MinHashLSH

    try:
        return MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.05, 0.95))
    except ValueError:  # a threshold near 1 asks for a single band, which datasketch refuses
        return MinHashLSH(num_perm=num_perm, params=(2, num_perm // 2))


def near_duplicates(keys: Sequence[str], threshold: float = 0.85, num_perm: int = 128, shingle: int = 5,
                    seed: int = 0, protected: Sequence[bool] | None = None) -> list[int | None]:
    """For each key, the index of a kept key it nearly duplicates, or None (keep).

    Two keys are near-duplicates when the Jaccard similarity of their character `shingle`-gram
    sets (see `shingles`) reaches `threshold`. This is approximate, as in every MinHash dedup:
    candidates come from an LSH index (`MinHashLSH` over banded signatures, tuned for recall,
    see `_lsh_index`; a pair a little above the threshold can still be missed) and are
    confirmed with the Jaccard similarity estimated from `num_perm` MinHash values (standard
    error about sqrt(J(1-J)/num_perm), ~0.03 at J = 0.85 with 128, so pairs near the threshold
    go either way). Deterministic for a given `seed`.

    Greedy and order-stable: protected items first, then the others in order; an item is
    compared only with items already kept, so chains (A~B, B~C, A!~C) keep A and C. Protected
    items are always kept and win over unprotected ones regardless of order. Returns the most
    similar kept match (lowest index on ties). Cost is about linear in the total text length.
    """
    is_protected = _check_protected(keys, protected)
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    out: list[int | None] = [None] * len(keys)
    if len(keys) == 0:
        return out
    minhashes = _minhashes(keys, num_perm, shingle, seed)
    values = np.stack([m.hashvalues for m in minhashes])  # (n, num_perm): candidate checks in one op
    lsh = _lsh_index(threshold, num_perm)
    for i in _protected_first(is_protected):
        if not is_protected[i]:
            candidates = np.fromiter(lsh.query(minhashes[i]), dtype=np.int64)
            if candidates.size:
                candidates.sort()
                similarity = (values[candidates] == values[i]).mean(axis=1)
                best = int(np.argmax(similarity))  # first maximum: lowest index on ties
                if similarity[best] >= threshold:
                    out[i] = int(candidates[best])
                    continue
        lsh.insert(i, minhashes[i], check_duplication=False)
    return out
