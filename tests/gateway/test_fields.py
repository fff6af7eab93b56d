import pytest
from openai.types import completion_create_params as completion_params
from openai.types.chat import completion_create_params as chat_params

from ember.errors import InvalidRequest
from ember.gateway.fields import OPENAI_CHAT, OPENAI_COMPLETIONS, upstream_body
from ember.protocol.requests import ChatCompletionRequest, CompletionRequest

MESSAGES = [{"role": "user", "content": "hi"}]


def test_openai_fields_are_the_sdks_that_ember_declares():
    """The lists are OpenAI's own (as the SDK declares them, plus `stream`), narrowed to what ember takes."""
    for ours, sdk, body in (
        (OPENAI_CHAT, chat_params.CompletionCreateParamsBase, ChatCompletionRequest),
        (OPENAI_COMPLETIONS, completion_params.CompletionCreateParamsBase, CompletionRequest),
    ):
        assert ours == (set(sdk.__annotations__) | {"stream"}) & set(body.model_fields)


def test_only_what_the_client_sent_goes_under_the_upstreams_name():
    body = ChatCompletionRequest.model_validate({"model": "up/m", "messages": MESSAGES, "temperature": 0})
    assert upstream_body(body, "m", "up", ember=False) == {
        "model": "m",
        "messages": MESSAGES,
        "temperature": 0,
    }


@pytest.mark.parametrize(
    "field,value", [("top_k", 5), ("priority", 3), ("guided_regex", "a+"), ("echo", True)]
)
def test_ember_fields_are_refused_for_a_non_ember_upstream(field, value):
    body = ChatCompletionRequest.model_validate({"model": "up/m", "messages": MESSAGES, field: value})
    with pytest.raises(InvalidRequest) as refused:
        upstream_body(body, "m", "up", ember=False)
    assert refused.value.param == field and "'up'" in str(refused.value)
    assert upstream_body(body, "m", "up", ember=True)[field] == value


def test_completions_echo_is_openais():
    body = CompletionRequest.model_validate({"model": "up/m", "prompt": "hi", "echo": True, "best_of": 1})
    assert upstream_body(body, "m", "up", ember=False) == {
        "model": "m",
        "prompt": "hi",
        "echo": True,
        "best_of": 1,
    }


def test_unknown_fields_let_through_are_not_forwarded():
    body = ChatCompletionRequest.model_validate({"model": "up/m", "messages": MESSAGES, "mine": 1})
    assert "mine" not in upstream_body(body, "m", "up", ember=True)
