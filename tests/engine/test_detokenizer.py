from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from ember.engine.detokenizer import IncrementalDetokenizer
from ember.tokenizer import Tokenizer
from tests.fixtures_tokenizer import smollm2_tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return smollm2_tokenizer()


TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Emoji 😀 split 👍🏽 across 🎨 tokens",
    "中文字符和日本語のテキスト",
    "Ça coûte très cher, naïve façade, Øresund",
    "  leading spaces\n\ttabs and\n\nnewlines  ",
]


def stream(
    tok: Tokenizer,
    output_ids: Sequence[int],
    chunk: int = 1,
    prompt_ids: Sequence[int] | None = None,
    **kwargs,
) -> tuple[IncrementalDetokenizer, list[str]]:
    """Feed `output_ids` `chunk` at a time as an engine would; return the detokenizer and every delta."""
    if prompt_ids is None:
        prompt_ids = tok.apply_chat_template([{"role": "user", "content": "Say something."}])
    detok = IncrementalDetokenizer(tok, prompt_ids, **kwargs)
    deltas = []
    for i in range(0, len(output_ids), chunk):
        stopped = detok.append(output_ids[i : i + chunk])
        deltas.append(detok.take_delta())
        if stopped is not None:
            break
    deltas.append(detok.flush())
    return detok, deltas


@pytest.mark.parametrize("chunk", [1, 2, 5])
@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_full_decode(tok: Tokenizer, text: str, chunk: int) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    detok, deltas = stream(tok, ids, chunk=chunk)
    assert detok.text == "".join(deltas) == tok.decode(ids) == text
    assert detok.matched_stop is None and detok.finished
    assert not any("\ufffd" in d for d in deltas)


def test_emoji_split_across_tokens_is_held_until_whole(tok: Tokenizer) -> None:
    ids = tok.encode("Hi 😀 ok", add_special_tokens=False)
    # Precondition: the emoji's four bytes really are split over two tokens.
    assert tok.decode(ids[:2]).endswith("\ufffd")
    detok, deltas = stream(tok, ids)
    assert deltas == ["Hi", "", " 😀", " ok", ""]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("seed", range(20))
def test_random_ids_match_full_decode(tok: Tokenizer, seed: int, skip_special_tokens: bool) -> None:
    # Random ids include specials and byte tokens that never form valid UTF-8: whatever decode() makes of
    # them, the streamed text must be the same.
    rng = random.Random(seed)
    ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 60))]
    prompt = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 8))]
    detok, deltas = stream(
        tok,
        ids,
        chunk=rng.randint(1, 3),
        prompt_ids=prompt,
        skip_special_tokens=skip_special_tokens,
    )
    assert detok.text == "".join(deltas) == tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_first_token_keeps_its_leading_space(tok: Tokenizer) -> None:
    prompt = tok.encode("Hello", add_special_tokens=False)
    _, deltas = stream(tok, tok.encode(" world", add_special_tokens=False), prompt_ids=prompt)
    assert deltas[0] == " world"


def test_prompt_ending_inside_a_character(tok: Tokenizer) -> None:
    ids = tok.encode("Hi 😀 ok", add_special_tokens=False)
    detok, deltas = stream(tok, ids[2:], prompt_ids=ids[:2])
    assert detok.text == "".join(deltas) == tok.decode(ids[2:])


def test_special_tokens_skipped_or_kept(tok: Tokenizer) -> None:
    ids = tok.encode("Hi there", add_special_tokens=False) + [tok.eos_token_id]
    assert stream(tok, ids)[0].text == "Hi there"
    assert stream(tok, ids, skip_special_tokens=False)[0].text == "Hi there<|im_end|>"
    detok, deltas = stream(tok, ids, skip_special_tokens=False, stop=["<|im_end|>"])
    assert detok.text == "".join(deltas) == "Hi there"


ANSWER = "The answer is forty-two. Then more"


