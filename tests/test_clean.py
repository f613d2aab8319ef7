"""Cleaning steps: normalisation, boilerplate, exact and near dedup (small inputs, known outcomes)."""

from __future__ import annotations

import random
import time

import pytest

from dtrain.data.clean import (
    DEFAULT_BOILERPLATE, dedup_key, exact_duplicates, find_boilerplate, near_duplicates, normalize_text, shingles,
    strip_boilerplate,
)

# 30 words; variants below change one of them.
SENTENCE = (
    "The committee reviewed every proposal submitted before the deadline and selected three projects "
    "that demonstrated careful planning, realistic budgets, measurable outcomes, strong community support "
    "and clear long term maintenance commitments"
)
ONE_WORD_CHANGED = SENTENCE.replace("three", "four")
UNRELATED = [
    "Photosynthesis converts light energy into chemical energy stored in glucose molecules inside plant cells.",
    "The quarterly report shows revenue growth in the northern region despite higher shipping costs.",
    "Bake the bread at two hundred degrees for forty minutes until the crust turns golden brown.",
]


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


# -- normalize_text ------------------------------------------------------------------------


def test_nfkc_full_width_digits_become_ascii():
    assert normalize_text("Ｔｏｔａｌ： １２３") == "Total: 123"
    assert normalize_text("ﬁne x²") == "fine x2"  # ligature, superscript


def test_unicode_form_none_or_nfc_keeps_compatibility_characters():
    assert normalize_text("１２３", unicode_form=None) == "１２３"
    assert normalize_text("１２３", unicode_form="NFC") == "１２３"
    assert normalize_text("cafe\u0301", unicode_form="NFC") == "café"


def test_whitespace_runs_collapse():
    assert normalize_text("a \t\t b") == "a b"
    assert normalize_text("  lots   of\u00a0 space  ") == "lots of space"  # NBSP is a space after NFKC


def test_newlines_normalised_and_blank_lines_limited():
    assert normalize_text("a\r\nb\rc") == "a\nb\nc"
    assert normalize_text("a\n\n\n\n\nb") == "a\n\nb"
    assert normalize_text("a  \n \t \n\n \nb") == "a\n\nb"  # whitespace-only lines count as blank
    assert normalize_text("line one\nline two\n\nnext paragraph") == "line one\nline two\n\nnext paragraph"


def test_indentation_is_kept():
    code = "def f(x):\n    if x:\n        return  1\n    return 0"
    assert normalize_text(code) == "def f(x):\n    if x:\n        return 1\n    return 0"


def test_invisible_characters_removed():
    assert normalize_text("zero\u200bwidth") == "zerowidth"
    assert normalize_text("\ufeffbom and soft\u00adhyphen") == "bom and softhyphen"
    assert normalize_text("bell\x07 and nul\x00!") == "bell and nul!"
    assert normalize_text("keep\ttab", whitespace=False) == "keep\ttab"
    assert normalize_text("👩\u200d💻") == "👩\u200d💻"  # ZWJ sequences survive


def test_whitespace_false_only_normalises_unicode_and_line_breaks():
    assert normalize_text("  a   b \r\n\n\n\nc ", whitespace=False) == "  a   b \n\n\n\nc "


def test_normalize_is_idempotent():
    text = " Ｈｅｌｌｏ\u200b  world \r\n\n\n\n  indented\tline \n"
    once = normalize_text(text)
    assert normalize_text(once) == once


def test_plain_ascii_shortcut_equals_the_full_normalisation():
    """normalize_text returns early for printable-ASCII text; on every kind of string it must agree
    with the rules applied in full (clean._normalize). Short random strings over the characters
    the rules care about reach every branch of the shortcut."""
    from dtrain.data.clean import _normalize

    rng = random.Random(0)
    alphabet = ["a", "b", " ", "  ", "\n", "\n\n\n", "\t", "\r", "\r\n", "\x07", "\x7f", "\u00a0", "\u2028", "ﬁ",
                "\u200b"]
    texts = ["", " ", "\n", "a b", " a\nb ", "a\n\nb", "\n a", "a \nb"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(3000)]
    for text in texts:
        for form in ("NFKC", None):
            for whitespace in (True, False):
                assert normalize_text(text, form, whitespace) == _normalize(text, form, whitespace), (text, form)


