"""Adapters through the API: served as models (NAME or BASE:NAME), listed with their base, loaded and
unloaded at runtime by the admin key only, while other adapters' requests keep streaming."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
import torch

from ember import LLM, AsyncEngine, CacheConfig, EngineConfig, LoRAConfig, SamplingParams
from ember.server.app import ServerState
from ember.server.run import ServeOptions
from tests.e2e.conftest import MODEL, metric, running_server
from tests.lora.test_lora import ADAPTERS, _build

ADMIN = {"Authorization": "Bearer admin-key"}
USER = {"Authorization": "Bearer user-key"}
PROMPT = [5, 17, 300, 42, 7, 900] * 3


@pytest.fixture(scope="module")
def lora_server(random_model_dirs, tmp_path_factory):
    base_dir = random_model_dirs["llama-gqa"]
    root = tmp_path_factory.mktemp("server-adapters")
    for i, (name, spec) in enumerate(ADAPTERS.items()):
        _build(base_dir, root / name, *spec, seed=i)
    torch.save({"x": torch.zeros(1)}, root / "evil.bin")
    engine = AsyncEngine(
        EngineConfig(
            model=str(base_dir),
            cache=CacheConfig(num_blocks=256),
            lora=LoRAConfig(enabled=True, max_loras=2, max_rank=16),
        ),
        mode="thread",
    )
    state = ServerState(api_keys=["user-key"], admin_key="admin-key", lora_roots=[str(root)])
    try:
        with running_server(engine, state) as url:
            yield url, engine, base_dir, root
    finally:
        engine.shutdown()


def _reference(base_dir, root, name: str, max_tokens: int) -> list[int]:
    """ember's offline engine on the same adapter (itself checked against PEFT in test_lora)."""
    llm = LLM(model=str(base_dir), enable_lora=True, max_lora_rank=16, num_blocks=64)
    llm.add_lora(name, str(root / name))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return llm.generate(PROMPT, params, lora=name)[0].outputs[0].token_ids


def _complete(url: str, model: str, max_tokens: int = 8) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return httpx.post(url + "/v1/completions", json=body, headers=USER, timeout=60)


def _load(url: str, name: str, path, headers=ADMIN) -> httpx.Response:
    return httpx.post(
        url + "/v1/adapters", json={"name": name, "path": str(path)}, headers=headers, timeout=60
    )


def test_adapters_are_models_listed_with_their_base(lora_server):
    url, engine, base_dir, root = lora_server
    assert _load(url, "qv4", root / "qv4").status_code == 200
    client = openai.OpenAI(base_url=url + "/v1", api_key="user-key", max_retries=0)
    cards = {m.id: m for m in client.models.list().data}
    assert cards["qv4"].parent == MODEL
    tokens = lambda r: r.json()["choices"][0]["text"]  # noqa: E731
    by_name, by_path = _complete(url, "qv4"), _complete(url, f"{MODEL}:qv4")
    assert by_name.status_code == by_path.status_code == 200
    assert tokens(by_name) == tokens(by_path) != tokens(_complete(url, MODEL))
    want = engine.tokenizer.decode(_reference(base_dir, root, "qv4", 8))
    assert tokens(by_name) == want
    missing = _complete(url, "nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert metric(url, 'ember:lora_requests_total{adapter="qv4"}', ADMIN) >= 2


def test_only_the_admin_key_manages_adapters(lora_server, random_model_dirs):
    url, _, _, root = lora_server
    assert _load(url, "x", root / "all8", headers=USER).status_code == 403
    assert _load(url, "x", root / "all8", headers={}).status_code == 401
    assert httpx.get(url + "/v1/adapters", headers=USER).status_code == 403
    assert httpx.delete(url + "/v1/adapters/qv4", headers=USER).status_code == 403
    bad = _load(url, "evil", root)  # a directory with a pickle and no adapter files
    assert bad.status_code == 400 and "adapter_config.json" in bad.json()["error"]["message"]
    pickled = root / "pickled"
    pickled.mkdir(exist_ok=True)
    (pickled / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]})
    )
    (pickled / "adapter_model.bin").write_bytes((root / "evil.bin").read_bytes())
    refused = _load(url, "pickled", pickled)
    assert refused.status_code == 400 and "pickle" in refused.json()["error"]["message"]
    # An adapter made for another base (the Qwen2 model: other k/v widths) is refused with the shapes.
    other = root / "other-base"
    if not other.exists():
        _build(random_model_dirs["qwen2-bias"], other, 4, 8, ["q_proj", "k_proj"], False, seed=9)
    wrong = _load(url, "other", other)
    assert wrong.status_code == 400 and "another model" in wrong.json()["error"]["message"]
    assert _load(url, "qv4", root / "qv4").status_code == 409  # the name is taken
    assert httpx.delete(url + "/v1/adapters/nope", headers=ADMIN).status_code == 404
    listed = httpx.get(url + "/v1/adapters", headers=ADMIN).json()["data"]
    assert [a["id"] for a in listed] == ["qv4"]  # nothing else changed
    assert _complete(url, "qv4").status_code == 200


def test_hot_load_and_unload_while_another_adapter_streams(lora_server):
    url, _, base_dir, root = lora_server
    if _load(url, "qv4", root / "qv4").status_code not in (200, 409):  # 409: an earlier test loaded it
        raise AssertionError("qv4 did not load")
    want = _reference(base_dir, root, "qv4", 800)
    result: dict = {}
    started = threading.Event()

    def stream():
        body = {"model": "qv4", "prompt": PROMPT, "max_tokens": 800, "temperature": 0, "ignore_eos": True}
        body |= {"stream": True, "logprobs": 0}
        ids = []
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=USER, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    result["chunks"] = result.get("chunks", 0) + 1
                    ids.append(chunk["choices"][0]["text"])
                    started.set()
        result["text"] = "".join(ids)
        started.set()

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(timeout=60)
    # qv4 is busy: it cannot be removed; others come and go meanwhile.
    busy = httpx.delete(url + "/v1/adapters/qv4", headers=ADMIN)
    assert busy.status_code == 409 and "in use" in busy.json()["error"]["message"]
    assert _load(url, "all8", root / "all8").status_code == 200
    assert _complete(url, "all8").status_code == 200
    assert _load(url, "mlp16", root / "mlp16").status_code == 200
    assert _complete(url, "mlp16").status_code == 200  # two slots, qv4 holds one: mlp16 evicts idle all8
    assert _complete(url, "all8").status_code == 200  # and all8 comes back, evicting idle mlp16
    assert httpx.delete(url + "/v1/adapters/all8", headers=ADMIN).status_code == 200
    assert _complete(url, "all8").status_code == 404
    t.join(timeout=120)
    assert result["chunks"] >= 2
    from ember.tokenizer import Tokenizer

    assert result["text"] == Tokenizer.from_dir(base_dir).decode(want)
    assert httpx.delete(url + "/v1/adapters/qv4", headers=ADMIN).status_code == 200


def test_serve_options_check_adapters():
    assert ServeOptions.parse_loras(["a=/x", "b=/y"]) == {"a": "/x", "b": "/y"}
    for bad in (["a"], ["=x"], ["a="], ["a=/x", "a=/y"]):
        with pytest.raises(ValueError, match="--lora"):
            ServeOptions.parse_loras(bad)
    with pytest.raises(ValueError, match="--admin-key"):
        ServeOptions(api_keys=["k"], admin_key="k")
