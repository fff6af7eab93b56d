"""A pipeline on a real engine with two real LoRA adapters (random weights on a small random model, PEFT
layout: the shared builder of tests/lora), served as a model and called through the unmodified `openai`
SDK, streamed and not: route (a classifier whose answer the grammar holds to the labels) -> one of the two
adapters -> a check whose grader refuses it -> the fallback on the base model. The trace lists the steps."""

from __future__ import annotations

import httpx
import openai
import pytest
import yaml

from ember import AsyncEngine, CacheConfig, EngineConfig, LoRAConfig
from ember.config import ServerConfig
from ember.server.app import ServerState
from tests.e2e.conftest import MODEL, running_server
from tests.lora.test_lora import ADAPTERS, _build

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": "Bearer admin-key"}


def _spec() -> dict:
    never = {"type": "string_check", "name": "never", "input": "{{sample.output_text}}",
             "reference": "no random model says this", "operation": "eq"}  # fmt: skip
    gen = {"kind": "generate", "prompt": "{{input}}", "max_tokens": 6}
    return {
        "steps": [
            {
                "name": "triage",
                "kind": "route",
                "by": "classifier",
                "model": MODEL,
                "routes": {"billing": "billing", "tech": "tech"},
            },  # fmt: skip
            {"name": "billing", "model": "qv4", **gen},
            {"name": "tech", "model": "all8", **gen},
            {"name": "checked", "kind": "check", "target": "triage", "grader": never, "fallback": "base"},
            {"name": "base", "model": MODEL, **gen},
        ],
        "output": "checked",
    }


@pytest.fixture(scope="module")
def server(random_model_dirs, tmp_path_factory):
    base_dir = random_model_dirs["llama-gqa"]
    root = tmp_path_factory.mktemp("pipeline-adapters")
    names = ("qv4", "all8")
    for i, name in enumerate(names):
        _build(base_dir, root / name, *ADAPTERS[name], seed=i)
    (root / "support.yaml").write_text(yaml.safe_dump(_spec()))
    options = ServerConfig(
        loras={n: str(root / n) for n in names}, pipelines={"support": str(root / "support.yaml")}
    )
    engine = AsyncEngine(
        EngineConfig(
            model=str(base_dir),
            cache=CacheConfig(num_blocks=256),
            lora=LoRAConfig(enabled=True, max_loras=2, max_rank=16),
        ),
        mode="thread",
    )
    state = ServerState(admin_key="admin-key", lora_roots=[str(root)])
    try:
        with running_server(engine, state, options) as url:
            for name in names:  # what `ember serve --lora` loads once the server is up
                r = httpx.post(
                    url + "/v1/adapters", json={"name": name, "path": str(root / name)}, headers=ADMIN
                )
                assert r.status_code == 200, r.text
            yield url
    finally:
        engine.shutdown()


def test_route_adapter_check_fallback_on_a_real_engine(server):
    client = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "I was charged twice"}]
    r = client.chat.completions.create(model="support", messages=messages)
    trace = r.model_extra["pipeline"]
    steps = [s["step"] for s in trace["steps"]]
    triage = trace["steps"][0]
    assert steps == ["triage", triage["next"], "checked", "base"], steps
    assert triage["picked"] in ("billing", "tech")
    branch = trace["steps"][1]
    assert branch["model"] == {"billing": "qv4", "tech": "all8"}[triage["picked"]]
    assert branch["completion_tokens"] > 0 and trace["steps"][2]["passed"] is False
    assert r.choices[0].message.content and r.usage.completion_tokens >= branch["completion_tokens"]

    chunks = list(client.chat.completions.create(model="support", messages=messages, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content  # greedy: the same steps, the same answer
    (streamed,) = [c.model_extra["pipeline"] for c in chunks if c.model_extra.get("pipeline")]
    assert [s["step"] for s in streamed["steps"]] == steps
