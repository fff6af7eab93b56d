"""A pipeline spec: named steps and how data flows between them, in YAML or as these pydantic models.

Data flows through templates (ember.evals.template: `{{input}}`, `{{triage.label}}`, `{{item}}`): a step
reads the request's last user message as `input` and each step it names by its value (text, or the
parsed JSON of a step with a `response_format`). The kinds:

- `generate`: one chat request to a model, adapter or alias (or a --provider's NAME/model).
- `tool`: an MCP tool of the server's --mcp hub, or a Python function (`module:attr`), on rendered arguments.
- `route`: picks one of `routes` (label -> step) by an LLM `classifier` (its answer constrained to the
  labels), an `embedding` match against examples, or a `learned` router (ember.router); its value is the
  value of the step it picked. The branches run only when picked.
- `map` / `filter`: one prompt per item of a list, all submitted at once (semantic operators: LOTUS's
  sem_map / sem_filter); a map's value is the list of answers, a filter's the items the model kept.
- `check`: grades `target`'s value with an evals grader; on a failure it runs `target` again (`retries`),
  then `fallback`, and else fails the request.

Structural checks (references, cycles, schemas) are in ember.pipelines.check.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
RESERVED = ("input", "item", "sample")  # template namespaces that are not steps
DEFAULT_TIMEOUT_S = 60.0


class SpecError(ValueError):
    """A refused pipeline: the step and field at fault, and what to change."""

    def __init__(self, message: str, step: str | None = None, field: str | None = None):
        where = ""
        if step is not None:
            where = f"step '{step}'" + (f" field '{field}'" if field else "") + ": "
        elif field is not None:
            where = f"field '{field}': "
        super().__init__(where + message)
        self.step, self.field = step, field


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    timeout_s: float = Field(DEFAULT_TIMEOUT_S, gt=0)  # a step past it fails the request (or its check)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME.match(v):
            raise ValueError("a step name is letters, digits and '_', starting with a letter or '_'")
        if v in RESERVED:
            raise ValueError(f"'{v}' names a template namespace; pick another name")
        return v


class _Prompted(_Step):
    """A step that asks a model: a `prompt` (one user message) or `messages` ({role, content} templates)."""

    model: str
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    system: str | None = None
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)

    def templates(self) -> dict[str, str]:
        """Field path -> template text, for the checks."""
        out = {}
        if self.prompt is not None:
            out["prompt"] = self.prompt
        if self.system is not None:
            out["system"] = self.system
        for i, m in enumerate(self.messages or []):
            out[f"messages[{i}].content"] = m.get("content", "")
        return out


class GenerateStep(_Prompted):
    kind: Literal["generate"]
    response_format: dict | None = None  # a JSON schema: the answer is constrained to it and parsed


class ToolStep(_Step):
    kind: Literal["tool"]
    mcp: str | None = None  # LABEL/TOOL of an --mcp server
    function: str | None = None  # module:attr, a Python function (sync or async) of the arguments
    arguments: dict[str, Any] = Field(default_factory=dict)  # values are templates
    output_schema: dict | None = None  # what it returns, if known: lets later steps' references be checked

    def templates(self) -> dict[str, str]:
        return {f"arguments.{k}": v for k, v in self.arguments.items() if isinstance(v, str)}


class RouteStep(_Step):
    kind: Literal["route"]
    by: Literal["classifier", "embedding", "learned"]
    routes: dict[str, str]  # label (a classifier's, an example set's, a router's candidate) -> step
    input: str = "{{input}}"  # what is classified, matched or routed
    # classifier: the model that picks a label, and the instruction it reads before `input`.
    model: str | None = None
    instruction: str | None = None
    # embedding: example texts per label; the nearest label by cosine (of the server's embedding model).
    examples: dict[str, list[str]] | None = None
    embedding_model: str | None = None
    # learned: the router file (ember router train), its cost/quality threshold.
    path: str | None = None
    threshold: float = 0.5
    default: str | None = None  # the label taken when the choice names no route

    def templates(self) -> dict[str, str]:
        return {"input": self.input} | ({"instruction": self.instruction} if self.instruction else {})


class MapStep(_Prompted):
    kind: Literal["map"]
    over: str  # a reference to a list: `step` or `step.field`
    response_format: dict | None = None


class FilterStep(_Prompted):
    kind: Literal["filter"]
    over: str


class CheckStep(_Step):
    kind: Literal["check"]
    target: str
    grader: dict  # an evals grader (ember.evals.criteria): `sample.output_text` is the target's answer
    retries: int = Field(0, ge=0, le=5)
    fallback: str | None = None

    def templates(self) -> dict[str, str]:
        return {}


Step = Annotated[
    GenerateStep | ToolStep | RouteStep | MapStep | FilterStep | CheckStep, Field(discriminator="kind")
]


class Pipeline(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: list[Step] = Field(min_length=1)
    output: str  # the step whose value answers the request (streamed, if it is a generate step)
    description: str | None = None
    name: str = "pipeline"  # the model name it is served under (set by --pipeline NAME=...)

    def step(self, name: str):
        return self.by_name()[name]

    def by_name(self) -> dict[str, Any]:
        return {s.name: s for s in self.steps}


def parse(data: Any, name: str = "pipeline") -> Pipeline:
    """A pipeline from its parsed YAML/JSON, checked (ember.pipelines.check); SpecError naming the step
    and field at fault."""
    from ember.pipelines.check import check

    if not isinstance(data, dict):
        raise SpecError("a pipeline spec is a mapping with `steps` and `output`")
    try:
        pipeline = Pipeline.model_validate({**data, "name": name})
    except ValidationError as exc:
        raise _described(exc, data) from None
    check(pipeline)
    return pipeline


def load(path: str | Path, name: str = "pipeline") -> Pipeline:
    """A pipeline from a YAML (or JSON) file."""
    try:
        data = yaml.safe_load(Path(path).expanduser().read_text())
    except OSError as exc:
        raise SpecError(f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path} is not valid YAML: {exc}") from None
    return parse(data, name)


def _described(exc: ValidationError, data: dict) -> SpecError:
    """pydantic's first error as a SpecError naming the step (by its name where it has one) and field."""
    error = exc.errors()[0]
    loc = list(error.get("loc", ()))
    msg = error.get("msg", "invalid value").removeprefix("Value error, ")
    if error.get("type") == "union_tag_invalid" or error.get("type") == "union_tag_not_found":
        msg = "kind must be one of generate, tool, route, map, filter, check"
    if len(loc) >= 2 and loc[0] == "steps" and isinstance(loc[1], int):
        raw = (data.get("steps") or [])[loc[1]]
        step = raw.get("name") if isinstance(raw, dict) and isinstance(raw.get("name"), str) else None
        rest = [str(p) for p in loc[2:] if p not in ("generate", "tool", "route", "map", "filter", "check")]
        field = ".".join(rest) or ("kind" if error.get("type", "").startswith("union_tag") else None)
        return SpecError(msg, step or f"#{loc[1]}", field)
    return SpecError(msg, field=".".join(str(p) for p in loc) or None)
