"""EDA augmentation: WordNet and synonym-file sources, the four operations, seeding."""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from dtrain.data.augment import (
    STOPWORDS, SynonymTable, augment_examples, eda, example_rng, load_synonym_file, load_wordnet, n_changes,
)
from dtrain.data.sources import DataError

WORDNET_DIR = Path("/usr/share/wordnet")
SENTENCE = "The happy children quickly painted a large colourful picture of their old house near the river"
OFF = {"p_replace": 0.0, "p_insert": 0.0, "p_swap": 0.0, "p_delete": 0.0}


def only(**probs: float) -> dict[str, float]:
    """eda probabilities: the given ones, every other operation off."""
    return {**OFF, **probs}


def core(word: str) -> str:
    return word.strip(".,;:!?\"'()").lower()


@pytest.fixture(scope="module")
def wordnet():
    # CI installs wordnet-base (.ci/run), so there a missing WordNet fails instead of skipping.
    if not (WORDNET_DIR / "data.noun").is_file() and not os.environ.get("CI"):
        pytest.skip(f"no WordNet in {WORDNET_DIR} (apt-get install wordnet-base)")
    return load_wordnet(WORDNET_DIR)


@pytest.fixture(scope="module")
def wordnet_single(wordnet):
    """WordNet without multi-word synonyms, so that a replaced or inserted synonym is one whitespace word."""
    return load_wordnet(WORDNET_DIR, multiword=False)


TABLE = SynonymTable({
    "big": ("large", "huge"), "car": ("auto",), "fast": ("quick", "rapid"), "dog": ("hound",),
    "red": ("crimson",), "house": ("home", "dwelling"), "old": ("aged",), "runs": ("sprints",),
})


# --------------------------------------------------------------------------------------
# Synonym sources


def test_wordnet_returns_known_synonyms(wordnet, wordnet_single):
    happy = wordnet("happy")
    assert "glad" in happy and "felicitous" in happy and "happy" not in happy
    assert "automobile" in wordnet("car") and "auto" in wordnet("car")
    assert "automobile" in wordnet("Cars")  # lowercased and lemmatised by WordNet's morphy
    assert "large" in wordnet("big") and "big" in wordnet("large")
    assert "rapidly" in wordnet("quickly")
    assert wordnet("xqzzyv") == []
    assert "railway car" in wordnet("car")  # '_' becomes a space
    assert "railway car" not in wordnet_single("car") and "automobile" in wordnet_single("car")
    assert all(s == s.lower() for s in wordnet("brown"))  # no proper nouns ("Brown University")
    assert "three" in wordnet("trio") and "III" not in wordnet("trio")


def test_wordnet_is_picklable_and_reused(wordnet):
    copy = pickle.loads(pickle.dumps(wordnet))
    assert copy("happy") == wordnet("happy")
    assert copy._reader is wordnet._reader  # the dictionary is read once per process
    assert load_wordnet(WORDNET_DIR)._reader is wordnet._reader


def test_wordnet_missing_names_path_and_fix(tmp_path):
    with pytest.raises(DataError, match="apt-get install wordnet-base") as err:
        load_wordnet(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)
    (tmp_path / "data.noun").write_text("")
    with pytest.raises(DataError, match=r"lacks index\.noun") as err:
        load_wordnet(tmp_path)
    assert "synonym file" in str(err.value)


def test_synonym_file_groups(tmp_path):
    path = tmp_path / "syn.txt"
    path.write_text("# comment\nbig, large, huge\n\nBig, great\nice cream,  gelato\n")
    syn = load_synonym_file(path)
    assert syn("big") == ["large", "huge", "great"]  # union of both groups, in file order
    assert syn("large") == ["big", "huge"] and syn("great") == ["big"]
    assert syn("BIG") == syn("big")
    assert syn("ice cream") == ["gelato"] and syn("gelato") == ["ice cream"]
    assert syn("small") == []
    assert pickle.loads(pickle.dumps(syn))("big") == syn("big")


def test_synonym_file_json(tmp_path):
    path = tmp_path / "syn.json"
    path.write_text(json.dumps({"Big": ["large", "big", "huge"], "car": ["auto"]}))
    syn = load_synonym_file(path)
    assert syn("big") == ["large", "huge"] and syn("car") == ["auto"]
    assert syn("auto") == []  # a JSON mapping is taken as given, not made symmetric


@pytest.mark.parametrize("content, line, message", [
    ("big, large\nhuge\nfast, quick\n", 2, "single word"),
    ("big, large\n\nfast,, quick\n", 3, "empty entry"),
    ("big, large,\n", 1, "empty entry"),
    ('{\n  "big": ["large"],\n  "car": "auto"\n}\n', 3, "must be a list"),
    ('{\n  "big": ["large"],\n  "car": ["auto"\n}\n', 4, "invalid JSON"),
])
def test_synonym_file_errors_name_file_and_line(tmp_path, content, line, message):
    path = tmp_path / "syn.txt"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as err:
        load_synonym_file(path)
    assert str(err.value).startswith(f"{path}:{line}: ")