@pytest.mark.parametrize("chunk", [1, 2, 100])
@pytest.mark.parametrize(
    ("stop", "include", "expected"),
    [
        ("forty-two", False, "The answer is "),
        ("forty-two", True, "The answer is forty-two"),
        ("rty-t", False, "The answer is fo"),  # starts and ends inside tokens
        ("rty-t", True, "The answer is forty-t"),
    ],
)
def test_stop_string_spanning_tokens(
    tok: Tokenizer, stop: str, include: bool, expected: str, chunk: int
) -> None:
    ids = tok.encode(ANSWER, add_special_tokens=False)
    detok, deltas = stream(tok, ids, chunk=chunk, stop=[stop], include_stop_str_in_output=include)
    assert detok.matched_stop == stop and detok.finished
    # Deltas are never taken back, so their concatenation equalling the cut text means nothing of the stop
    # string was streamed before it was known to match.
    assert detok.text == "".join(deltas) == expected
    with pytest.raises(RuntimeError, match="finished"):
        detok.append(ids[-1:])


def test_stop_string_is_never_partially_streamed(tok: Tokenizer) -> None:
    ids = tok.encode(ANSWER, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["forty-two"])
    streamed = ""
    for i in ids:
        stopped = detok.append([i])
        streamed += detok.take_delta()
        assert "forty-two".startswith(detok.text[len(streamed) :]) or stopped
        assert not any(streamed.endswith("forty-two"[:k]) for k in range(1, 10))
        if stopped:
            break
    assert streamed + detok.flush() == "The answer is "


def test_held_back_prefix_is_released_on_flush(tok: Tokenizer) -> None:
    ids = tok.encode("I will say hel", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["hello"])
    for i in ids:
        assert detok.append([i]) is None
    assert detok.take_delta() == "I will say "
    assert detok.flush() == "hel"
    assert detok.text == "I will say hel" and detok.matched_stop is None


def test_held_back_prefix_is_released_when_it_diverges(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [], stop=["help!"])
    deltas = []
    for i in tok.encode("say help me", add_special_tokens=False):
        detok.append([i])
        deltas.append(detok.take_delta())
    assert deltas == ["say", " ", "help me"]  # "help" held: it may be the start of "help!"


@pytest.mark.parametrize("chunk", [1, 100])
@pytest.mark.parametrize(
    ("text", "stop", "matched", "expected"),
    [
        ("alpha beta gamma", ["gamma", "beta"], "beta", "alpha "),
        ("alpha beta gamma", ["beta", "gamma"], "beta", "alpha "),
        # Overlapping: "lo w" completes before "world" does, as a char-by-char stream would see it.
        ("hello world", ["world", "lo w"], "lo w", "hel"),
        # Same end: the longer one (it starts earlier).
        ("hello world", ["ld", "world"], "world", "hello "),
    ],
)
def test_earliest_stop_string_wins(
    tok: Tokenizer, text: str, stop: list[str], matched: str, expected: str, chunk: int
) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    detok, deltas = stream(tok, ids, chunk=chunk, stop=stop)
    assert detok.matched_stop == matched
    assert detok.text == "".join(deltas) == expected


def test_bad_stop_arguments(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(tok, [], stop=["ok", ""])
    with pytest.raises(TypeError, match="list of strings"):
        IncrementalDetokenizer(tok, [], stop="ok")


def _reference_stop(text: str, stop: list[str]) -> tuple[str, str | None]:
    """Cut `text` at the stop string that ends first (ties: the longer), without streaming."""
    matches = [(text.find(s) + len(s), text.find(s), s) for s in stop if s in text]
    if not matches:
        return text, None
    _, start, s = min(matches)
    return text[:start], s


@pytest.mark.parametrize("seed", range(30))
def test_random_stops_match_reference(tok: Tokenizer, seed: int) -> None:
    # Ids drawn from the tokens of a short text, so stop strings (slices of the decoded text) recur.
    rng = random.Random(seed)
    pool = tok.encode("the cat 😀 sat on the mat, the 猫 sat", add_special_tokens=False)
    ids = [rng.choice(pool) for _ in range(rng.randint(1, 40))]
    full = tok.decode(ids)
    stop = []
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(full))
        stop.append(full[i : i + rng.randint(1, 6)])
    detok, deltas = stream(tok, ids, chunk=rng.randint(1, 4), stop=stop)
    expected, matched = _reference_stop(full, list(dict.fromkeys(stop)))
    assert detok.matched_stop == matched
    assert detok.text == "".join(deltas) == expected
