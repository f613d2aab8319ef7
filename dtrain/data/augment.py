"""EDA text augmentation for the training split (Wei & Zou 2019, "Easy Data Augmentation").

`eda` applies four operations to the whitespace-separated words of a text, in this order:
synonym replacement, random insertion (a synonym of a word of the text), random swap and
random deletion. Each operation with probability p > 0 changes max(1, round(p * n)) words,
n being the number of words of the original text; p == 0 leaves the text alone. The
whitespace between words (newlines included) is kept, so multi-line instructions keep their
layout, and punctuation attached to a replaced word stays in place ("car," -> "auto,").

Synonyms come from any callable `synonyms(word) -> list[str]` that gets a lowercase word:
`load_wordnet()` (WordNet 3.0 from Debian's wordnet-base, read by nltk) or
`load_synonym_file(path)` (groups like "big, large, huge", or a JSON object word -> list).
Both are picklable, so `datasets` can fingerprint them and hand them to worker processes.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from dtrain.data.sources import DataError

__all__ = [
    "STOPWORDS", "SynonymTable", "Synonyms", "WordNetSynonyms", "augment_examples", "eda", "example_rng",
    "load_synonym_file", "load_wordnet", "n_changes",
]

Synonyms = Callable[[str], Sequence[str]]
"""synonyms(word) -> the word's synonyms, best first; `word` is lowercase, [] when none are known."""

DEFAULT_WORDNET = "/usr/share/wordnet"

# The usual English stopword list (the one EDA and nltk use), built in so that no corpus download is needed.
STOPWORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he him his
himself she she's her hers herself it it's its itself they them their theirs themselves what which who whom this
that that'll these those am is are was were be been being have has had having do does did doing a an the and but
if or because as until while of at by for with about against between into through during before after above below
to from up down in out on off over under again further then once here there when where why how all any both each
few more most other some such no nor not only own same so than too very s t can will just don don't should
should've now d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't
haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't
weren weren't won won't wouldn wouldn't
""".split())

_MISSING_HELP = ("install it with `apt-get install wordnet-base`, or use a synonym file instead "
                 "(data.augment.synonyms: path to lines like 'big, large, huge')")


# --------------------------------------------------------------------------------------
# Synonym sources


@dataclass(eq=False)
class SynonymTable:
    """Synonyms from a table word -> synonyms (what `load_synonym_file` returns)."""

    table: dict[str, tuple[str, ...]]
    source: str = "<table>"

    def __call__(self, word: str) -> list[str]:
        return list(self.table.get(word.lower(), ()))

    def __len__(self) -> int:
        return len(self.table)


def load_synonym_file(path: str | Path) -> SynonymTable:
    """Read a synonym file: a JSON object word -> [synonyms], or text with one group per line.

    Text format: comma-separated words that are synonyms of each other ("big, large, huge");
    blank lines and lines starting with '#' are skipped; a word in several groups gets the
    union. Words are lowercased. Errors name the file and line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"synonym file {path}: cannot read it ({exc})") from exc
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        table = _parse_json_synonyms(text, path)
    else:
        table = _parse_synonym_groups(text, path)
    if not table:
        raise DataError(f"synonym file {path}: no synonyms in it")
    return SynonymTable(table, str(path))


def _parse_synonym_groups(text: str, path: Path) -> dict[str, tuple[str, ...]]:
    """'big, large, huge' lines -> every word maps to the others of its group(s)."""
    merged: dict[str, dict[str, None]] = {}  # dicts as ordered sets
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        words = [" ".join(w.split()).lower() for w in line.split(",")]
        if any(not w for w in words):
            raise DataError(f"{path}:{lineno}: empty entry in {line!r} (expected comma-separated words like "
                            "'big, large, huge')")
        group = list(dict.fromkeys(words))
        if len(group) < 2:
            raise DataError(f"{path}:{lineno}: {line!r} has a single word; a group needs at least two "
                            "comma-separated words like 'big, large, huge'")
        for w in group:
            merged.setdefault(w, {}).update(dict.fromkeys(o for o in group if o != w))
    return {w: tuple(others) for w, others in merged.items()}


