"""A pipeline's structure checked at load, before anything runs: every reference names a step defined, no
cycles, a route's branches and a check's fallback used by their owner only, every step used by the
output, and each reference fits what the step it names answers (a field of its JSON schema, a list where
a list is read). Models are checked against the server's names when it is served (`check_models`).

A step's answer is described by a JSON schema: text is `{"type": "string"}`; None is unknown (a tool
without `output_schema`), which no check can refuse.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from ember.errors import InvalidRequest
from ember.evals.criteria import check_criteria
from ember.evals.template import variables
from ember.pipelines.spec import CheckStep, FilterStep, MapStep, Pipeline, RouteStep, SpecError, ToolStep

TEXT = {"type": "string"}


def check(pipeline: Pipeline) -> None:
    steps = pipeline.by_name()
    if len(steps) != len(pipeline.steps):
        seen: set[str] = set()
        for s in pipeline.steps:
            if s.name in seen:
                raise SpecError("is defined twice", s.name, "name")
            seen.add(s.name)
    if pipeline.output not in steps:
        raise SpecError(f"names no step; steps: {', '.join(steps)}", field="output")
    for s in pipeline.steps:
        _own_fields(s)
    owners = _owners(pipeline)
    edges = {s.name: _edges(s, steps) for s in pipeline.steps}
    for name, targets in edges.items():
        for target, field in targets:
            owner = owners.get(target)
            if owner is not None and owner != name:
                raise SpecError(
                    f"'{target}' runs only when '{owner}' picks it; refer to '{owner}' instead", name, field
                )
    _acyclic(edges)
    if pipeline.output in owners:
        raise SpecError(
            f"'{pipeline.output}' runs only when '{owners[pipeline.output]}' picks it", field="output"
        )
    used = _reached(pipeline.output, edges)
    for s in pipeline.steps:
        if s.name not in used:
            raise SpecError(
                f"is not used by the output '{pipeline.output}'; remove it or refer to it", s.name
            )
    schemas: dict[str, dict | None] = {}
    for name in _order(pipeline.output, edges):
        schemas[name] = _schema(steps[name], steps, schemas)


def check_models(pipeline: Pipeline, known: Callable[[str], bool], names: list[str]) -> None:
    """Every step's model is one the server serves (`known`); `names` lists them in the error."""
    for s in pipeline.steps:
        for field in ("model", "embedding_model"):
            model = getattr(s, field, None)
            if model is not None and not known(model):
                raise SpecError(f"unknown model '{model}'; known: {', '.join(names)}", s.name, field)


def _own_fields(s) -> None:
    """What one step needs of its own fields, whatever the rest of the pipeline is."""
    if hasattr(s, "messages") and (s.prompt is None) == (s.messages is None):  # a step that asks a model
        raise SpecError("give exactly one of `prompt` and `messages`", s.name, "prompt")
    if isinstance(s, ToolStep):
        if (s.mcp is None) == (s.function is None):
            raise SpecError(
                "give exactly one of `mcp` (LABEL/TOOL) and `function` (module:attr)", s.name, "mcp"
            )
        if s.mcp is not None and s.mcp.count("/") != 1:
            raise SpecError(f"'{s.mcp}' is not LABEL/TOOL", s.name, "mcp")
        if s.function is not None:
            resolve_function(s.function, s.name)
    if isinstance(s, RouteStep):
        if not s.routes:
            raise SpecError("a route needs at least one label -> step", s.name, "routes")
        if s.default is not None and s.default not in s.routes:
            raise SpecError(f"'{s.default}' is none of the routes' labels", s.name, "default")
        need = {"classifier": "model", "embedding": "examples", "learned": "path"}[s.by]
        if getattr(s, need) is None:
            raise SpecError(f"a route by {s.by} needs `{need}`", s.name, need)
        if s.by == "embedding" and set(s.examples) != set(s.routes):
            raise SpecError(
                f"the labels with examples ({', '.join(sorted(s.examples))}) must be the routes' "
                f"({', '.join(sorted(s.routes))})",
                s.name,
                "examples",
            )
    if isinstance(s, CheckStep):
        try:
            check_criteria([s.grader], param="grader")
        except InvalidRequest as exc:
            raise SpecError(
                str(exc).removeprefix("grader[0]."), s.name, (exc.param or "grader").replace("[0]", "")
            ) from None


def resolve_function(path: str, step: str):
    """The Python function `module:attr` names; SpecError if it cannot be imported."""
    module, sep, attr = path.partition(":")
    if not sep or not module or not attr:
        raise SpecError(f"'{path}' is not module:attr", step, "function")
    try:
        found = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise SpecError(f"cannot import '{path}': {exc}", step, "function") from None
    if not callable(found):
        raise SpecError(f"'{path}' is not callable", step, "function")
    return found


