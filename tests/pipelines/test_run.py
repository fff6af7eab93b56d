"""The planner over fake services: independent steps are in flight together, an embedding route picks the
nearest examples, a check retries before its fallback, failures name their step."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from ember.config import ServerConfig
from ember.config.schema import ConfigError
from ember.pipelines.run import PipelineRun, StepFailed
from ember.pipelines.spec import parse
from ember.router import Candidate, LearnedRouter
from ember.router.features import TEXT_FEATURES, FeatureConfig
from ember.router.model import Heads


class Services:
    """Answers a chat body with its last message's text upper-cased (after `delay_s`), counting what is in
    flight; embeds a text as the counts of the letters a, b, c."""

    call = None

    def __init__(self, delay_s: float = 0.02, answers: list[str] | None = None):
        self.delay_s, self.answers = delay_s, answers
        self.in_flight = self.most = 0

    async def chat(self, body: dict, stream: bool = False) -> dict:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1
        text = self.answers.pop(0) if self.answers else body["messages"][-1]["content"].upper()
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 1}}
        return {"choices": [{"message": {"content": text}}], "usage": usage}

    async def embed(self, model, texts: list[str]) -> list[list[float]]:
        return [[t.count("a"), t.count("b"), t.count("c")] for t in texts]

    def router(self, path: str):
        return LearnedRouter.load(path)

    def local(self, model: str) -> bool:
        return False


def _run(spec: dict, services: Services, text: str = "hello"):
    run = PipelineRun(parse(spec), services, text)
    return asyncio.run(run.value(run.pipeline.output)), run.trace


def _gen(name: str, prompt: str, **kw) -> dict:
    return {"name": name, "kind": "generate", "model": "m", "prompt": prompt, **kw}


def test_independent_steps_run_together():
    spec = {
        "steps": [_gen("a", "{{input}} a"), _gen("b", "{{input}} b"), _gen("c", "{{a}}+{{b}}")],
        "output": "c",
    }
    services = Services(delay_s=0.1)
    value, trace = _run(spec, services)
    assert value == "HELLO A+HELLO B"
    assert services.most == 2  # a and b in flight at once
    assert [e["step"] for e in trace][-1] == "c" and trace[-1]["prompt_tokens"] == 3


def test_an_embedding_route_takes_the_nearest_examples():
    spec = {
        "steps": [
            {
                "name": "r",
                "kind": "route",
                "by": "embedding",
                "examples": {"x": ["aaa", "aab"], "y": ["ccc"]},
                "routes": {"x": "gx", "y": "gy"},
            },  # fmt: skip
            _gen("gx", "x:{{input}}"),
            _gen("gy", "y:{{input}}"),
        ],
        "output": "r",
    }
    assert _run(spec, Services(), "cab cc")[0] == "Y:CAB CC"
    value, trace = _run(spec, Services(), "banana")
    assert value == "X:BANANA" and trace[0]["picked"] == "x"


def test_a_check_retries_then_falls_back():
    grader = {"type": "string_check", "name": "ok", "input": "{{sample.output_text}}", "reference": "good",
              "operation": "eq"}  # fmt: skip
    spec = {
        "steps": [
            _gen("g", "{{input}}", temperature=1.0),
            {"name": "c", "kind": "check", "target": "g", "grader": grader, "retries": 1, "fallback": "f"},
            _gen("f", "fallback"),
        ],
        "output": "c",
    }
    value, trace = _run(spec, Services(answers=["bad", "good"]))
    assert value == "good" and [e["step"] for e in trace] == ["g", "c", "g"] and trace[2]["attempt"] == 1
    value, trace = _run(spec, Services(answers=["bad", "worse", "plan b"]))
    assert value == "plan b" and [e["step"] for e in trace] == ["g", "c", "g", "f"]


def test_a_learned_route_sends_long_inputs_to_the_strong_model(tmp_path):
    dim = len(TEXT_FEATURES)
    coef = np.zeros((2, dim))
    coef[0, TEXT_FEATURES.index("log_chars")] = -4.0  # the cheap model fails on long inputs
    heads = Heads(np.full(dim, 3.0), np.ones(dim), coef, np.array([0.0, 5.0]))
    candidates = [Candidate("small", 1.0), Candidate("big", 10.0)]
    path = LearnedRouter(candidates, FeatureConfig(embedding=None), heads).save(tmp_path / "router")
    spec = {
        "steps": [
            {
                "name": "r",
                "kind": "route",
                "by": "learned",
                "path": str(path),
                "threshold": 0.5,
                "routes": {"small": "cheap", "big": "strong"},
            },  # fmt: skip
            _gen("cheap", "cheap:{{input}}"),
            _gen("strong", "strong:{{input}}"),
        ],
        "output": "r",
    }
    assert _run(spec, Services(), "hi")[0] == "CHEAP:HI"
    value, trace = _run(spec, Services(), "a long question " * 20)
    assert value.startswith("STRONG:") and trace[0]["picked"] == "big"


def boom(x: str) -> str:
    raise RuntimeError(f"no {x}")


def test_a_failing_step_names_itself():
    spec = {
        "steps": [
            {
                "name": "t",
                "kind": "tool",
                "function": "tests.pipelines.test_run:boom",
                "arguments": {"x": "{{input}}"},
            },
            _gen("g", "{{t}}"),
        ],
        "output": "g",
    }
    with pytest.raises(StepFailed, match="pipeline step 't' failed: RuntimeError: no hello"):
        _run(spec, Services())


def test_a_bad_pipeline_file_is_a_config_error(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("steps:\n  - {name: a, kind: generate, model: m, prompt: '{{b}}'}\noutput: a\n")
    with pytest.raises(ConfigError, match=r"--pipeline p=.*step 'a' field 'prompt': 'b' is not a step"):
        ServerConfig(pipelines={"p": str(path)})
