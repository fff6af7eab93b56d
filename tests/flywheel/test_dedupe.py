"""Exact and near-duplicate prompts: normalised text for exact ones, MinHash LSH for near ones, the
threshold deciding; the first (most preferred) of each group is kept."""

from __future__ import annotations

import pytest

from ember.flywheel.dedupe import DedupeConfig, dedupe, normalise

BASE = "Summarise the customer's complaint about the late delivery of order 1234 in two sentences."


def test_exact_duplicates_are_the_same_text_up_to_case_and_whitespace():
    assert normalise("  Hello\n\tWORLD  ") == "hello world"
    items = ["Hello world", "hello   WORLD", " Hello world\n", "Goodbye world"]
    out = dedupe(items, str, DedupeConfig(near_threshold=None))
    assert out.kept == ["Hello world", "Goodbye world"] and (out.exact, out.near) == (2, 0)


def test_near_duplicates_go_and_different_prompts_stay():
    near = BASE.replace("two", "2")  # one word changed
    other = "Write a haiku about the sea at night, with the moon in it."
    out = dedupe([BASE, near, other], str, DedupeConfig(near_threshold=0.7))
    assert out.kept == [BASE, other] and (out.exact, out.near) == (0, 1)


@pytest.mark.parametrize(("threshold", "kept"), [(0.7, 1), (0.99, 2)])
def test_the_threshold_decides_what_is_near(threshold, kept):
    near = BASE.replace("two", "2")
    assert len(dedupe([BASE, near], str, DedupeConfig(near_threshold=threshold)).kept) == kept


def test_bad_settings_say_what_to_change():
    for kw in ({"near_threshold": 0.0}, {"near_threshold": 1.5}, {"shingle": 0}, {"num_perm": 4}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            DedupeConfig(**kw)