def _parse_json_synonyms(text: str, path: Path) -> dict[str, tuple[str, ...]]:
    """A JSON object word -> list of synonyms (taken as given, not made symmetric)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}, column {exc.colno})") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object word -> list of synonyms")
    table: dict[str, tuple[str, ...]] = {}
    for word, syns in data.items():
        if not isinstance(syns, list) or not all(isinstance(s, str) and s.strip() for s in syns):
            line = _json_key_line(text, word)
            raise DataError(f"{path}:{line}: the synonyms of {word!r} must be a list of non-empty strings, "
                            f"got {syns!r}")
        key = " ".join(word.split()).lower()
        others = dict.fromkeys(" ".join(s.split()).lower() for s in syns)
        others.pop(key, None)
        table[key] = tuple(dict.fromkeys([*table.get(key, ()), *others]))
    return table


def _json_key_line(text: str, key: str) -> int | str:
    """The line where the key `key` first appears in JSON `text` ('?' if not found)."""
    at = text.find(json.dumps(key))
    return text.count("\n", 0, at) + 1 if at >= 0 else "?"


class WordNetSynonyms:
    """Synonyms from WordNet: the lemma names of every synset of the word (all parts of speech).

    Lemma names come back in WordNet's order (most frequent sense first) with '_' as a space;
    names with characters other than lowercase letters, spaces, hyphens and apostrophes are
    dropped (proper nouns like "Brown University", "III", "3-D"), as are multi-word names
    when `multiword` is False. Pickles as (path, multiword) and re-opens the dictionary
    after unpickling (one reader per directory and process).
    """

    def __init__(self, path: str | Path = DEFAULT_WORDNET, multiword: bool = True):
        self.path = str(path)
        self.multiword = multiword
        self._reader = _open_wordnet(self.path)
        self._cache: dict[str, tuple[str, ...]] = {}

    def __call__(self, word: str) -> list[str]:
        word = " ".join(word.split()).lower()
        if word not in self._cache:
            self._cache[word] = self._lookup(word)
        return list(self._cache[word])

    def _lookup(self, word: str) -> tuple[str, ...]:
        if not word:
            return ()
        seen: dict[str, str] = {}  # lowercase -> first spelling
        for synset in self._reader.synsets(word.replace(" ", "_")):
            for name in synset.lemma_names():
                name = name.replace("_", " ")
                if name.lower() == word or not all(c.islower() or c in " -'" for c in name):
                    continue  # the word itself, proper nouns ("Brown University"), abbreviations, numbers
                if self.multiword or " " not in name:
                    seen.setdefault(name.lower(), name)
        return tuple(seen.values())

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "multiword": self.multiword}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["multiword"])

    def __repr__(self) -> str:
        return f"WordNetSynonyms({self.path!r}, multiword={self.multiword})"


def load_wordnet(path: str | Path = DEFAULT_WORDNET, *, multiword: bool = True) -> WordNetSynonyms:
    """WordNet 3.0 synonyms read from a WordNet dict directory (Debian: /usr/share/wordnet).

    Needs nltk but no nltk_data. Raises DataError naming the directory and the fix when the
    WordNet files are missing.
    """
    return WordNetSynonyms(path, multiword)


# The 45 lexicographer files of WordNet 3.0 (lexnames(5WN)). nltk's reader requires a
# `lexnames` file, which Debian's wordnet-base leaves out ("remnants from WordNets past").
_LEXNAMES = """
adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition
noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object noun.person
noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape noun.state
noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition verb.consumption
verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative
verb.weather adj.ppl
""".split()
_LEXNAME_POS = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
_REQUIRED = [f"{kind}.{pos}" for pos in ("noun", "verb", "adj", "adv") for kind in ("index", "data")] + [
    f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv")]

_READERS: dict[str, Any] = {}  # resolved directory -> WordNetCorpusReader, one per process


def _open_wordnet(path: str) -> Any:
    """nltk's WordNetCorpusReader over a WordNet dict directory, cached per directory."""
    root = Path(path).expanduser()
    missing = [name for name in _REQUIRED if not (root / name).is_file()]
    if missing:
        what = "does not exist" if not root.is_dir() else f"lacks {', '.join(missing)}"
        raise DataError(f"WordNet directory {root} {what}: {_MISSING_HELP}")
    key = str(root.resolve())
    if key not in _READERS:
        _READERS[key] = _make_reader(Path(key))
    return _READERS[key]