# -- boilerplate -------------------------------------------------------------------------


def test_default_boilerplate_family():
    assert 10 <= len(DEFAULT_BOILERPLATE) <= 15
    assert "As an AI language model" in DEFAULT_BOILERPLATE
    assert len(set(DEFAULT_BOILERPLATE)) == len(DEFAULT_BOILERPLATE)


def test_find_boilerplate_case_insensitive_returns_phrase():
    assert find_boilerplate("well, AS AN AI LANGUAGE MODEL I think...") == "As an AI language model"
    assert find_boilerplate("I\u2019m sorry, but as an AI I can't.") == "I'm sorry, but as an AI"  # curly apostrophe
    assert find_boilerplate("As  an AI\nassistant, I help.") == "As an AI assistant"
    assert find_boilerplate("The answer is 4.") is None
    assert find_boilerplate("She has an AI language model at work.") is None  # whole words only
    assert find_boilerplate("Anything", []) is None
    assert find_boilerplate("we cannot comply", ["cannot comply"]) == "cannot comply"


def test_every_default_phrase_is_found_however_written():
    """The substring prefilter (clean._anchors) must never hide a phrase the regex would match."""
    for phrase in DEFAULT_BOILERPLATE:
        variants = [phrase, phrase.upper(), phrase.lower(), phrase.replace(" ", "  \n "), phrase.replace("'", "\u2019")]
        for text in variants:
            assert find_boilerplate(f"Well. {text}, so no.") == phrase, text
    assert find_boilerplate("I am just an ordinary person, but happy.") is None  # anchors alone are not enough


def test_strip_boilerplate_removes_the_sentence():
    text = "As an AI language model, I cannot browse the web. However, 2 + 2 = 4. Hope that helps!"
    assert strip_boilerplate(text, DEFAULT_BOILERPLATE) == "However, 2 + 2 = 4. Hope that helps!"
    assert strip_boilerplate("Sure. I don't have personal opinions, but here: X.", DEFAULT_BOILERPLATE) == "Sure."
    # several phrases, one sentence; a whole line goes with its line break
    text = "Intro line.\nI'm sorry, but as an AI language model I can't.\n- item one\n- item two"
    assert strip_boilerplate(text, DEFAULT_BOILERPLATE) == "Intro line.\n- item one\n- item two"


def test_strip_boilerplate_everything_or_nothing():
    assert strip_boilerplate("As an AI assistant, I cannot do that.", DEFAULT_BOILERPLATE) == ""
    assert strip_boilerplate("  Plain answer.  ", DEFAULT_BOILERPLATE) == "Plain answer."
    stripped = strip_boilerplate("x. As an AI developed by Y, no. As an AI assistant, no. y.", DEFAULT_BOILERPLATE)
    assert stripped == "x. y."


# -- exact dedup -------------------------------------------------------------------------


def test_dedup_key():
    assert dedup_key("  Hello \t WORLD\n") == "hello world"
    assert dedup_key("Straße") == dedup_key("STRASSE")  # casefold, not lower


def test_exact_duplicates_case_and_whitespace_variants():
    keys = ["Hello world", "hello   WORLD", "Other text", "hello world\n", "other  TEXT", "new"]
    assert exact_duplicates(keys) == [None, 0, None, 0, 2, None]


def test_exact_protected_wins_regardless_of_order():
    # train rows (unprotected) come first; the validation/test copies are kept
    keys = ["What is 2+2?", "unique", "what is 2+2?", "Unique"]
    protected = [False, False, True, True]
    assert exact_duplicates(keys, protected) == [2, 3, None, None]
    # protected rows are never removed, even when they repeat each other
    assert exact_duplicates(["a", "A", "a"], [True, True, False]) == [None, None, 0]


