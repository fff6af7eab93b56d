"""Graders, in the shapes of OpenAI's Evals testing criteria, plus ember's pairwise judge.

Each grades one sample of one item and gives a `Grade` (OpenAI's output-item `result`: name, type, score,
passed, and for a judge the judge's own sample):
- `string_check`: eq, ne, like (the reference is a substring of the input), ilike (the same, ignoring
  case); score 1 or 0.
- `text_similarity`: fuzzy_match (rapidfuzz's ratio), bleu (sacrebleu's sentence BLEU), gleu (NLTK's
  sentence GLEU), rouge_1..rouge_5 and rouge_l (rouge-score's F-measure), a score in [0, 1]; cosine
  (of the two texts' embeddings from the server's /v1/embeddings); passed at `pass_threshold`.
- `python`: the user's `grade(sample, item) -> float`, run in the sandbox of ember.evals.sandbox.
- `score_model` / `label_model`: an LLM judge asked through `call("/v1/chat/completions", ...)` with a
  json_schema response_format, so its answer always parses: {"score": number} clamped to `range`, or
  {"label": one of `labels`}.
- `pairwise_model` (ember's): a judge shown two responses to the same task and asked which is better, in
  both orders (A/B, then B/A), so a judge that prefers a position cannot decide the verdict; the two
  orders disagreeing counts as a tie. Score 1 when the first side wins both, 0 when the second does,
  0.5 otherwise; both orderings are kept in the grade. In a run the sides are the sample and
  `reference` (a template); in `compare` they are the two models' answers.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ember.errors import InvalidRequest
from ember.evals import sandbox
from ember.evals.criteria import EMBEDDING_MODEL
from ember.evals.template import render, render_messages
from ember.server.platform import BATCH_PRIORITY, Caller

JUDGE_MAX_TOKENS = 64  # a verdict is a few tokens of JSON; the schema ends it

PAIRWISE_SYSTEM = (
    "You compare two responses to the same task and decide which one is better. Judge correctness "
    "first, then helpfulness. The order the responses are shown in says nothing about their quality."
)
PAIRWISE_USER = (
    "Task:\n{task}\n\nResponse A:\n{a}\n\nResponse B:\n{b}\n\n"
    "Which response is better? Answer with A, B, or tie."
)
_PAIRWISE_SCHEMA = {
    "type": "object",
    "properties": {"winner": {"type": "string", "enum": ["A", "B", "tie"]}},
    "required": ["winner"],
    "additionalProperties": False,
}


@dataclass
class Judge:
    """How a grader reaches a model: the server's `call` (PlatformContext.call, or one over HTTP), and
    the tenant and priority its requests run under."""

    call: Caller
    tenant: str | None = None
    priority: int = BATCH_PRIORITY

    async def ask(self, grader: dict, messages: list[dict], name: str, schema: dict) -> tuple[Any, dict]:
        """The judge's parsed JSON answer and its sample (OpenAI's result.sample: input, output, usage)."""
        params = grader.get("sampling_params") or {}  # OpenAI's graders spell it max_completions_tokens
        body = {
            "model": grader["model"],
            "messages": messages,
            "max_tokens": params.get("max_completions_tokens")
            or params.get("max_completion_tokens")
            or JUDGE_MAX_TOKENS,
            "temperature": params.get("temperature", 0.0),
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": name, "schema": schema, "strict": True},
            },
        }
        for key in ("top_p", "seed"):
            if params.get(key) is not None:
                body[key] = params[key]
        result = await self.call("/v1/chat/completions", body, self.tenant, self.priority)
        if not result.ok:
            message = (result.body.get("error") or {}).get("message", result.body)
            raise GradeError(f"the judge model '{grader['model']}' answered {result.status}: {message}")
        text = result.body["choices"][0]["message"].get("content") or ""
        sample = {
            "input": messages,
            "output": [{"role": "assistant", "content": text}],
            "model": result.body.get("model"),
            "usage": result.body.get("usage"),
        }
        try:
            return json.loads(text), sample
        except ValueError:
            raise GradeError(f"the judge's answer is not JSON: {text[:200]!r}") from None


class GradeError(Exception):
    """A sample could not be graded (the judge failed, the python grader raised): the item is `errored`."""


@dataclass
class Grade:
    name: str
    type: str
    score: float | None
    passed: bool
    error: str | None = None
    sample: dict | None = None  # a judge's own request and answer
    extra: dict = field(default_factory=dict)  # ember's additions (the pairwise orderings)

    def result(self) -> dict:
        """OpenAI's output-item result."""
        out = {"name": self.name, "type": self.type, "score": self.score, "passed": self.passed}
        out["sample"] = self.sample
        if self.error is not None:
            out["error"] = self.error
        return {**out, **self.extra}


