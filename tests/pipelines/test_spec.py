"""Pipeline specs checked at load: a good one parses; each bad one is refused with the step and field named."""

from __future__ import annotations

import copy

import pytest

from ember.pipelines.check import check_models
from ember.pipelines.spec import SpecError, load, parse

MODEL = "smollm2-135m-instruct"

SUPPORT = {
    "steps": [
        {
            "name": "triage",
            "kind": "route",
            "by": "classifier",
            "model": MODEL,
            "routes": {"billing": "billing", "tech": "tech"},
        },
        {"name": "billing", "kind": "generate", "model": "billing-lora", "prompt": "{{input}}"},
        {"name": "tech", "kind": "generate", "model": "tech-lora", "prompt": "{{input}}"},
        {
            "name": "checked",
            "kind": "check",
            "target": "triage",
            "grader": {
                "type": "string_check",
                "name": "polite",
                "input": "{{sample.output_text}}",
                "reference": "sorry",
                "operation": "ilike",
            },
            "fallback": "careful",
        },
        {"name": "careful", "kind": "generate", "model": MODEL, "prompt": "Politely: {{input}}"},
    ],
    "output": "checked",
}

FACTS = {
    "steps": [
        {
            "name": "facts",
            "kind": "generate",
            "model": MODEL,
            "prompt": "{{input}}",
            "response_format": {
                "type": "object",
                "properties": {"claims": {"type": "array", "items": {"type": "string"}}},
                "required": ["claims"],
            },
        },
        {
            "name": "checks",
            "kind": "map",
            "over": "facts.claims",
            "model": MODEL,
            "prompt": "Is it true: {{item}}",
        },
        {"name": "summary", "kind": "generate", "model": MODEL, "prompt": "{{checks}} {{facts.claims.0}}"},
    ],
    "output": "summary",
}


def _refused(spec: dict, step: str | None, field: str | None, words: str) -> None:
    with pytest.raises(SpecError) as exc:
        parse(spec)
    assert (exc.value.step, exc.value.field) == (step, field), str(exc.value)
    assert words in str(exc.value)
    if step is not None:
        assert f"step '{step}'" in str(exc.value)


def test_good_specs_parse_from_yaml_and_dicts(tmp_path):
    import yaml

    path = tmp_path / "support.yaml"
    path.write_text(yaml.safe_dump(SUPPORT))
    pipeline = load(path, "support")
    assert pipeline.name == "support" and pipeline.output == "checked"
    assert [s.kind for s in pipeline.steps] == ["route", "generate", "generate", "check", "generate"]
    assert parse(FACTS).step("checks").over == "facts.claims"


def _with(spec: dict, index: int, **fields) -> dict:
    spec = copy.deepcopy(spec)
    spec["steps"][index].update(fields)
    return spec


def test_a_cycle_is_refused_naming_its_steps():
    with pytest.raises(SpecError) as exc:
        parse(_with(FACTS, 0, prompt="{{summary}}"))
    assert exc.value.step in ("facts", "checks", "summary")
    assert "makes a cycle" in str(exc.value) and "facts" in str(exc.value) and "summary" in str(exc.value)


def test_an_undefined_reference_is_refused():
    _refused(_with(FACTS, 2, prompt="{{chekcs}}"), "summary", "prompt", "'chekcs' is not a step")
    _refused(
        _with(SUPPORT, 0, routes={"billing": "billing", "tech": "tehc"}), "triage", "routes.tech", "tehc"
    )
    _refused(_with(SUPPORT, 3, fallback="nowhere"), "checked", "fallback", "'nowhere' is not a step")


def test_an_output_that_does_not_fit_the_next_steps_schema_is_refused():
    _refused(
        _with(FACTS, 2, prompt="{{checks}} {{facts.sources}}"), "summary", "prompt", "no field 'sources'"
    )
    text = copy.deepcopy(FACTS)
    del text["steps"][0]["response_format"]
    _refused(text, "checks", "over", "answers text")


def test_an_unknown_model_is_refused_at_serve_time():
    pipeline = parse(SUPPORT)
    names = [MODEL, "billing-lora"]
    with pytest.raises(SpecError) as exc:
        check_models(pipeline, lambda m: m in names, names)
    assert (exc.value.step, exc.value.field) == ("tech", "model")
    assert "unknown model 'tech-lora'" in str(exc.value)


def test_other_mistakes_name_the_step_and_field():
    _refused(_with(SUPPORT, 1, kind="generat"), "billing", "kind", "kind must be one of")
    _refused(_with(SUPPORT, 1, temperature=9), "billing", "temperature", "less than or equal")
    _refused(
        _with(SUPPORT, 3, grader={"type": "string_check", "name": "x"}), "checked", "grader.input", "string"
    )
    _refused(_with(SUPPORT, 2, prompt="{{billing}}"), "tech", "prompt", "runs only when 'triage' picks it")
    _refused(_with(SUPPORT, 1, prompt="{{item}}"), "billing", "prompt", "only defined in map and filter")
    unused = copy.deepcopy(SUPPORT)
    unused["steps"].append({"name": "spare", "kind": "generate", "model": MODEL, "prompt": "hi"})
    _refused(unused, "spare", None, "not used by the output")
    _refused({**SUPPORT, "output": "nope"}, None, "output", "names no step")
    _refused(_with(SUPPORT, 0, by="embedding"), "triage", "examples", "needs `examples`")
