"""/v1/evals on the default model, through the unmodified openai SDK: a completions run graded by a
string check, a label judge and a pairwise judge that are the model itself (json_schema answers parse),
with the pairwise judge's two orderings stored in each output item and the run's bootstrap interval."""

from __future__ import annotations

import time

import openai
import pytest

from ember import AsyncEngine, CacheConfig, EngineConfig
from ember.server.app import ServerState
from ember.server.platform import Platform
from tests.e2e.conftest import MODEL, running_server

pytestmark = pytest.mark.slow

ITEMS = [
    {"country": "France", "capital": "Paris"},
    {"country": "Japan", "capital": "Tokyo"},
]
SCHEMA = {"type": "object", "properties": {"country": {"type": "string"}, "capital": {"type": "string"}}}


@pytest.fixture(scope="module")
def url(default_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("evals")
    engine = AsyncEngine(
        EngineConfig(
            model=str(default_model_dir), max_model_len=1024, cache=CacheConfig(kv_cache_memory="128MiB")
        ),
        mode="thread",
        max_queue=64,
    )
    state = ServerState(platform=Platform.open(root, f"sqlite:///{root}/ember.db", 1 << 20))
    try:
        with running_server(engine, state) as url:
            yield url
    finally:
        engine.shutdown()


def test_a_run_with_model_judges_on_the_default_model(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    judge_input = [
        {"role": "system", "content": "You check answers."},
        {"role": "user", "content": "Is '{{sample.output_text}}' the capital of {{item.country}}?"},
    ]
    ev = client.evals.create(
        name="capitals",
        data_source_config={"type": "custom", "item_schema": SCHEMA},
        testing_criteria=[
            {
                "type": "string_check",
                "name": "names_it",
                "operation": "ilike",
                "input": "{{sample.output_text}}",
                "reference": "{{item.capital}}",
            },
            {
                "type": "label_model",
                "name": "checker",
                "model": MODEL,
                "input": judge_input,
                "labels": ["yes", "no"],
                "passing_labels": ["yes"],
            },
            {
                "type": "pairwise_model",
                "name": "vs_ref",
                "model": MODEL,
                "prompt": "What is the capital of {{item.country}}?",
                "reference": "{{item.capital}}",
            },
        ],
    )
    start = time.monotonic()
    run = client.evals.runs.create(
        ev.id,
        data_source={
            "type": "completions",
            "model": MODEL,
            "input_messages": {
                "type": "template",
                "template": [
                    {
                        "role": "user",
                        "content": "What is the capital of {{item.country}}? Answer in one word.",
                    }
                ],
            },
            "sampling_params": {"temperature": 0.0, "max_completion_tokens": 8},
            "source": {"type": "file_content", "content": [{"item": it} for it in ITEMS]},
        },
    )
    while (run := client.evals.runs.retrieve(run.id, eval_id=ev.id)).status not in ("completed", "failed"):
        assert time.monotonic() - start < 90, run.result_counts  # 2 shared cores: 25-60 s by their load
        time.sleep(0.2)
    assert run.status == "completed" and run.result_counts.total == 2 and run.result_counts.errored == 0
    per = {r.testing_criteria: r.model_extra["ember"] for r in run.per_testing_criteria_results}
    assert (
        per["names_it"]["n"] == 2
        and per["names_it"]["ci_low"] <= per["names_it"]["mean"] <= per["names_it"]["ci_high"]
    )
    for item in client.evals.runs.output_items.list(run.id, eval_id=ev.id).data:
        names_it, checker, vs_ref = item.results
        assert checker.model_extra["label"] in ("yes", "no")
        orderings = vs_ref.model_extra["orderings"]
        assert [(o["shown_as_a"], o["shown_as_b"]) for o in orderings] == [
            ("sample", "reference"),
            ("reference", "sample"),
        ]
        assert all(o["winner"] in ("A", "B", "tie") for o in orderings)
        assert vs_ref.score in (0.0, 0.5, 1.0)
