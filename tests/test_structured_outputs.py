"""The request side of structured outputs: the spec and the schema rewriting, without an engine."""

from __future__ import annotations

from ember.structured_outputs import closed


def test_closed_shuts_listed_objects_only():
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"b": {"type": "integer"}}},
            "c": {"const": {"properties": {}}},
        },
        "$defs": {"open": {"type": "object", "properties": {}, "additionalProperties": True}},
    }
    out = closed(schema)
    assert out["additionalProperties"] is False and out["properties"]["a"]["additionalProperties"] is False
    assert out["properties"]["c"] == {"const": {"properties": {}}}  # data, untouched
    assert out["$defs"]["open"]["additionalProperties"] is True
    assert "additionalProperties" not in schema  # the caller's schema is not changed