async def grade(grader: dict, item: dict, sample: dict, judge: Judge | None) -> Grade:
    """One checked criterion's grade of `sample` (the namespace `{{sample.*}}`: output_text, output_json,
    model, ...) for `item` (`{{item.*}}`). A failure to grade is a Grade with `error` set, never raised."""
    kind, name = grader["type"], grader["name"]
    spaces = {"item": item, "sample": sample}
    try:
        if kind == "pairwise_model":
            if "reference" not in grader:
                raise GradeError(
                    "a pairwise_model grader in a run needs `reference`, the response to compare with"
                )
            return await pairwise(
                grader, spaces, sample.get("output_text", ""), render(grader["reference"], spaces), judge
            )
        if kind in ("score_model", "label_model"):
            if judge is None:
                raise GradeError(f"a {kind} grader needs a model to call")
            return await (_score_model if kind == "score_model" else _label_model)(grader, spaces, judge)
        if kind == "python":
            return await _python(grader, item, sample)
        text, reference = render(grader["input"], spaces), render(grader["reference"], spaces)
        if grader.get("evaluation_metric") == "cosine":
            score = await _cosine(grader, text, reference, judge)
        else:
            score = _STATIC[kind](grader, text, reference)
    except (GradeError, InvalidRequest) as exc:
        return Grade(name, kind, None, False, error=str(exc))
    threshold = grader.get("pass_threshold", 1.0)
    return Grade(name, kind, score, score >= threshold)


def string_check(grader: dict, text: str, reference: str) -> float:
    op = grader["operation"]
    hit = {
        "eq": text == reference,
        "ne": text != reference,
        "like": reference in text,
        "ilike": reference.lower() in text.lower(),
    }[op]
    return float(hit)


def text_similarity(grader: dict, text: str, reference: str) -> float:
    metric = grader["evaluation_metric"]
    if metric == "fuzzy_match":
        from rapidfuzz import fuzz

        return fuzz.ratio(text, reference) / 100.0
    if metric == "bleu":
        import sacrebleu

        return sacrebleu.sentence_bleu(text, [reference]).score / 100.0
    if metric == "gleu":
        from nltk.translate.gleu_score import sentence_gleu

        return float(sentence_gleu([reference.split()], text.split()))
    from rouge_score import rouge_scorer

    key = "rougeL" if metric == "rouge_l" else "rouge" + metric[-1]
    return float(rouge_scorer.RougeScorer([key]).score(reference, text)[key].fmeasure)


_STATIC = {"string_check": string_check, "text_similarity": text_similarity}


async def _cosine(grader: dict, text: str, reference: str, judge: Judge | None) -> float:
    """The cosine similarity of the two texts' embeddings, from the server's /v1/embeddings (`model`:
    the embeddings model, by default the one `ember serve` serves)."""
    if judge is None:
        raise GradeError("the cosine metric needs an embeddings model to call")
    model = grader.get("model", EMBEDDING_MODEL)
    body = {"model": model, "input": [text, reference], "encoding_format": "float"}
    result = await judge.call("/v1/embeddings", body, judge.tenant, judge.priority)
    if not result.ok:
        message = (result.body.get("error") or {}).get("message", result.body)
        raise GradeError(f"the embeddings model '{model}' answered {result.status}: {message}")
    a, b = (
        np.asarray(d["embedding"], dtype=np.float64)
        for d in sorted(result.body["data"], key=lambda d: d["index"])
    )
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / norm) if norm > 0 else 0.0


