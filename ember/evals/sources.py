"""A run's data: the eval's `custom` data source config, and a run's data source (`jsonl` or
`completions`) with its items read from `file_content` or a /v1/files file and checked against the
eval's item schema. Errors are InvalidRequest naming the field at fault."""

from __future__ import annotations

import json

import jsonschema

from ember.errors import InvalidRequest
from ember.evals.sampling import check_input_messages, check_sampling_params

MAX_ITEMS = 10_000
SAMPLE_SCHEMA = {  # what {{sample.*}} holds, as OpenAI describes it
    "type": "object",
    "properties": {
        "model": {"type": "string"},
        "choices": {"type": "array"},
        "output_text": {"type": "string"},
        "output_json": {},
    },
}


def data_source_config(config: dict) -> dict:
    """The eval's data_source_config as answered: {type: custom, schema: {item, sample?}}."""
    kind = config.get("type")
    if kind != "custom":
        raise InvalidRequest(
            f"data_source_config.type {kind!r} is not served here; use 'custom' with an item_schema",
            param="data_source_config.type",
        )
    unknown = sorted(set(config) - {"type", "item_schema", "include_sample_schema"})
    if unknown:
        raise InvalidRequest(
            f"data_source_config.{unknown[0]} is not a field", param=f"data_source_config.{unknown[0]}"
        )
    item_schema = config.get("item_schema")
    if not isinstance(item_schema, dict):
        raise InvalidRequest(
            "data_source_config.item_schema must be a JSON schema object",
            param="data_source_config.item_schema",
        )
    try:
        jsonschema.validators.validator_for(item_schema).check_schema(item_schema)
    except jsonschema.SchemaError as exc:
        raise InvalidRequest(
            f"data_source_config.item_schema is not a valid JSON schema: {exc.message}",
            param="data_source_config.item_schema",
        ) from None
    schema = {"type": "object", "properties": {"item": item_schema}, "required": ["item"]}
    if config.get("include_sample_schema"):
        schema["properties"]["sample"] = SAMPLE_SCHEMA
        schema["required"].append("sample")
    return {"type": "custom", "schema": schema}


def source_items(source: dict, schema: dict, read_file) -> list[dict]:
    """The run's items ({item, sample?}) from its source, each checked against the eval's item schema."""
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "file_content":
        content = source.get("content")
        if not isinstance(content, list):
            raise InvalidRequest(
                "data_source.source.content must be a list of {item}", param="data_source.source.content"
            )
        where = [f"data_source.source.content[{i}]" for i in range(len(content))]
        lines = content
    elif kind == "file_id":
        if not isinstance(source.get("id"), str):
            raise InvalidRequest("data_source.source.id must be a file id", param="data_source.source.id")
        lines, where = [], []
        for n, raw in enumerate(read_file(source["id"]).splitlines(), start=1):
            if raw.strip():
                try:
                    lines.append(json.loads(raw))
                except ValueError:
                    raise InvalidRequest(
                        f"line {n} of file {source['id']} is not JSON", param="data_source.source.id"
                    ) from None
                where.append(f"data_source.source.id (line {n})")
    else:
        raise InvalidRequest(
            f"data_source.source.type {kind!r} is not served here; one of: file_content, file_id",
            param="data_source.source.type",
        )
    if not lines:
        raise InvalidRequest("the data source has no items", param="data_source.source")
    if len(lines) > MAX_ITEMS:
        raise InvalidRequest(
            f"a run takes at most {MAX_ITEMS} items (got {len(lines)})", param="data_source.source"
        )
    validator = jsonschema.validators.validator_for(schema["properties"]["item"])(
        schema["properties"]["item"]
    )
    out = []
    for line, at in zip(lines, where, strict=True):
        if not isinstance(line, dict) or not isinstance(line.get("item"), dict):
            raise InvalidRequest(f"{at} must be an object with an 'item' object", param=at)
        error = next(iter(validator.iter_errors(line["item"])), None)
        if error is not None:
            path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
            raise InvalidRequest(
                f"{at}.item{path} does not match the eval's item_schema: {error.message}", param=at
            )
        if line.get("sample") is not None and not isinstance(line["sample"], dict):
            raise InvalidRequest(f"{at}.sample must be an object", param=at)
        out.append({"item": line["item"], "sample": line.get("sample")})
    return out


def check_data_source(source: dict) -> dict:
    kind = source.get("type")
    if kind == "jsonl":
        return source
    if kind != "completions":
        raise InvalidRequest(
            f"data_source.type {kind!r} is not served here; one of: jsonl, completions",
            param="data_source.type",
        )
    if not isinstance(source.get("model"), str) or not source["model"]:
        raise InvalidRequest("data_source.model must name the model to sample", param="data_source.model")
    if source.get("input_messages") is None:
        raise InvalidRequest(
            "data_source.input_messages is required for a completions run", param="data_source.input_messages"
        )
    source = {
        **source,
        "input_messages": check_input_messages(source["input_messages"], "data_source.input_messages"),
    }
    source["sampling_params"] = check_sampling_params(
        source.get("sampling_params"), "data_source.sampling_params"
    )
    return source
