"""ember/server/app.py's adapter routes: admin paths confined to the adapter roots (one answer outside
them, whatever is there), untrusted adapter files checked before the engine sees them, and adapters
private to a key invisible to every other key."""

from __future__ import annotations

import json
import os
import time

import pytest
from fastapi.testclient import TestClient

from ember.server.app import OUTSIDE_ROOTS, ServerState, create_app
from tests.server.fake_engine import FakeEngine

MODEL = "base"
ADMIN = {"Authorization": "Bearer admin-key"}
KEY_A, KEY_B = "key-a", "key-b"


def _server(tmp_path, **state):
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    engine = FakeEngine({"shared": str(root / "shared")})
    state = ServerState(
        **({"api_keys": [KEY_A, KEY_B], "admin_key": "admin-key", "lora_roots": [str(root)]} | state)
    )
    return TestClient(create_app(engine, MODEL, state)), engine, state, root


def _load(client, path, name: str = "x"):
    return client.post("/v1/adapters", json={"name": name, "path": str(path)}, headers=ADMIN)


def _adapter(directory, config: dict | None = None):
    directory.mkdir(parents=True, exist_ok=True)
    base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    (directory / "adapter_config.json").write_text(json.dumps(base | (config or {})))
    (directory / "adapter_model.safetensors").write_bytes(b"")
    return directory


def test_paths_outside_the_roots_all_answer_the_same(tmp_path):
    client, engine, _, root = _server(tmp_path)
    outside = _adapter(tmp_path / "outside")  # a real adapter, just not under a root
    os.symlink(outside, root / "link-out")
    os.symlink("/etc", root / "etc-link")
    paths = [
        "/root/.ssh",
        "/etc/shadow",
        "/nonexistent",
        "/etc",
        "/",
        str(outside),
        str(root / ".." / "outside"),
        str(root / "link-out"),  # a link inside a root to outside it
        str(root / "etc-link" / "passwd"),
        str(root) + "-sibling",  # a prefix of the root's name is not under it
        "relative/path",
    ]
    answers = {p: _load(client, p) for p in paths}
    bodies = {json.dumps([r.status_code, r.json()]) for r in answers.values()}
    assert len(bodies) == 1, bodies
    r = answers["/etc/shadow"]
    assert r.status_code == 400 and r.json()["error"]["message"] == OUTSIDE_ROOTS
    assert r.json()["error"]["code"] == "invalid_adapter"
    assert engine.loads == []


def test_paths_inside_a_root_load_resolved_and_may_fail_specifically(tmp_path):
    client, engine, _, root = _server(tmp_path)
    _adapter(root / "sql")
    missing = _load(client, root / "missing")
    assert missing.status_code == 400 and "is not a directory" in missing.json()["error"]["message"]
    r = _load(client, root / "sub" / ".." / "sql", name="sql")
    assert r.status_code == 200, r.text
    assert engine.loads == [("sql", str((root / "sql").resolve()))]


def test_no_roots_no_runtime_loads(tmp_path):
    client, engine, _, root = _server(tmp_path, lora_roots=[])
    r = _load(client, _adapter(root / "sql"))
    assert r.status_code == 400 and r.json()["error"]["message"] == OUTSIDE_ROOTS and engine.loads == []


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"target_modules": "(a+)+$"}, "target_modules regex"),
        ({"target_modules": "(.*a){20}"}, "target_modules regex"),
        ({"target_modules": "(x|x|x)*y" + "." * 30}, "target_modules regex"),
        ({"target_modules": ".*" * 8 + "z"}, "target_modules regex"),
        ({"r": "eight"}, "r must be a positive integer"),
    ],
)
def test_bad_adapter_configs_are_refused_before_the_engine_sees_them(tmp_path, config, words):
    client, engine, _, root = _server(tmp_path)
    start = time.monotonic()
    r = _load(client, _adapter(root / "bad", config))
    assert time.monotonic() - start < 2
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    assert engine.loads == []


def test_an_oversized_adapter_config_is_refused_unread(tmp_path):
    client, engine, _, root = _server(tmp_path)
    adapter = _adapter(root / "big")
    with open(adapter / "adapter_config.json", "r+b") as f:
        f.truncate(300 * 2**20)  # sparse: 300 MiB by stat, nothing on disk
    start = time.monotonic()
    r = _load(client, adapter)
    assert time.monotonic() - start < 2
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and "adapter_config.json is 314572800 bytes" in message and engine.loads == []


def _models(client, key: str) -> list[str]:
    r = client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    return [m["id"] for m in r.json()["data"]]


def _complete(client, key: str, model: str):
    body = {"model": model, "prompt": "hi", "max_tokens": 2}
    return client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})


def test_an_adapter_owned_by_one_key_is_invisible_to_the_others(tmp_path):
    client, engine, state, root = _server(tmp_path)
    engine.adapters["tuned"] = str(root / "tuned")
    state.adapter_owners["tuned"] = state.tenant(KEY_A)
    assert _models(client, KEY_A) == [MODEL, "shared", "tuned"]
    assert _models(client, KEY_B) == [MODEL, "shared"]
    for model in ("tuned", f"{MODEL}:tuned"):
        mine = _complete(client, KEY_A, model)
        assert mine.status_code == 200 and mine.json()["choices"][0]["text"] == "lora=tuned"
        theirs = _complete(client, KEY_B, model)
        error = theirs.json()["error"]
        assert theirs.status_code == 404 and error["code"] == "model_not_found"
        assert "tuned" not in error["message"].split("available:")[1]  # not even listed as available
    # Global adapters (the admin's, the --lora ones) serve every key.
    assert _complete(client, KEY_B, "shared").json()["choices"][0]["text"] == "lora=shared"
    assert state.tenant(KEY_A) != state.tenant(KEY_B) and KEY_A not in state.tenant(KEY_A)


def test_admin_loaded_adapters_are_global(tmp_path):
    client, _, state, root = _server(tmp_path)
    assert _load(client, _adapter(root / "sql"), name="sql").status_code == 200
    assert "sql" not in state.adapter_owners
    assert "sql" in _models(client, KEY_A) and "sql" in _models(client, KEY_B)
    assert client.delete("/v1/adapters/sql", headers=ADMIN).status_code == 200
    assert "sql" not in _models(client, KEY_A)
