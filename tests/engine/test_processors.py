"""The input processor's cheap bound on prompt text: text that cannot fit the context is refused before
the tokenizer reads it, and text that fits is never refused by the bound."""

from __future__ import annotations

import time

import pytest

from ember.engine.messages import EngineInfo
from ember.engine.processors import InputProcessor
from ember.errors import InvalidRequest
from ember.sampling_params import SamplingParams
from ember.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def processor(default_model_dir) -> InputProcessor:
    info = EngineInfo(max_model_len=64, vocab_size=49152, num_blocks=64, block_size=16)
    return InputProcessor(Tokenizer.from_dir(default_model_dir), info)


def test_text_too_long_for_any_tokenization_is_refused_before_tokenizing(processor, monkeypatch):
    def never(*_a, **_k):
        raise AssertionError("the tokenizer was asked to read text the bound refuses")

    monkeypatch.setattr(processor.tokenizer, "encode", never)
    text = "a" * (processor.max_prompt_chars + 1)
    t0 = time.monotonic()
    with pytest.raises(InvalidRequest, match="maximum context length of 64 tokens") as err:
        processor.token_ids(text, SamplingParams(max_tokens=1))
    assert err.value.code == "context_length_exceeded"
    assert time.monotonic() - t0 < 0.1


def test_the_bound_never_refuses_text_that_fits(processor):
    vocab = processor.tokenizer.hf.get_vocab()
    longest = max(vocab, key=len)
    # the most characters 63 tokens can spell: the vocabulary's longest token, over and over
    text = processor.tokenizer.decode([vocab[longest]] * 63)
    assert len(text) <= processor.max_prompt_chars
    ids = processor.token_ids(text, SamplingParams(max_tokens=1))
    assert len(ids) <= 64