def test_synonym_file_missing_or_empty(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        load_synonym_file(tmp_path / "absent.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(DataError, match="no synonyms"):
        load_synonym_file(tmp_path / "empty.txt")


# --------------------------------------------------------------------------------------
# The operations


def test_n_changes():
    assert n_changes(0.0, 20) == 0
    assert n_changes(0.1, 4) == 1  # at least one
    assert n_changes(0.1, 20) == 2
    assert n_changes(0.3, 10) == 3
    assert n_changes(1.0, 7) == 7
    assert n_changes(0.5, 0) == 0


@pytest.mark.parametrize("text", [
    SENTENCE, "", "   ", "word", "  Two  words\n\nand a\tnew line. \n", "big car, fast dog!",
])
def test_all_probabilities_zero_is_identity(text, wordnet):
    assert eda(text, random.Random(0), wordnet, **OFF) == text
    assert eda(text, random.Random(0), TABLE, **OFF) == text


def test_replacement_changes_only_non_stopwords_into_their_synonyms(wordnet_single):
    before = SENTENCE.split()
    for seed in range(5):
        after = eda(SENTENCE, random.Random(seed), wordnet_single, **only(p_replace=1.0)).split()
        assert len(after) == len(before)
        changed = [(b, a) for b, a in zip(before, after) if b != a]
        replaceable = [b for b in before if core(b) not in STOPWORDS and wordnet_single(core(b))]
        assert len(changed) == len(replaceable) >= 8  # p=1: every word that has a synonym
        for b, a in changed:
            assert core(b) not in STOPWORDS
            assert a.lower() in wordnet_single(core(b)), (b, a)
        assert all(b == a for b, a in zip(before, after) if core(b) in STOPWORDS)


def test_replacement_count_punctuation_and_case():
    text = "The Big car, a fast dog."
    assert eda(text, random.Random(0), SynonymTable({"big": ("large",), "car": ("auto",), "dog": ("hound",),
                                                      "fast": ("quick",)}), **only(p_replace=1.0)) \
        == "The Large auto, a quick hound."
    assert eda("BIG car", random.Random(0), TABLE, **only(p_replace=0.5)) in ("LARGE car", "HUGE car", "BIG auto")
    words = "big car fast dog red house old runs".split()
    for seed in range(10):
        out = eda(" ".join(words), random.Random(seed), TABLE, **only(p_replace=0.25)).split()
        changed = [(b, a) for b, a in zip(words, out) if b != a]
        assert len(changed) == 2 and all(a in TABLE(b) for b, a in changed)


def test_replacement_keeps_layout():
    text = "  big car\n\nfast  dog\n"
    out = eda(text, random.Random(1), TABLE, **only(p_replace=1.0))
    assert out.startswith("  ") and out.count("\n") == 3 and "\n\n" in out and "  " in out.strip()
    assert [w for w in out.split() if w in ("big", "car", "fast", "dog")] == []


@pytest.mark.parametrize("p, expected", [(0.1, 1), (0.3, 3), (1.0, 10)])
def test_insertion_adds_expected_number_of_synonyms(p, expected):
    text = "the big car and a fast dog in old house"  # 10 words, 6 with synonyms
    originals = Counter(text.split())
    sources = [w for w in originals if TABLE(w)]
    for seed in range(10):
        out = eda(text, random.Random(seed), TABLE, **only(p_insert=p))
        inserted = Counter(out.split()) - originals
        assert len(out.split()) == 10 + expected and sum(inserted.values()) == expected
        assert Counter(out.split()) - inserted == originals  # nothing removed or changed
        for word in inserted:
            assert any(word in TABLE(src) for src in sources), word


def test_insertion_with_wordnet(wordnet_single):
    originals = Counter(SENTENCE.split())
    out = eda(SENTENCE, random.Random(3), wordnet_single, **only(p_insert=0.2))
    inserted = Counter(out.split()) - originals
    assert len(out.split()) == len(SENTENCE.split()) + 3 and sum(inserted.values()) == 3
    for word in inserted:
        assert any(word in wordnet_single(core(src)) for src in originals if core(src) not in STOPWORDS), word


def test_insertion_without_any_synonym_leaves_text():
    assert eda("the of and", random.Random(0), TABLE, **only(p_insert=1.0)) == "the of and"


def test_swap_preserves_the_multiset_of_words():
    text = "one two three four five six seven eight nine ten,\neleven twelve."
    outputs = set()
    for seed in range(20):
        out = eda(text, random.Random(seed), TABLE, **only(p_swap=0.5))
        assert sorted(out.split()) == sorted(text.split())
        assert out.count("\n") == 1 and out.count(" ") == text.count(" ")  # the whitespace stays in place
        outputs.add(out)
    assert len(outputs) > 15 and text not in outputs
    assert eda("alone", random.Random(0), TABLE, **only(p_swap=1.0)) == "alone"


def test_deletion_never_empties_the_text():
    rng = random.Random(0)
    for text in ("a", "one two", "big car fast dog red house", SENTENCE, "  x \n y\n"):
        for _ in range(20):
            out = eda(text, rng, TABLE, **only(p_delete=1.0))
            n = len(text.split())
            assert len(out.split()) == (1 if n > 1 else n) and out.split()[0] in text.split()
    words = [f"w{i}" for i in range(10)]
    for seed in range(10):
        out = eda(" ".join(words), random.Random(seed), TABLE, **only(p_delete=0.3)).split()
        assert len(out) == 7 and out == [w for w in words if w in out]  # order kept
    assert eda("single", random.Random(0), TABLE, p_replace=0, p_insert=0, p_swap=0, p_delete=1.0) == "single"


def test_deletion_keeps_line_breaks_and_no_trailing_space():
    out = eda("alpha beta\ngamma delta", random.Random(0), TABLE, **only(p_delete=0.5))
    assert out.count("\n") == 1 and len(out.split()) == 2
    for seed in range(10):
        out = eda("alpha beta gamma", random.Random(seed), TABLE, **only(p_delete=0.34))
        assert out == out.strip() and len(out.split()) == 2


def test_probabilities_are_checked():
    with pytest.raises(ValueError, match="p_swap=1.5"):
        eda("a b", random.Random(0), TABLE, p_swap=1.5)
    with pytest.raises(ValueError, match="p_delete=-0.1"):
        eda("a b", random.Random(0), TABLE, p_delete=-0.1)


# --------------------------------------------------------------------------------------
# Seeding


def test_eda_is_deterministic_for_a_given_rng_state(wordnet):
    a = [eda(SENTENCE, random.Random(seed), wordnet) for seed in range(6)]
    b = [eda(SENTENCE, random.Random(seed), wordnet) for seed in range(6)]
    assert a == b
    assert len(set(a)) == 6 and SENTENCE not in a


def test_augment_examples_seeding(wordnet):
    texts = [SENTENCE, "the big car was fast", "a happy dog runs home"]
    first = augment_examples(texts, seed=1, n_aug=2, synonyms=wordnet)
    assert len(first) == 6
    assert first == augment_examples(texts, seed=1, n_aug=2, synonyms=wordnet)
    assert first[0] != first[1]  # two copies of one example differ
    other = augment_examples(texts, seed=2, n_aug=2, synonyms=wordnet)
    assert sum(x != y for x, y in zip(first, other)) >= 5
    # an example's copies depend on (seed, index) only, not on the other texts
    changed = augment_examples(["something else entirely here", *texts[1:]], seed=1, n_aug=2, synonyms=wordnet)
    assert changed[2:] == first[2:]
    rng = example_rng(1, 1)
    assert [eda(texts[1], rng, wordnet) for _ in range(2)] == first[2:4]
    assert augment_examples(texts, seed=1, n_aug=0, synonyms=wordnet) == []
    assert augment_examples(texts, seed=1, synonyms=TABLE, **OFF) == texts


@pytest.mark.slow
def test_augment_examples_is_stable_across_processes(wordnet):
    """Same output in a process with another str hash salt: no set ordering or hash() leaks in."""
    texts = [SENTENCE, "the big car was fast", "a happy dog runs home"]
    code = ("import json; from dtrain.data.augment import augment_examples, load_wordnet; "
            f"print(json.dumps(augment_examples({texts!r}, seed=7, n_aug=2, synonyms=load_wordnet())))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == augment_examples(texts, seed=7, n_aug=2,
                                                                                 synonyms=wordnet)


def test_prepare_data_adds_augmented_copies_to_train_only(tmp_path):
    from dtrain.config import DataConfig
    from dtrain.data import prepare_data
    from dtrain.presets import byte_tokenizer

    words = ["quick", "happy", "large", "small", "bright", "quiet", "strong", "gentle", "clever", "brave"]
    rows = [{"text": f"the {w} dog runs across the big green field", "label": "a" if i % 2 else "b"}
            for i, w in enumerate(words * 2)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    syn = tmp_path / "syn.txt"
    syn.write_text("dog, hound\nruns, sprints\nbig, huge\nfield, meadow\n")
    base = DataConfig(train=[str(path)], format="classification", val_ratio=0.2, test_ratio=0.0,
                      cache_dir=str(tmp_path / "c"), clean={"exact_dedup": False})
    plain = prepare_data(base, byte_tokenizer(), seed=0)
    aug = prepare_data(base.model_copy(update={"augment": base.augment.model_copy(
        update={"copies": 2, "synonyms": str(syn), "p_replace": 0.3, "p_insert": 0, "p_swap": 0, "p_delete": 0})}),
        byte_tokenizer(), seed=0)
    assert len(aug.train) == 3 * len(plain.train)
    assert len(aug.validation) == len(plain.validation)
    tok = byte_tokenizer()
    texts = [tok.decode(ids, skip_special_tokens=True) for ids in aug.train[:]["input_ids"]]
    changed = [t for t in texts[len(plain.train):] if any(w in t for w in ("hound", "sprints", "huge", "meadow"))]
    assert len(changed) == 2 * len(plain.train)  # every copy got a synonym from the file