async def _python(grader: dict, item: dict, sample: dict) -> Grade:
    outcome = await sandbox.run_grader(
        grader["source"],
        sample,
        item,
        timeout_s=grader.get("timeout_s", sandbox.TIMEOUT_S),
        memory_bytes=int(grader.get("memory_limit_mb", sandbox.MEMORY_BYTES >> 20)) << 20,
    )
    if outcome.error is not None:
        return Grade(grader["name"], "python", None, False, error=outcome.error)
    return Grade(grader["name"], "python", outcome.score, outcome.score >= grader.get("pass_threshold", 1.0))


async def _score_model(grader: dict, spaces: dict, judge: Judge) -> Grade:
    lo, hi = grader.get("range", [0, 1])
    schema = {
        "type": "object",
        "properties": {"score": {"type": "number"}},
        "required": ["score"],
        "additionalProperties": False,
    }
    answer, sample = await judge.ask(grader, render_messages(grader["input"], spaces), "score", schema)
    score = answer.get("score") if isinstance(answer, dict) else None
    if isinstance(score, bool) or not isinstance(score, int | float):
        raise GradeError(f"the judge gave no numeric score: {answer!r:.200}")
    score = min(max(float(score), lo), hi)
    threshold = grader.get("pass_threshold", (lo + hi) / 2)
    return Grade(grader["name"], "score_model", score, score >= threshold, sample=sample)


async def _label_model(grader: dict, spaces: dict, judge: Judge) -> Grade:
    schema = {
        "type": "object",
        "properties": {"label": {"type": "string", "enum": list(grader["labels"])}},
        "required": ["label"],
        "additionalProperties": False,
    }
    answer, sample = await judge.ask(grader, render_messages(grader["input"], spaces), "label", schema)
    label = answer.get("label") if isinstance(answer, dict) else None
    if label not in grader["labels"]:
        raise GradeError(f"the judge gave no label of {grader['labels']}: {answer!r:.200}")
    passed = label in grader["passing_labels"]
    return Grade(grader["name"], "label_model", float(passed), passed, sample=sample, extra={"label": label})


async def pairwise(
    grader: dict,
    spaces: dict,
    first: str,
    second: str,
    judge: Judge | None,
    sides: tuple[str, str] = ("sample", "reference"),
) -> Grade:
    """The pairwise judge on (first, second), asked in both orders. Score for `first`: 1 if it wins both,
    0 if `second` wins both, 0.5 for a tie or a disagreement. The grade keeps both orderings:
    `orderings` [{shown_as_a, shown_as_b, winner, preferred, sample}] and `verdict` (a side's name or
    "tie")."""
    if judge is None:
        raise GradeError("a pairwise_model grader needs a model to call")
    task = render(grader.get("prompt", ""), spaces)
    system = PAIRWISE_SYSTEM + (
        " " + render(grader["instructions"], spaces) if grader.get("instructions") else ""
    )

    async def ask(a: tuple[str, str], b: tuple[str, str]) -> dict:
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": PAIRWISE_USER.format(task=task, a=a[1], b=b[1])},
        ]
        answer, sample = await judge.ask(grader, messages, "verdict", _PAIRWISE_SCHEMA)
        winner = answer.get("winner") if isinstance(answer, dict) else None
        if winner not in ("A", "B", "tie"):
            raise GradeError(f"the judge named no winner: {answer!r:.200}")
        preferred = {"A": a[0], "B": b[0], "tie": "tie"}[winner]
        return {
            "shown_as_a": a[0],
            "shown_as_b": b[0],
            "winner": winner,
            "preferred": preferred,
            "sample": sample,
        }

    one, two = (sides[0], first), (sides[1], second)
    orderings = list(await asyncio.gather(ask(one, two), ask(two, one)))
    votes = {o["preferred"] for o in orderings}
    verdict = votes.pop() if len(votes) == 1 else "tie"  # both agree, or it is a tie
    score = {sides[0]: 1.0, sides[1]: 0.0, "tie": 0.5}[verdict]
    threshold = grader.get("pass_threshold", 1.0)
    extra = {"verdict": verdict, "orderings": orderings}
    return Grade(grader["name"], "pairwise_model", score, score >= threshold, extra=extra)
