"""What a request body asks its output to be: OpenAI's response_format (with Fireworks' grammar type) and
vLLM's structured_outputs object; each becomes a StructuredOutputs (ember/structured_outputs.py)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ember.errors import InvalidRequest
from ember.structured_outputs import StructuredOutputs


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format, plus Fireworks' `grammar` type (a GBNF grammar) and its `json_object`
    with a `schema`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)
    type: Literal["text", "json_object", "json_schema", "grammar"]
    json_schema: JSONSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    grammar: str | None = None

    @model_validator(mode="after")
    def _fields_match_type(self):
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("type 'json_schema' needs json_schema.schema")
        if self.type == "grammar" and not self.grammar:
            raise ValueError("type 'grammar' needs a non-empty 'grammar' (GBNF)")
        if self.grammar is not None and self.type != "grammar":
            raise ValueError("'grammar' is only allowed with type 'grammar'")
        return self

    def constraint(self) -> StructuredOutputs | None:
        if self.type == "json_schema":
            return StructuredOutputs(json=self.json_schema.schema_)
        if self.type == "json_object":
            return (
                StructuredOutputs(json=self.schema_) if self.schema_ else StructuredOutputs(json_object=True)
            )
        if self.type == "grammar":
            return StructuredOutputs(grammar=self.grammar)
        return None


class GuidedOutputs(BaseModel):
    """vLLM's `structured_outputs` object: exactly one of json, regex, choice, grammar, json_object."""

    model_config = ConfigDict(extra="forbid", strict=True)
    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(default=None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None

    def constraint(self) -> StructuredOutputs:
        try:
            return StructuredOutputs(
                json=self.json_,
                regex=self.regex,
                choice=self.choice,
                grammar=self.grammar,
                json_object=bool(self.json_object),
            )
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="structured_outputs") from None


# vLLM's older spelling of each structured_outputs kind.
GUIDED = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
