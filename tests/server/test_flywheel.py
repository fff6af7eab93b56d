"""/v1/flywheel/runs over a fake engine, with the fine-tuning job run by the real worker process over the
fast stand-ins of tests/tune/fake_tune.py and the other parts (dataset, comparison, alias) scripted: the
gate's verdicts, the report, progress, the 4xx refusals, admin only, a restart that resumes a run."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from starlette.testclient import TestClient

from ember.flywheel.dataset import Dataset, export
from ember.flywheel.loop import Parts
from ember.server.app import ServerState, create_app
from ember.server.tuning_api import Tuning
from tests.server.test_tuning import FAKES, MODEL, TuneEngine

ADMIN, USER = "admin-key", "user-key"
ADMIN_H, USER_H = {"Authorization": f"Bearer {ADMIN}"}, {"Authorization": f"Bearer {USER}"}
EVAL = {
    "items": [{"text": f"d{i}", "answer": f"a{i}"} for i in range(4)],
    "input_messages": [{"role": "user", "content": "{{item.text}}"}],
    "testing_criteria": [
        {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
         "operation": "eq"},
        {"type": "string_check", "name": "polite", "input": "{{sample.output_text}}", "reference": "please",
         "operation": "like"},
    ],
}  # fmt: skip


def criterion(name: str, diff: float, low: float, high: float) -> dict:
    return {
        "name": name,
        "mean_a": 0.1,
        "mean_b": 0.1 + diff,
        "diff": diff,
        "ci_low": low,
        "ci_high": high,
        "n": 4,
    }


class Script:
    """The parts the tests control: an alias table, a comparison to return, what the dataset was asked."""

    def __init__(self, criteria: list[dict], hold: asyncio.Event | None = None):
        self.aliases = {"support-bot": {"version": 1, "serves": {"model": MODEL}, "model": MODEL}}
        self.criteria, self.hold = criteria, hold
        self.asked: list[dict] = []
        self.latency = (10.0, 12.0)

    def parts(self) -> Parts:
        async def dataset(ctx, owner, traces, relabel, name):
            self.asked.append(traces)
            if self.hold is not None:
                await self.hold.wait()
            line = {"messages": [{"role": "user", "content": "d"}, {"role": "assistant", "content": "a"}]}
            made = Dataset("sft", [line] * 4, ["trace"] * 4)
            row = await asyncio.to_thread(export, ctx.platform, owner, made, name + ".jsonl")
            return {"file_id": row["id"], "examples": 4, "selected": 4}

        async def compare(call, eval_spec, model_a, model_b, tenant, gate, progress):
            return {
                "items": len(eval_spec["items"]),
                "confidence": gate.confidence,
                "criteria": self.criteria,
            }

        def alias(ctx, name, tenant):
            return self.aliases.get(name)

        async def repoint(ctx, name, model, expected_version, run_id):
            assert self.aliases[name]["version"] == expected_version
            self.aliases[name] = {"version": expected_version + 1, "serves": {"model": model}, "model": model}
            return self.aliases[name]

        return Parts(dataset=dataset, compare=compare, alias=alias, repoint=repoint)


@contextlib.contextmanager
def flywheel_server(tmp_path, script: Script, tuning: bool = True):
    engine = TuneEngine()
    state = ServerState(api_keys=[USER], admin_key=ADMIN)
    if tuning:
        state.tuning = Tuning(
            tmp_path, f"sqlite:///{tmp_path}/ember.db", engine, MODEL, state.adapter_owners, 1 << 20
        )
        state.tuning.runner.trainer = state.tuning.runner.data = FAKES
    else:
        from ember.server.platform import Platform

        state.platform = Platform.open(tmp_path, f"sqlite:///{tmp_path}/ember.db", 1 << 20)
    app = create_app(engine, MODEL, state)
    app.state.flywheel_runner.parts = script.parts()
    app.state.flywheel_runner.poll_s = 0.1
    with TestClient(app) as http:
        yield http


def start(http, **extra) -> dict:
    body = {"alias": "support-bot", "traces": {"metadata": {"tag": "support"}}, "eval": EVAL, "min_examples": 2,
            "hyperparameters": {"n_epochs": 1, "batch_size": 2}, **extra}  # fmt: skip
    r = http.post("/v1/flywheel/runs", json=body, headers=ADMIN_H)
    assert r.status_code == 200, r.text
    return r.json()


def wait_done(http, run_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = http.get(f"/v1/flywheel/runs/{run_id}", headers=ADMIN_H).json()
        if run["status"] not in ("queued", "running"):
            return run
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} is still {run['status']} at {run['step']}")


def test_a_better_candidate_is_promoted_and_reported(tmp_path):
    script = Script([criterion("exact", 0.5, 0.3, 0.7), criterion("polite", 0.0, -0.1, 0.1)])
    with flywheel_server(tmp_path, script) as http:
        run = wait_done(http, start(http)["id"])
        assert run["status"] == "completed", run["error"]
        assert run["decision"]["promote"] is True and run["decision"]["reasons"] == []
        assert script.aliases["support-bot"]["version"] == 2
        assert script.aliases["support-bot"]["model"] == run["candidate"]
        assert run["promoted"]["version"] == 2 and run["candidate"].startswith(f"ft:{MODEL}:support-bot:")
        job = http.get(f"/v1/fine_tuning/jobs/{run['fine_tuning_job']}", headers=ADMIN_H).json()
        assert job["status"] == "succeeded" and job["metadata"] == {"flywheel_run": run["id"]}
        assert list(run["steps"]) == ["dataset", "tune", "evaluate", "gate", "promote"]
        assert all(s["status"] == "done" for s in run["steps"].values())
        assert (
            "**Promoted**" in run["report"]
            and "| exact | 0.100 | 0.600 | +0.500 | [+0.300, +0.700] |" in run["report"]
        )
        events = http.get(f"/v1/flywheel/runs/{run['id']}/events", headers=ADMIN_H).json()["data"]
        messages = [e["message"] for e in events]
        assert messages[0] == "queued: support-bot" and messages[-1] == "completed: promoted; report written"
        later = http.get(
            f"/v1/flywheel/runs/{run['id']}/events?after={events[2]['seq']}", headers=ADMIN_H
        ).json()
        assert [e["message"] for e in later["data"]] == messages[3:]
        assert [r["id"] for r in http.get("/v1/flywheel/runs", headers=ADMIN_H).json()["data"]] == [run["id"]]


@pytest.mark.parametrize(
    ("criteria", "why"),
    [
        ([criterion("exact", 0.1, -0.05, 0.25), criterion("polite", 0.0, -0.1, 0.1)], "exact: improvement"),
        ([criterion("exact", 0.5, 0.3, 0.7), criterion("polite", -0.4, -0.6, -0.2)], "polite: difference"),
    ],
    ids=["no-confident-gain", "guard-regresses"],
)
def test_the_gate_rejects_and_the_alias_stays(tmp_path, criteria, why):
    script = Script(criteria)
    with flywheel_server(tmp_path, script) as http:
        run = wait_done(http, start(http)["id"])
        assert run["status"] == "completed" and run["decision"]["promote"] is False
        assert run["decision"]["reasons"][0].startswith(why)
        assert script.aliases["support-bot"]["version"] == 1 and run["promoted"] is None
        assert "**Not promoted**" in run["report"] and why in run["report"]


def test_the_traces_of_a_named_key_only_with_that_key(tmp_path):
    script = Script([criterion("exact", 0.5, 0.3, 0.7), criterion("polite", 0.0, 0.0, 0.0)])
    with flywheel_server(tmp_path, script) as http:
        state = http.app.state.ember
        wait_done(http, start(http, traces={"metadata": {"tag": "a"}, "api_key": USER})["id"])
        wait_done(http, start(http, traces={"metadata": {"tag": "b"}})["id"])
        assert [t["tenant"] for t in script.asked] == [state.tenant(USER), state.tenant(ADMIN)]
        r = http.post("/v1/flywheel/runs", json={"alias": "support-bot", "traces": {"api_key": "guess"},
                                                 "eval": EVAL}, headers=ADMIN_H)  # fmt: skip
        assert r.status_code == 400 and r.json()["error"]["param"] == "traces.api_key"
        run = http.get("/v1/flywheel/runs", headers=ADMIN_H).json()["data"][0]
        assert "api_key" not in run["spec"]["traces"] and "tenant" not in run["spec"]["traces"]


def test_refusals_name_what_to_change(tmp_path):
    script = Script([criterion("exact", 0.5, 0.3, 0.7)])
    with flywheel_server(tmp_path, script) as http:
        body = {"alias": "support-bot", "traces": {}, "eval": EVAL}
        assert http.post("/v1/flywheel/runs", json=body, headers=USER_H).status_code == 403
        assert http.post("/v1/flywheel/runs", json=body).status_code == 401
        assert http.get("/v1/flywheel/runs", headers=USER_H).status_code == 403
        cases = [
            ({**body, "alias": "nope"}, 404, "alias"),
            ({**body, "gate": {"confidence": 1.5}}, 400, "gate"),
            ({**body, "gate": {"primary": "nope"}}, 400, "gate.primary"),
            ({**body, "hyperparameters": {"n_epochs": 0}}, 400, "method.supervised.hyperparameters.n_epochs"),
            ({**body, "eval": {**EVAL, "items": []}}, 400, "eval.items"),
            ({**body, "eval": {**EVAL, "testing_criteria": [EVAL["testing_criteria"][0]] * 2}}, 400,
             "eval.testing_criteria[1].name"),
            ({**body, "eval": {**EVAL, "input_messages": {"type": "nope"}}}, 400, "eval.input_messages"),
            ({**body, "surprise": 1}, 400, "surprise"),
        ]  # fmt: skip
        for case, status, param in cases:
            r = http.post("/v1/flywheel/runs", json=case, headers=ADMIN_H)
            assert (r.status_code, r.json()["error"]["param"]) == (status, param), r.text
        assert http.get("/v1/flywheel/runs/fwrun-nope", headers=ADMIN_H).status_code == 404
    with flywheel_server(tmp_path / "no-tuning", script, tuning=False) as http:
        r = http.post("/v1/flywheel/runs", json=body, headers=ADMIN_H)
        assert r.status_code == 400 and r.json()["error"]["code"] == "fine_tuning_disabled"


def test_a_cancelled_run_stops(tmp_path):
    script = Script([criterion("exact", 0.5, 0.3, 0.7)], hold=asyncio.Event())
    with flywheel_server(tmp_path, script) as http:
        run = start(http)
        r = http.post(f"/v1/flywheel/runs/{run['id']}/cancel", headers=ADMIN_H)
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        assert http.post(f"/v1/flywheel/runs/{run['id']}/cancel", headers=ADMIN_H).status_code == 409


def test_a_restart_resumes_a_run(tmp_path):
    held = Script([criterion("exact", 0.5, 0.3, 0.7)], hold=asyncio.Event())
    with flywheel_server(tmp_path, held) as http:
        run_id = start(http)["id"]
        deadline = time.monotonic() + 10
        while not held.asked:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    script = Script([criterion("exact", 0.5, 0.3, 0.7)])  # the server is gone mid-dataset; a new one
    with flywheel_server(tmp_path, script) as http:
        run = wait_done(http, run_id)
        assert run["status"] == "completed" and run["promoted"]["version"] == 2
        assert len(script.asked) == 1
