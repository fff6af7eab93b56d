"""One pipeline run: each step evaluated once, when the output needs it, after what it needs.

A planner, not an interpreter: a step's references are awaited together (`asyncio.gather`), so steps
that do not depend on each other are in flight at once, and a map's or a filter's items are submitted
to the engine all at once; ember's continuous batching puts what is in flight together into the same
engine steps, and items that share their template's prefix share its KV blocks (the request's cache
namespace is every step's). A route's branches and a check's fallback run only when picked.

Every step is bounded (`timeout_s`); a step that fails raises StepFailed naming it, unless a check
around it retries it or takes its fallback. The trace lists each step run: its name, kind, model, when
it started, how long it took, its tokens and what it decided.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import time
from typing import Any, Protocol

from ember.errors import InvalidRequest
from ember.evals.graders import Judge, grade
from ember.evals.template import lookup, render, render_messages, variables
from ember.pipelines.check import resolve_function
from ember.pipelines.spec import (
    CheckStep,
    FilterStep,
    GenerateStep,
    MapStep,
    Pipeline,
    RouteStep,
    ToolStep,
)
from ember.server.backend import ClientGone, Stream
from ember.server.platform import Caller

CLASSIFY = "Classify the text into exactly one of these labels: {labels}. Answer with the label only."
_KEEP = {
    "type": "object",
    "properties": {"keep": {"type": "boolean"}},
    "required": ["keep"],
    "additionalProperties": False,
}


class StepFailed(Exception):
    """A step failed at run time (and no check took a fallback for it): the request's answer. `status`:
    400 when the step's request was refused as invalid, 504 past its timeout, 502 otherwise."""

    def __init__(self, step: str, message: str, status: int = 502):
        super().__init__(f"pipeline step '{step}' failed: {message}")
        self.step, self.status = step, status


class Services(Protocol):
    """What a run calls: the server's models (a chat body -> its answer, or a Stream with `stream`),
    embeddings, MCP tools, learned routers and `call` (for graders that ask a judge)."""

    call: Caller

    async def chat(self, body: dict, stream: bool = False) -> dict | Stream: ...

    async def embed(self, model: str | None, texts: list[str]) -> list[list[float]]: ...

    async def tool(self, label: str, name: str, arguments: dict, timeout_s: float) -> Any: ...

    def router(self, path: str) -> Any: ...

    def local(self, model: str) -> bool:
        """Whether `model` runs on ember's own engine (whose prefix cache the steps share)."""
        ...


