"""The price table and the estimate admission reserves."""

from __future__ import annotations

import pytest

from ember.gateway.guard import estimate_output, estimate_prompt
from ember.gateway.usage import PriceTable
from ember.protocol.requests import ChatCompletionRequest, CompletionRequest


def test_cached_tokens_at_their_own_price_and_batches_discounted():
    table = PriceTable.parse(
        {"models": {"m": {"input": 1.0, "cached_input": 0.25, "output": 4.0}}, "batch_discount": 0.5}
    )
    # 1000 prompt tokens of which 400 cached, 100 output: (600 * 1 + 400 * 0.25 + 100 * 4) / 1e6
    assert table.cost("m", 1000, 400, 100, batch=False) == pytest.approx(1.1e-3)
    assert table.cost("m", 1000, 400, 100, batch=True) == pytest.approx(0.55e-3)
    assert table.cost("unlisted", 1000, 0, 100, batch=False) == 0.0


def test_cached_price_defaults_to_the_input_price():
    table = PriceTable.parse({"models": {"m": {"input": 2.0, "output": 2.0}}})
    assert table.cost("m", 10, 10, 0, batch=False) == pytest.approx(2e-5)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"models": {"m": {"input": -1}}}, "non-negative"),
        ({"models": {"m": {"inptu": 1}}}, "models.m"),
        ({"batch_discount": 2}, "batch_discount"),
        ({"currency": "eur"}, "unknown field 'currency'"),
    ],
)
def test_bad_price_tables_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        PriceTable.parse(spec)


def test_yaml_and_json_files(tmp_path):
    (tmp_path / "p.yaml").write_text("models:\n  m: {input: 1, output: 3}\n")
    (tmp_path / "p.json").write_text('{"models": {"m": {"input": 1, "output": 3}}}')
    assert PriceTable.load(tmp_path / "p.yaml") == PriceTable.load(tmp_path / "p.json")


def test_estimates_bound_the_request():
    chat = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 7, "n": 2}
    )
    assert estimate_prompt(chat) == 10 + 4 and estimate_output(chat) == 14
    done = CompletionRequest.model_validate({"model": "m", "prompt": [[1, 2, 3], [4]]})
    assert estimate_prompt(done) == 4 and estimate_output(done) == 2 * 16
