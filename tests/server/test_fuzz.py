"""A fuzz run: schemathesis generates requests for every operation in the server's own OpenAPI document,
valid and invalid, a bounded number each. No answer may be a 5xx or time out, every status must be one
the document lists, and afterwards the server answers a normal request as it did before."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import status_code_conformance

from tests.e2e.conftest import MODEL

MAX_EXAMPLES = 25
EMBEDDER = "all-minilm-l6-v2"
TIMEOUT_S = 30.0  # an answer later than this is a hang
CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 8,
    "temperature": 0,
}


@pytest.fixture(scope="module")
def answer_before(small_server) -> str:
    r = httpx.post(small_server[0] + "/v1/chat/completions", json=CHAT, timeout=TIMEOUT_S)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_gets_a_5xx_or_a_hang(small_server, answer_before, mode):
    schema = schemathesis.openapi.from_url(small_server[0] + "/openapi.json")
    failures: list[str] = []
    statuses: Counter[int] = Counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10  # every route, each method

    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        def run(case):
            if mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = EMBEDDER if "embeddings" in case.path else MODEL  # past the 404
            try:
                response = case.call(timeout=TIMEOUT_S)
                statuses[response.status_code] += 1
                case.validate_response(response, checks=[not_a_server_error, status_code_conformance])
            except Exception as exc:  # every operation is tried; all failures are reported together
                failures.append(f"{case.operation.label}: {type(exc).__name__}: {str(exc)[:800]}")

        try:
            run()
        except Unsatisfiable:  # negative mode, and nothing of the operation can be wrong (no body)
            assert mode is GenerationMode.NEGATIVE and not operation.body
    print(f"{mode.value}: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}")
    assert not failures, "\n\n".join(failures[:10])
    assert statuses[200] and statuses[400] if mode is GenerationMode.POSITIVE else statuses[400]


def test_the_server_answers_as_before_after_the_fuzz_run(small_server, answer_before):
    url, _ = small_server
    assert httpx.get(url + "/ready").status_code == 200
    r = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=TIMEOUT_S)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == answer_before