class PipelineRun:
    def __init__(self, pipeline: Pipeline, services: Services, input_text: str, tenant: str | None = None):
        self.pipeline, self.services, self.input = pipeline, services, input_text
        self.steps = pipeline.by_name()
        self.tenant = tenant
        self.started = time.monotonic()
        self.trace: list[dict] = []
        self._values: dict[str, asyncio.Task] = {}

    # -- values ---------------------------------------------------------------------------------------

    async def value(self, name: str) -> Any:
        """The step's value, computed once for the run (a shared task: every reader awaits the same)."""
        task = self._values.get(name)
        if task is None:
            task = self._values[name] = asyncio.ensure_future(self.run_step(name))
        return await asyncio.shield(task)

    async def run_step(self, name: str, attempt: int = 0) -> Any:
        """The step evaluated afresh, its trace entry written however it ended."""
        step = self.steps[name]
        entry: dict[str, Any] = {"step": name, "kind": step.kind}
        if getattr(step, "model", None):
            entry["model"] = step.model
        if attempt:
            entry["attempt"] = attempt
        began = time.monotonic()
        try:
            return await _KINDS[step.kind](self, step, entry)
        except (StepFailed, ClientGone, asyncio.CancelledError):
            entry["status"] = "failed"
            raise
        except TimeoutError:
            entry["status"] = "failed"
            raise StepFailed(name, f"no answer within {step.timeout_s:g} s (timeout_s)", 504) from None
        except InvalidRequest as exc:
            entry["status"] = "failed"
            raise StepFailed(name, str(exc), 400) from None
        except Exception as exc:
            entry["status"] = "failed"
            raise StepFailed(name, f"{type(exc).__name__}: {exc}") from None
        finally:
            if "start_ms" not in entry:  # it failed before its inputs were ready
                self.begin(entry)
            entry.setdefault("status", "ok")
            entry["duration_ms"] = round((time.monotonic() - began) * 1000, 1)

    def begin(self, entry: dict) -> None:
        """A step's own work starts (what it reads is ready): its entry joins the trace, which so lists
        the steps in the order they did their work."""
        entry["start_ms"] = round((time.monotonic() - self.started) * 1000, 1)
        self.trace.append(entry)

    async def namespace(self, texts: list[str], entry: dict | None = None) -> dict:
        """`input` and the value of every step the templates name, those awaited together; then the step
        of `entry` begins."""
        heads = list(dict.fromkeys(p.split(".")[0] for t in texts for p in variables(t)))
        heads = [h for h in heads if h in self.steps]
        values = await asyncio.gather(*(self.value(h) for h in heads))
        if entry is not None:
            self.begin(entry)
        return {"input": self.input, **dict(zip(heads, values, strict=True))}

    # -- asking a model -------------------------------------------------------------------------------

    def body(self, step, namespace: dict, schema: dict | None = None, name: str | None = None) -> dict:
        """The chat request of a prompted step, its templates rendered over `namespace`."""
        if step.messages is not None:
            messages = render_messages(step.messages, namespace)
        else:
            messages = [{"role": "user", "content": render(step.prompt, namespace)}]
        if step.system is not None:
            messages.insert(0, {"role": "system", "content": render(step.system, namespace)})
        body = {
            "model": step.model,
            "messages": messages,
            "max_tokens": step.max_tokens,
            "temperature": step.temperature,
        }
        if schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": name or step.name, "schema": schema, "strict": True},
            }
        return body

    async def ask(self, body: dict, entry: dict, timeout_s: float, parse: bool) -> Any:
        """The model's answer to `body` (parsed JSON with `parse`), its tokens added to `entry`."""
        answer = await asyncio.wait_for(self.services.chat(body), timeout_s)
        count(entry, answer.get("usage"))
        return self.parsed(answer["choices"][0]["message"].get("content") or "", entry, parse)

    async def ask_all(self, bodies: list[dict], entry: dict, timeout_s: float, parse: bool) -> list:
        """The answers to a map's or a filter's requests. On ember's engine the first goes alone until its
        prompt is computed (a stream's first chunk comes after its prefill), so that the prefix the items
        share (their template before `{{item}}`) is in the prefix cache; then all the others at once, each
        computing only what follows that prefix."""
        if len(bodies) < 2 or not self.services.local(bodies[0]["model"]):
            return list(await asyncio.gather(*(self.ask(b, entry, timeout_s, parse) for b in bodies)))
        deadline = time.monotonic() + timeout_s
        stream = await asyncio.wait_for(self.services.chat(bodies[0], stream=True), timeout_s)

        async def lead() -> Any:
            text = ""
            try:
                async for chunk in stream.chunks:
                    count(entry, chunk.get("usage"))
                    for choice in chunk.get("choices") or []:
                        text += (choice.get("delta") or {}).get("content") or ""
            finally:
                stream.close()
            return self.parsed(text, entry, parse)

        left = max(deadline - time.monotonic(), 0.001)
        rest = [self.ask(b, entry, left, parse) for b in bodies[1:]]
        return list(await asyncio.gather(asyncio.wait_for(lead(), left), *rest))

    def parsed(self, text: str, entry: dict, parse: bool) -> Any:
        if not parse:
            return text
        try:
            return json.loads(text)
        except ValueError:
            raise StepFailed(entry["step"], f"the answer is not JSON: {text[:200]!r}") from None


def count(entry: dict, usage: dict | None) -> None:
    """Add a chat answer's usage to a trace entry."""
    if not usage:
        return
    entry["prompt_tokens"] = entry.get("prompt_tokens", 0) + usage.get("prompt_tokens", 0)
    entry["completion_tokens"] = entry.get("completion_tokens", 0) + usage.get("completion_tokens", 0)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    entry["cached_tokens"] = entry.get("cached_tokens", 0) + cached


# -- the kinds -----------------------------------------------------------------------------------------


async def _generate(run: PipelineRun, step: GenerateStep, entry: dict) -> Any:
    ns = await run.namespace(list(step.templates().values()), entry)
    body = run.body(step, ns, step.response_format)
    return await run.ask(body, entry, step.timeout_s, step.response_format is not None)


async def _tool(run: PipelineRun, step: ToolStep, entry: dict) -> Any:
    ns = await run.namespace(list(step.templates().values()), entry)
    arguments = {k: _argument(v, ns) for k, v in step.arguments.items()}
    if step.function is not None:
        fn = resolve_function(step.function, step.name)
        if inspect.iscoroutinefunction(fn):
            return await asyncio.wait_for(fn(**arguments), step.timeout_s)
        return await asyncio.wait_for(asyncio.to_thread(fn, **arguments), step.timeout_s)
    label, _, name = step.mcp.partition("/")
    result = await run.services.tool(label, name, arguments, step.timeout_s)
    if result.error is not None:
        raise StepFailed(step.name, result.error)
    try:  # a tool's text that is JSON is read as JSON (a list a map can go over, an object's fields)
        return json.loads(result.output)
    except (TypeError, ValueError):
        return result.output


