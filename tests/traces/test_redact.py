"""The built-in patterns blank what they are for and leave ordinary text alone; operators add and drop."""

from __future__ import annotations

import pytest

from ember.traces.redact import Redactor


@pytest.mark.parametrize(
    "text,kind",
    [
        ("mail jane.doe+x@mail.example.co.uk now", "email"),
        ("call +1 415-555-0132 today", "phone"),
        ("call (415) 555-0132 today", "phone"),
        ("card 4111 1111 1111 1111 ok", "card"),
        ("card 4111-1111-1111-1111 ok", "card"),
        ("Authorization: Bearer abcDEF123456789xyz", "secret"),
        ("key sk-proj-AbCdEfGhIjKlMnOpQrSt", "secret"),
        ("api_key=s3cr3tvalue99", "secret"),
    ],
)
def test_builtin_patterns_blank_what_they_name(text, kind):
    out = Redactor.from_specs([]).text(text)
    assert f"[REDACTED:{kind}]" in out, out


@pytest.mark.parametrize(
    "text",
    [
        "In 2024 we sold 1,500 units at 3.14 each.",
        "version 1.2.3",
        "id 12345",
        "chatcmpl-8023ad938ebb4429858618771ed81890",  # a digit run inside a hex id (a CI failure)
        "order 4111111111111112 ok",  # card-shaped, fails the Luhn check
    ],
)
def test_ordinary_text_is_left_alone(text):
    assert Redactor.from_specs([]).text(text) == text


def test_operator_patterns_add_to_the_builtins_and_off_drops_them():
    both = Redactor.from_specs([r"ACME-\d+"])
    assert both.value({"a": ["ACME-42 bob@x.org"]}) == {"a": ["[REDACTED] [REDACTED:email]"]}
    only = Redactor.from_specs(["off", r"ACME-\d+"])
    assert only.text("ACME-42 bob@x.org") == "[REDACTED] bob@x.org"
    assert Redactor.from_specs(["off"]).value({"k": "bob@x.org"}) == {"k": "bob@x.org"}
    with pytest.raises(ValueError, match="not a valid regular expression"):
        Redactor.from_specs(["("])