def _owners(pipeline: Pipeline) -> dict[str, str]:
    """Conditional step -> the step that alone may run it (a route's branches, a check's fallback)."""
    owners: dict[str, str] = {}
    for s in pipeline.steps:
        owned = [(t, f"routes.{label}") for label, t in s.routes.items()] if isinstance(s, RouteStep) else []
        if isinstance(s, CheckStep) and s.fallback is not None:
            owned.append((s.fallback, "fallback"))
        for target, field in owned:
            if target in owners and owners[target] != s.name:
                raise SpecError(f"'{target}' is already picked by '{owners[target]}'", s.name, field)
            owners[target] = s.name
    return owners


def _edges(s, steps: dict) -> list[tuple[str, str]]:
    """(step it needs, the field that names it), each reference checked to name a step."""
    out: list[tuple[str, str]] = []
    local = ("input", "item") if isinstance(s, MapStep | FilterStep) else ("input",)
    for field, text in s.templates().items():
        for path in variables(text):
            head = path.split(".")[0]
            if head in local:
                continue
            if head == "item":
                raise SpecError("{{item}} is only defined in map and filter steps", s.name, field)
            out.append((head, field))
    if isinstance(s, MapStep | FilterStep):
        out.append((s.over.split(".")[0], "over"))
    if isinstance(s, CheckStep):
        out.append((s.target, "target"))
        if s.fallback is not None:
            out.append((s.fallback, "fallback"))
    if isinstance(s, RouteStep):
        out += [(t, f"routes.{label}") for label, t in s.routes.items()]
    for target, field in out:
        if target not in steps:
            raise SpecError(f"'{target}' is not a step; steps: {', '.join(steps)}", s.name, field)
        if target == s.name:
            raise SpecError("a step cannot refer to itself", s.name, field)
    return out


def _acyclic(edges: dict[str, list[tuple[str, str]]]) -> None:
    state: dict[str, int] = {}  # 1: on the path being walked, 2: done

    def walk(name: str, path: list[str]) -> None:
        state[name] = 1
        for target, field in edges[name]:
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [name, target] if target in path else [name, target]
                raise SpecError(
                    f"makes a cycle: {' -> '.join(dict.fromkeys(cycle[:-1]))} -> {target}", name, field
                )
            if target not in state:
                walk(target, [*path, name])
        state[name] = 2

    for name in edges:
        if name not in state:
            walk(name, [])


def _reached(start: str, edges: dict) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for target, _ in edges[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def _order(start: str, edges: dict) -> list[str]:
    """The steps `start` needs, each after what it needs."""
    out: list[str] = []

    def visit(name: str) -> None:
        if name in out:
            return
        for target, _ in edges[name]:
            visit(target)
        out.append(name)

    visit(start)
    return out


def _schema(s, steps: dict, schemas: dict[str, dict | None]) -> dict | None:
    """What `s` answers, once each of its references is checked against what it reads."""
    for field, text in s.templates().items():
        for path in variables(text):
            head, *rest = path.split(".")
            if head in schemas:
                _field(schemas[head], rest, head, s.name, field)
    if isinstance(s, MapStep | FilterStep):
        head, *rest = s.over.split(".")
        listed = _field(schemas[head], rest, head, s.name, "over")
        if listed is not None and listed.get("type") != "array":
            raise SpecError(f"'{s.over}' is not a list (it answers {_kind(listed)})", s.name, "over")
        if isinstance(s, FilterStep):
            return listed
        return {"type": "array", "items": s.response_format or TEXT}
    if isinstance(s, CheckStep):
        return schemas[s.target]
    if isinstance(s, RouteStep):
        found = [schemas[t] for t in s.routes.values()]
        return found[0] if all(f == found[0] for f in found) else None
    if isinstance(s, ToolStep):
        return s.output_schema
    return s.response_format or TEXT


def _field(schema: dict | None, rest: list[str], head: str, step: str, field: str) -> dict | None:
    """The schema at `head.rest...`; SpecError where the path leaves what `head` answers."""
    at = head
    for key in rest:
        if schema is None:
            return None
        kind = schema.get("type")
        if kind == "object":
            props = schema.get("properties") or {}
            if key not in props:
                if schema.get("additionalProperties") not in (None, False):
                    return None
                have = ", ".join(props) or "none"
                raise SpecError(f"'{at}' has no field '{key}' in its schema (fields: {have})", step, field)
            schema = props[key]
        elif kind == "array":
            if not key.isdigit():
                raise SpecError(f"'{at}' is a list: '{key}' must be an index", step, field)
            schema = schema.get("items")
        else:
            raise SpecError(f"'{at}' answers {_kind(schema)}, which has no field '{key}'", step, field)
        at += "." + key
    return schema


def _kind(schema: dict) -> str:
    return "text" if schema == TEXT else f"type {schema.get('type', 'any')}"