def _argument(value: Any, ns: dict) -> Any:
    """A tool argument: a template that is one reference is that value itself (a list stays a list)."""
    if not isinstance(value, str):
        return value
    found = variables(value)
    if len(found) == 1 and value.strip() == "{{" + found[0] + "}}":
        return lookup(found[0], ns)
    return render(value, ns)


async def _route(run: PipelineRun, step: RouteStep, entry: dict) -> Any:
    ns = await run.namespace(list(step.templates().values()), entry)
    text = render(step.input, ns)
    labels = list(step.routes)
    if step.by == "classifier":
        instruction = (
            render(step.instruction, ns) if step.instruction else CLASSIFY.format(labels=", ".join(labels))
        )
        body = {
            "model": step.model,
            "messages": [{"role": "system", "content": instruction}, {"role": "user", "content": text}],
            "max_tokens": 32,
            "temperature": 0.0,
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "label",
                    "schema": {
                        "type": "object",
                        "properties": {"label": {"type": "string", "enum": labels}},
                        "required": ["label"],
                        "additionalProperties": False,
                    },
                    "strict": True,
                },
            },
        }
        label = (await run.ask(body, entry, step.timeout_s, True)).get("label")
    elif step.by == "embedding":
        examples = [(label, t) for label in labels for t in step.examples[label]]
        vectors = await asyncio.wait_for(
            run.services.embed(step.embedding_model, [text, *(t for _, t in examples)]), step.timeout_s
        )
        scores = {label: -math.inf for label in labels}
        for (label, _), v in zip(examples, vectors[1:], strict=True):
            scores[label] = max(scores[label], _cosine(vectors[0], v))
        label = max(scores, key=scores.get)
        entry["score"] = round(scores[label], 4)
    else:
        router = run.services.router(step.path)
        label = await asyncio.wait_for(asyncio.to_thread(router.choose, text, step.threshold), step.timeout_s)
    if label not in step.routes:
        if step.default is None:
            raise StepFailed(
                step.name, f"picked '{label}', which is none of the routes ({', '.join(labels)})"
            )
        label = step.default
    entry["picked"] = label
    entry["next"] = step.routes[label]
    return await run.run_step(step.routes[label])


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
    return dot / norm if norm > 0 else 0.0


async def _items(run: PipelineRun, step: MapStep | FilterStep, entry: dict) -> tuple[list, dict]:
    ns = await run.namespace(["{{" + step.over + "}}", *step.templates().values()], entry)
    items = lookup(step.over, ns)
    if not isinstance(items, list):
        raise StepFailed(step.name, f"'{step.over}' is not a list at run time ({type(items).__name__})")
    return items, ns


async def _map(run: PipelineRun, step: MapStep, entry: dict) -> list:
    items, ns = await _items(run, step, entry)
    entry["items"] = len(items)
    bodies = [run.body(step, {**ns, "item": item}, step.response_format) for item in items]
    return await run.ask_all(bodies, entry, step.timeout_s, step.response_format is not None)


async def _filter(run: PipelineRun, step: FilterStep, entry: dict) -> list:
    items, ns = await _items(run, step, entry)
    bodies = [run.body(step, {**ns, "item": item}, _KEEP, "keep") for item in items]
    verdicts = await run.ask_all(bodies, entry, step.timeout_s, True)
    kept = [item for item, v in zip(items, verdicts, strict=True) if isinstance(v, dict) and v.get("keep")]
    entry["items"], entry["kept"] = len(items), len(kept)
    return kept


async def _check(run: PipelineRun, step: CheckStep, entry: dict) -> Any:
    judge = Judge(run.services.call, run.tenant)
    why = ""
    for attempt in range(step.retries + 1):
        try:
            value = await (run.value(step.target) if attempt == 0 else run.run_step(step.target, attempt))
        except StepFailed as exc:
            why = str(exc)
            continue
        finally:
            if "start_ms" not in entry:
                run.begin(entry)
        text = value if isinstance(value, str) else json.dumps(value)
        sample = {"output_text": text, "output_json": value if not isinstance(value, str) else None}
        graded = await asyncio.wait_for(
            grade(step.grader, {"input": run.input}, sample, judge), step.timeout_s
        )
        entry["attempts"] = attempt + 1
        entry["score"] = graded.score
        if graded.passed:
            entry["passed"] = True
            return value
        why = graded.error or f"grader '{graded.name}' scored {graded.score}"
    entry["passed"] = False
    if step.fallback is None:
        raise StepFailed(step.name, f"'{step.target}' did not pass: {why}")
    entry["fallback"] = step.fallback
    return await run.run_step(step.fallback)


_KINDS = {
    "generate": _generate,
    "tool": _tool,
    "route": _route,
    "map": _map,
    "filter": _filter,
    "check": _check,
}
