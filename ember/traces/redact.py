"""Redaction: what is blanked out of a trace before it is written (the request, the response and the
metadata values; every string in them).

The built-in patterns catch e-mail addresses, phone numbers, card numbers (13 to 19 digits standing
alone, that pass the Luhn check) and bearer tokens / API keys; each match becomes `[REDACTED:<kind>]`. An operator adds patterns with
`--trace-redact PATTERN` (a Python regex; a match becomes `[REDACTED]`) and turns the built-ins off with
`--trace-redact off`. Regexes miss what they were not written for: this lowers what a trace holds, it does
not make a trace safe to publish.
"""

from __future__ import annotations

import re
from typing import Any

OFF = "off"

# Order matters: a card number is taken before its digit groups could read as a phone number, a key
# before the e-mail rule could take part of it.
BUILTIN: tuple[tuple[str, str], ...] = (
    ("secret", r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}"),
    ("secret", r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{16,}"),  # OpenAI, Stripe and look-alikes
    ("secret", r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"),  # AWS access key ids
    ("secret", r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),  # GitHub tokens
    ("secret", r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),  # Slack tokens
    ("secret", r"(?i)\b(?:api[_-]?key|secret|token|password)\b\s*[:=]\s*['\"]?[^\s'\",;]{6,}"),
    ("email", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
    # 13 to 19 digits, spaces or dashes between, not inside a word (a hex id holds digit runs); the Luhn
    # check below keeps the rest of the false matches out
    ("card", r"(?<![\w-])(?:\d[ -]?){12,18}\d(?![\w-])"),
    ("phone", r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)\s?|\d{2,4}[\s.-])\d{3,4}[\s.-]?\d{3,4}(?!\w)"),
)


class Redactor:
    """Applies the patterns to every string of a JSON value."""

    def __init__(self, patterns: list[tuple[str, re.Pattern]]):
        self.patterns = patterns

    @classmethod
    def from_specs(cls, specs: list[str]) -> Redactor:
        """`--trace-redact` values: regexes added to the built-ins; `off` drops the built-ins."""
        found = [(kind, re.compile(p)) for kind, p in BUILTIN] if OFF not in specs else []
        for spec in specs:
            if spec != OFF:
                found.append(("", compile_pattern(spec)))
        return cls(found)

    def text(self, s: str) -> str:
        for kind, pattern in self.patterns:
            if kind == "card":
                s = pattern.sub(lambda m: "[REDACTED:card]" if luhn(m.group()) else m.group(), s)
            else:
                s = pattern.sub(f"[REDACTED:{kind}]" if kind else "[REDACTED]", s)
        return s

    def value(self, v: Any) -> Any:
        """A copy of a JSON value with every string (dict keys aside) redacted."""
        if not self.patterns:
            return v
        if isinstance(v, str):
            return self.text(v)
        if isinstance(v, dict):
            return {k: self.value(x) for k, x in v.items()}
        if isinstance(v, list):
            return [self.value(x) for x in v]
        return v


def luhn(number: str) -> bool:
    """Whether a digit run (spaces and dashes ignored) passes the Luhn check every card number passes."""
    digits = [int(c) for c in number if c.isdigit()]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def compile_pattern(spec: str) -> re.Pattern:
    try:
        return re.compile(spec)
    except re.error as exc:
        raise ValueError(f"--trace-redact {spec!r} is not a valid regular expression: {exc}") from None