def test_exact_edge_cases():
    assert exact_duplicates([]) == []
    assert exact_duplicates(["", " ", "x"]) == [None, 0, None]
    with pytest.raises(ValueError, match="protected"):
        exact_duplicates(["a", "b"], [True])


# -- near dedup --------------------------------------------------------------------------


def test_fixture_similarities():
    assert len(SENTENCE.split()) == 30
    assert jaccard(SENTENCE, ONE_WORD_CHANGED) > 0.9
    assert all(jaccard(SENTENCE, u) < 0.2 for u in UNRELATED)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_near_duplicates_one_word_changed(seed):
    keys = [SENTENCE, *UNRELATED, ONE_WORD_CHANGED, SENTENCE.upper()]
    assert near_duplicates(keys, seed=seed) == [None, None, None, None, 0, 0]


def test_near_duplicates_unrelated_kept():
    assert near_duplicates(UNRELATED + [SENTENCE]) == [None] * 4


def test_near_protected_wins_regardless_of_order():
    keys = [ONE_WORD_CHANGED, UNRELATED[0], SENTENCE, UNRELATED[0] + " Indeed."]
    protected = [False, False, True, True]
    assert near_duplicates(keys, protected=protected) == [2, 3, None, None]
    # two protected near-duplicates both stay
    assert near_duplicates([SENTENCE, ONE_WORD_CHANGED], protected=[True, True]) == [None, None]


def test_near_threshold_one_is_exact_only():
    keys = [SENTENCE, ONE_WORD_CHANGED, " " + SENTENCE.lower()]
    assert near_duplicates(keys, threshold=1.0) == [None, None, 0]


def test_near_chains_compare_with_kept_items_only():
    def replace(words: list[str], positions: list[int]) -> list[str]:
        return ["zz" if i in positions else w for i, w in enumerate(words)]

    b_words = replace(SENTENCE.split(), [2, 8, 14, 20])
    a, b, c = SENTENCE, " ".join(b_words), " ".join(replace(b_words, [5, 11, 17, 26]))
    assert jaccard(a, b) > 0.7 and jaccard(b, c) > 0.7 and jaccard(a, c) < 0.5
    # b is a near-duplicate of a and is dropped; c is close to b but is compared with kept a only
    assert near_duplicates([a, b, c], threshold=0.6) == [None, 0, None]


def test_near_deterministic_for_a_seed():
    rng = random.Random(7)
    words = SENTENCE.split()
    keys = []
    for _ in range(300):
        w = list(words)
        for _ in range(rng.randint(0, 6)):
            w[rng.randrange(len(w))] = rng.choice(["red", "green", "blue", "yellow", "black"])
        keys.append(" ".join(w))
    first = near_duplicates(keys, seed=3)
    assert near_duplicates(keys, seed=3) == first
    assert near_duplicates(list(keys), seed=3, num_perm=128, shingle=5) == first


def test_near_edge_cases():
    assert near_duplicates([]) == []
    assert near_duplicates(["", "", "ab"]) == [None, 0, None]  # short texts are one shingle
    with pytest.raises(ValueError, match="threshold"):
        near_duplicates(["a"], threshold=0.0)
    with pytest.raises(ValueError, match="protected"):
        near_duplicates(["a", "b"], protected=[False])


def test_near_duplicates_scale_20k():
    rng = random.Random(0)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(5000)]
    keys = [" ".join(rng.choice(vocab) for _ in range(rng.randint(8, 20))) for _ in range(20_000)]
    planted = {rng.randrange(20_000): None for _ in range(200)}
    for i in planted:
        keys.append(keys[i].upper() + "  ")
    start = time.perf_counter()
    out = near_duplicates(keys, protected=[False] * len(keys))
    elapsed = time.perf_counter() - start
    print(f"near_duplicates: {len(keys)} texts in {elapsed:.1f} s")
    assert elapsed < 30
    assert out[20_000:] == list(planted)  # every planted copy points at its original
    assert sum(d is not None for d in out[:20_000]) == 0  # random texts are not near-duplicates
