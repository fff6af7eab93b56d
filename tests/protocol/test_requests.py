"""Request bodies: strict JSON types, every OpenAI field either served, harmless or refused by name, and
vLLM's and Fireworks' extras mapped onto what ember has."""

from __future__ import annotations

import typing

import pytest
from openai.types import completion_create_params, embedding_create_params
from openai.types.chat import completion_create_params as chat_create_params
from pydantic import ValidationError

from ember.errors import InvalidRequest
from ember.protocol import fields
from ember.protocol.requests import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from ember.structured_outputs import StructuredOutputs
from tests.helpers import ADD

USER = [{"role": "user", "content": "hi"}]


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": kw.pop("messages", USER), **kw})


def refusal(make, **kw) -> InvalidRequest:
    body = make(**kw)
    with pytest.raises(InvalidRequest) as err:
        body.check_supported()
    return err.value


@pytest.mark.parametrize(
    "field,value",
    [
        ("logprobs", "yes"),
        ("stream", "yes"),
        ("stream", 1),
        ("max_tokens", "5"),
        ("max_tokens", 5.0),
        ("temperature", "1"),
        ("temperature", True),
        ("n", True),
        ("seed", "7"),
        ("user", 5),
        ("parallel_tool_calls", "false"),
        ("messages", [{"role": "user", "content": 5}]),
        ("stop", 5),
    ],
)
def test_wrong_json_types_are_refused_not_coerced(field, value):
    with pytest.raises(ValidationError) as err:
        chat(**{field: value})
    assert err.value.errors()[0]["loc"][0] == field


@pytest.mark.parametrize("prompt", [[True, False], [1, "a"], [[1], ["a"]], [[True]], 5, [1.0]])
def test_a_prompt_is_one_of_its_shapes_and_a_bool_is_no_token_id(prompt):
    with pytest.raises(ValidationError) as err:
        CompletionRequest.model_validate({"model": "m", "prompt": prompt})
    (e,) = err.value.errors()  # one error for the union, at the field
    assert e["loc"] == ("prompt",) and "list of token ids" in e["msg"]
    with pytest.raises(ValidationError):
        EmbeddingRequest.model_validate({"model": "m", "input": prompt})


def test_numbers_may_be_integers_and_nulls_are_defaults():
    body = chat(temperature=1, top_p=1, presence_penalty=0, logit_bias={"5": 3}, n=None, stream=None)
    assert body.temperature == 1.0 and body.n == 1 and body.stream is False
    assert CompletionRequest.model_validate({"model": "m", "prompt": [[1, 2], [3]]}).prompts() == [
        [1, 2],
        [3],
    ]


def test_unknown_fields_are_refused_by_name_unless_the_server_allows_them():
    err = refusal(chat, frobnicate=1)
    assert err.param == "frobnicate" and err.code == "unknown_parameter"
    assert "frobnicate" in str(err)
    chat(frobnicate=1).check_supported(allow_unknown=True)
    chat(frobnicate=None).check_supported()  # an explicit null is no value
    err = refusal(lambda **kw: EmbeddingRequest.model_validate({"model": "m", "input": "x", **kw}), extra=1)
    assert err.param == "extra" and err.code == "unknown_parameter"


@pytest.mark.parametrize("name", sorted(fields.NOT_SERVED))
def test_openai_fields_not_served_are_refused_even_where_extras_are_allowed(name):
    body = chat(**{name: {"x": 1}})
    with pytest.raises(InvalidRequest) as err:
        body.check_supported(allow_unknown=True)
    assert err.value.param == name and err.value.code == "unsupported_parameter"


def test_harmless_openai_fields_are_accepted():
    chat(
        user="u", metadata={"k": "v"}, store=False, service_tier="auto", safety_identifier="s",
        prompt_cache_key="k", modalities=["text"],
    ).check_supported()  # fmt: skip
    with pytest.raises(ValidationError):
        chat(modalities=["text", "audio"])


def _keys(typed_dict) -> set[str]:
    return set(typing.get_type_hints(typed_dict))


@pytest.mark.parametrize(
    "params,model",
    [
        (chat_create_params.CompletionCreateParamsBase, ChatCompletionRequest),
        (completion_create_params.CompletionCreateParamsBase, CompletionRequest),
        (embedding_create_params.EmbeddingCreateParams, EmbeddingRequest),
    ],
    ids=["chat", "completions", "embeddings"],
)
def test_every_field_of_the_openai_sdk_is_served_or_refused_by_name(params, model):
    """The installed SDK's request fields: each is a field of ember's body or one it refuses with why
    (never the generic unknown-field answer)."""
    unknown = _keys(params) - set(model.model_fields) - set(fields.NOT_SERVED)
    assert not unknown, f"{model.__name__} knows nothing of {sorted(unknown)}"


def test_vllm_guided_fields_and_structured_outputs_become_constraints():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert chat(guided_json=schema).structured() == StructuredOutputs(json=schema)
    assert chat(guided_choice=["yes", "no"]).structured() == StructuredOutputs(choice=["yes", "no"])
    assert chat(guided_regex="[0-9]+").structured() == StructuredOutputs(regex="[0-9]+")
    assert chat(guided_grammar='start: "x"').structured() == StructuredOutputs(grammar='start: "x"')
    got = chat(structured_outputs={"json": schema}).structured()
    assert got == StructuredOutputs(json=schema)
    assert chat(structured_outputs={"json_object": True}).structured() == StructuredOutputs(json_object=True)
    assert chat(response_format={"type": "text"}, guided_regex="a").structured() == StructuredOutputs(
        regex="a"
    )
    with pytest.raises(ValidationError):
        chat(structured_outputs={"json": schema, "disable_any_whitespace": True})
    err = refusal(chat, structured_outputs={"regex": "a", "choice": ["b"]})
    assert err.param == "structured_outputs"


@pytest.mark.parametrize(
    "kw,param",
    [
        ({"response_format": {"type": "json_object"}, "guided_json": {"type": "object"}}, "guided_json"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
        ({"guided_json": {}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
        ({"tools": [ADD], "guided_json": {"type": "object"}}, "guided_json"),
    ],
)
def test_conflicting_constraints_are_refused(kw, param):
    assert refusal(chat, **kw).param == param


def test_template_switches():
    partial = USER + [{"role": "assistant", "content": "The answer is"}]
    body = chat(messages=partial, continue_final_message=True)
    assert body.add_generation_prompt is False  # continuing the message opens no new one
    with pytest.raises(ValidationError, match="cannot both be true"):
        chat(messages=partial, continue_final_message=True, add_generation_prompt=True)
    with pytest.raises(ValidationError, match="assistant"):
        chat(continue_final_message=True)
    assert chat(chat_template_kwargs={"enable_thinking": False}).chat_template_kwargs == {
        "enable_thinking": False
    }
    for key in ("messages", "add_generation_prompt", "not a name"):
        with pytest.raises(ValidationError, match="chat_template_kwargs"):
            chat(chat_template_kwargs={key: 1})


def test_fireworks_fields():
    body = chat(
        perf_metrics_in_response=True, raw_output=True, echo=True, context_length_exceeded_behavior="truncate"
    )
    body.check_supported()
    with pytest.raises(ValidationError):
        chat(context_length_exceeded_behavior="drop")
    assert refusal(chat, echo=True, tools=[ADD]).param == "echo"
    completion = lambda **kw: CompletionRequest.model_validate({"model": "m", "prompt": "x", **kw})  # noqa: E731
    assert refusal(completion, echo=True, logprobs=2).param == "echo"
    completion(echo=True).check_supported()