def _make_reader(root: Path) -> Any:
    try:
        import nltk.data
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ImportError as exc:
        raise DataError(f"WordNet synonyms need nltk (pip install nltk): {exc}") from exc

    class DictDirReader(WordNetCorpusReader):
        """Serves a generated `lexnames` when the directory has none; no OMW / version mapping."""

        def open(self, file: str) -> Any:
            if file == "lexnames" and not (root / "lexnames").is_file():
                return io.StringIO("".join(f"{i:02d}\t{name}\t{_LEXNAME_POS[name.split('.')[0]]}\n"
                                           for i, name in enumerate(_LEXNAMES)))
            return super().open(file)

        def map_wn(self, version: str = "wordnet") -> None:
            # nltk maps synsets to the nltk_data "wordnet" corpus (for OMW); this is WordNet 3.0 itself.
            return None

    # nltk's path sandbox (nltk.pathsec, present in 3.10) opens only files under nltk.data.path: allow this directory.
    if not any(str(p) == str(root) for p in nltk.data.path):
        nltk.data.path.append(str(root))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The multilingual functions are not available")
        try:
            return DictDirReader(str(root), omw_reader=None)
        except (OSError, ValueError, LookupError, AssertionError) as exc:
            raise DataError(f"WordNet directory {root}: cannot read it with nltk ({type(exc).__name__}: {exc}); "
                            f"{_MISSING_HELP}") from exc


# --------------------------------------------------------------------------------------
# EDA


def n_changes(p: float, n_words: int) -> int:
    """Words an operation changes: max(1, round(p * n_words)) for p > 0 (EDA), 0 for p == 0."""
    return 0 if p == 0 or n_words == 0 else max(1, round(p * n_words))


_EDGES = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)


def _split_edges(word: str) -> tuple[str, str, str]:
    """'"Car,' -> ('"', 'Car', ','): leading punctuation, core, trailing punctuation."""
    m = _EDGES.match(word)
    assert m is not None
    return m.group(1), m.group(2), m.group(3)


def _synonyms_for(word: str, synonyms: Synonyms) -> list[str]:
    """Synonyms of a word's core, or [] for stopwords, words without letters and unknown words."""
    core = _split_edges(word)[1].lower()
    if not core or core in STOPWORDS or not any(c.isalpha() for c in core):
        return []
    out = dict.fromkeys(s for s in synonyms(core) if s.strip() and s.lower() != core)
    return list(out)


def _match_case(original: str, synonym: str) -> str:
    """Give `synonym` the capitalisation of `original` (all caps, or first letter)."""
    if len(original) > 1 and original.isupper():
        return synonym.upper()
    if original[:1].isupper():
        return synonym[:1].upper() + synonym[1:]
    return synonym


def _replace(words: list[str], k: int, rng: random.Random, synonyms: Synonyms) -> None:
    """Replace k non-stopwords (distinct positions) with one of their synonyms, keeping punctuation and case."""
    options = {i: _synonyms_for(w, synonyms) for i, w in enumerate(words)}
    candidates = [i for i, syns in options.items() if syns]
    for i in rng.sample(candidates, min(k, len(candidates))):
        before, core, after = _split_edges(words[i])
        words[i] = before + _match_case(core, rng.choice(options[i])) + after


