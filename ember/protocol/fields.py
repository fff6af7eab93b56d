"""Which request fields ember takes: every field of OpenAI's chat, completions and embeddings bodies is
either served, accepted as harmless, or refused with why; a field nobody defines is refused by name.

OpenAI answers an unknown field with a 400 naming it, and so does ember, unless the server runs with
`--allow-unknown-fields` for clients that send extras of their own. An explicit null counts as absent,
as it does for every other field.
"""

from __future__ import annotations

from typing import Any

from ember.errors import InvalidRequest

# Defined by OpenAI, not served by ember: refused with what to do instead, whatever the switch says.
NOT_SERVED = {
    "functions": "the legacy 'functions' are not served; use 'tools'",
    "function_call": "the legacy 'function_call' is not served; use 'tool_choice'",
    "audio": "'audio' is not supported: this server generates text only",
    "prediction": "'prediction' (predicted outputs) is not supported by this server",
    "reasoning_effort": "'reasoning_effort' is not supported: the served models do not reason",
    "verbosity": "'verbosity' is not supported by this server; bound the answer with max_tokens",
    "web_search_options": "'web_search_options' is not supported: this server does not search the web",
    "moderation": "'moderation' is not supported by this server",
    "suffix": "'suffix' (insertion) is not supported by this server",
}


def check(extra: dict[str, Any], allow_unknown: bool) -> None:
    """400 for a field in `extra` (what the body's model does not declare) that OpenAI defines and ember
    does not serve, and, unless `allow_unknown`, for any other."""
    given = {k: v for k, v in extra.items() if v is not None}
    for name in given:
        if name in NOT_SERVED:
            raise InvalidRequest(NOT_SERVED[name], param=name, code="unsupported_parameter")
    if given and not allow_unknown:
        name = next(iter(given))
        raise InvalidRequest(
            f"Unrecognized request argument supplied: '{name}' (this server does not know it; a server "
            "started with --allow-unknown-fields ignores such fields)",
            param=name,
            code="unknown_parameter",
        )