def _insert(words: list[str], seps: list[str], k: int, rng: random.Random, synonyms: Synonyms) -> None:
    """Insert k times a synonym of a random non-stopword of the text before a random word."""
    options = [syns for syns in (_synonyms_for(w, synonyms) for w in words) if syns]
    if not options:
        return
    for _ in range(k):
        synonym = rng.choice(rng.choice(options))
        at = rng.randrange(len(words))
        words.insert(at, synonym)
        seps.insert(at, " ")


def _swap(words: list[str], k: int, rng: random.Random) -> None:
    """Swap k random pairs of words (the whitespace between them stays)."""
    if len(words) < 2:
        return
    for _ in range(k):
        i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]


def _delete(words: list[str], seps: list[str], k: int, rng: random.Random) -> None:
    """Delete k random words, always keeping at least one; a deleted line break survives."""
    k = min(k, len(words) - 1)
    for i in sorted(rng.sample(range(len(words)), k), reverse=True):
        # keep the whitespace before the word, unless the one after it breaks more lines or ends the text
        if i > 0 and (i == len(words) - 1 or seps[i].count("\n") > seps[i - 1].count("\n")):
            seps[i - 1] = seps[i]
        del words[i], seps[i]


def _check_probability(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name}={p} must be between 0 and 1")


def _split_words(text: str) -> tuple[str, list[str], list[str]]:
    """'  a b\\n' -> ('  ', ['a', 'b'], [' ', '\\n']): leading whitespace, words, whitespace after each word."""
    body = text.lstrip()
    parts = re.split(r"(\s+)", body)
    words, seps = parts[0::2], parts[1::2]
    if words[-1] == "":  # the text ends with whitespace (or is blank)
        words.pop()
    seps += [""] * (len(words) - len(seps))
    return text[: len(text) - len(body)], words, seps


def eda(text: str, rng: random.Random, synonyms: Synonyms, *, p_replace: float = 0.1, p_insert: float = 0.1,
        p_swap: float = 0.1, p_delete: float = 0.1) -> str:
    """One EDA variant of `text`: synonym replacement, insertion, swap, deletion (in that order).

    Works on whitespace-separated words; each operation with p > 0 changes
    max(1, round(p * n)) words (n: words in `text`). Stopwords are neither replaced nor used
    as sources of inserted synonyms; swap and deletion need at least two words; deletion
    never removes the last word. Deterministic for a given `rng` state and synonym source.
    """
    for name, p in (("p_replace", p_replace), ("p_insert", p_insert), ("p_swap", p_swap), ("p_delete", p_delete)):
        _check_probability(name, p)
    lead, words, seps = _split_words(text)
    n = len(words)
    if n == 0:
        return text

    _replace(words, n_changes(p_replace, n), rng, synonyms)
    _insert(words, seps, n_changes(p_insert, n), rng, synonyms)
    _swap(words, n_changes(p_swap, n), rng)
    _delete(words, seps, n_changes(p_delete, n), rng)
    return lead + "".join(w + s for w, s in zip(words, seps))


def example_rng(seed: int, index: int) -> random.Random:
    """The random generator of example `index`: a stable hash of (seed, index), not Python's salted hash()."""
    digest = hashlib.blake2b(f"{seed}\x00{index}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def augment_examples(texts: Sequence[str], seed: int, n_aug: int = 1, *, synonyms: Synonyms | None = None,
                     **probs: float) -> list[str]:
    """n_aug EDA copies of every text, in order: [t0 copy 1, ..., t0 copy n_aug, t1 copy 1, ...].

    Example i uses its own generator `example_rng(seed, i)`, so its copies do not depend on
    the other texts. `synonyms` defaults to `load_wordnet()`; `probs` are eda's p_* arguments.
    The originals are not included.
    """
    if n_aug < 0:
        raise ValueError(f"n_aug={n_aug} must be >= 0")
    if n_aug == 0 or not texts:
        return []
    source = synonyms if synonyms is not None else load_wordnet()
    out = []
    for i, text in enumerate(texts):
        rng = example_rng(seed, i)
        out.extend(eda(text, rng, source, **probs) for _ in range(n_aug))
    return out
