"""Deployment aliases through the OpenAI SDK and httpx, over a fake engine that answers with the adapter it
ran under: the admin creates, repoints and deletes; every key lists, reads and uses them; bad input is a
4xx naming the field; a stream admitted before a repoint finishes on the old adapter, which is unloaded
only after; aliases survive a restart."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import Counter

import httpx
import openai
import pytest

from ember.config import ServerConfig
from ember.engine.async_engine import LoRAOpError
from ember.engine.messages import ErrorKind
from ember.outputs import CompletionOutput, RequestOutput
from ember.server.app import ServerState, create_app
from ember.server.platform import Platform
from ember.store import db
from tests.server.fakes import serving
from tests.traces.fake_chat import ChatEngine

MODEL = "smollm2-135m-instruct"
ADMIN, KEY = "admin-key", "user-key"
HELD = 99  # max_tokens that makes the fake hold its stream after the first piece until released
FT = f"ft:{MODEL}:sb:abc123"


class AliasEngine(ChatEngine):
    """Answers `lora=<adapter>` in two pieces; counts the requests using each adapter and, like the real
    engine, refuses to unload one in use."""

    def __init__(self, adapters: dict[str, str] | None = None):
        super().__init__(adapters)
        self.users: Counter = Counter()
        self.release = threading.Event()

    async def generate(self, prompt, params, request_id=None, *, lora=None, **_):
        self.users[lora] += 1
        try:
            pieces = (f"lora={lora}", " done")
            text = ""
            for i, piece in enumerate(pieces):
                text += piece
                last = i == len(pieces) - 1
                out = CompletionOutput(0, text, [i], "stop" if last else None, delta_text=piece)
                yield RequestOutput(request_id, None, list(prompt), [out], finished=last)
                while params.max_tokens == HELD and not self.release.is_set():
                    await asyncio.sleep(0.01)
        finally:
            self.users[lora] -= 1

    async def remove_lora(self, name: str) -> None:
        if self.users[name]:
            raise LoRAOpError(f"adapter '{name}' is in use", ErrorKind.CONFLICT)
        await super().remove_lora(name)


def _adapter_dir(path) -> str:
    """A directory that passes precheck (the fake engine never reads the weights)."""
    path.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    (path / "adapter_config.json").write_text(json.dumps(config))
    (path / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    return str(path)


@contextlib.contextmanager
def _server(root, engine):
    platform = Platform.open(root, f"sqlite:///{root}/ember.db", 1 << 20)
    state = ServerState(
        api_keys=[KEY], admin_key=ADMIN, platform=platform, lora_roots=[str(root / "adapters")]
    )
    app = create_app(engine, MODEL, state)
    app.state.aliases.retire_grace_s = 0.05
    options = ServerConfig(port=0)
    with serving(app, options) as (host, port):
        yield f"http://{host}:{port}", app


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("aliases")
    _adapter_dir(root / "adapters" / "v2")
    tuned = _adapter_dir(root / "tuned")
    store = db.Store(f"sqlite:///{root}/ember.db")
    job = {
        "id": "ftjob-abc123",
        "tenant": None,
        "owner": None,
        "model": MODEL,
        "source": MODEL,
        "training_file": "file-x",
        "spec": {},
        "seed": 42,
        "status": "succeeded",
        "fine_tuned_model": FT,
        "adapter_dir": tuned,
        "created_at": db.now(),
    }
    store.insert(db.jobs, job)
    return root


@pytest.fixture(scope="module")
def server(root):
    engine = AliasEngine({"tuned": str(root / "tuned")})
    with _server(root, engine) as (url, app):
        yield url, engine, app


def sdk(server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=key, max_retries=0)


def call(server, method: str, path: str, key: str | None = ADMIN, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, server[0] + path, headers=headers, timeout=60, **kw)


def answer(server, model: str = "support-bot", key: str = KEY) -> str:
    done = sdk(server, key).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    return done.choices[0].message.content


def test_the_admin_points_an_alias_and_every_key_uses_and_reads_it(server, root):
    made = call(server, "POST", "/v1/aliases", json={"name": "support-bot", "adapter": "tuned"})
    assert made.status_code == 200, made.text
    assert made.status_code == 200, made.text
    v1 = made.json()["current"]
    assert made.json()["version"] == 1 and v1["source"] == "adapter" and v1["adapter"] == "tuned"
    assert answer(server) == f"lora={v1['served_as']} done"

    v2 = call(
        server, "PUT", "/v1/aliases/support-bot", json={"adapter_path": str(root / "adapters" / "v2")}
    ).json()["current"]
    assert (
        v2["version"] == 2
        and v2["source"] == "adapter_path"
        and answer(server).startswith(f"lora={v2['served_as']}")
    )
    v3 = call(
        server, "POST", "/v1/aliases/support-bot", json={"model": FT, "metadata": {"job": "ftjob-abc123"}}
    ).json()["current"]
    assert (v3["source"], v3["adapter"], v3["metadata"]) == ("fine_tuned_model", FT, {"job": "ftjob-abc123"})
    assert answer(server).startswith(f"lora={v3['served_as']}")

    cards = {m.id: m for m in sdk(server).models.list().data}
    assert cards["support-bot"].model_extra["alias"]["version"] == 3
    assert cards["support-bot"].model_extra["alias"]["adapter"] == FT
    assert not any(
        name.startswith("support-bot.v") for name in cards
    )  # the versions' own adapters are not listed
    assert sdk(server).models.retrieve("support-bot").model_extra["parent"] == MODEL

    seen = call(server, "GET", "/v1/aliases/support-bot", key=KEY).json()
    assert [v["version"] for v in seen["history"]] == [3, 2, 1] and seen["status"] == "serving"
    assert "path" not in seen["current"]  # where adapters live is the admin's to know
    assert call(server, "GET", "/v1/aliases/support-bot").json()["current"]["path"] == str(root / "tuned")
    assert [a["id"] for a in call(server, "GET", "/v1/aliases", key=KEY).json()["data"]] == ["support-bot"]

    base = call(server, "PUT", "/v1/aliases/support-bot", json={"model": MODEL, "expected_version": 3})
    assert base.json()["current"]["source"] == "base" and answer(server) == "lora=None done"

    deleted = call(server, "DELETE", "/v1/aliases/support-bot")
    assert deleted.json() == {"id": "support-bot", "object": "alias.deleted", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        answer(server)
    assert call(server, "GET", "/v1/aliases/support-bot", key=KEY).status_code == 404
    _eventually(lambda: not any(n.startswith("support-bot.v") for n in server[1].adapters))


def test_only_the_admin_key_writes_aliases(server):
    body = {"name": "user-made", "adapter": "tuned"}
    refused = call(server, "POST", "/v1/aliases", key=KEY, json=body)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
    assert call(server, "POST", "/v1/aliases", key=None, json=body).status_code == 401
    assert call(server, "POST", "/v1/aliases", key="wrong", json=body).status_code == 401
    assert call(server, "POST", "/v1/aliases", json=body).status_code == 200
    for method, json_body in (("PUT", {"model": MODEL}), ("POST", {"model": MODEL}), ("DELETE", None)):
        r = call(server, method, "/v1/aliases/user-made", key=KEY, json=json_body)
        assert r.status_code == 403, (method, r.text)
    assert call(server, "GET", "/v1/aliases/user-made", key=KEY).json()["version"] == 1
    assert call(server, "DELETE", "/v1/aliases/user-made").status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "param"),
    [
        ("POST", "/v1/aliases", {"name": "bad name", "adapter": "tuned"}, 400, "name"),
        ("POST", "/v1/aliases", {"name": ":x"}, 400, "name"),
        ("POST", "/v1/aliases", {"adapter": "tuned"}, 400, "name"),
        ("POST", "/v1/aliases", {"name": MODEL}, 409, "name"),
        ("POST", "/v1/aliases", {"name": "tuned"}, 409, "name"),
        ("POST", "/v1/aliases", {"name": "a", "adapter": "nope"}, 404, "adapter"),
        ("POST", "/v1/aliases", {"name": "a", "adapter": "ft:x:y:z"}, 404, "adapter"),
        ("POST", "/v1/aliases", {"name": "a", "model": "other-base", "adapter": "tuned"}, 400, "model"),
        ("POST", "/v1/aliases", {"name": "a", "adapter_path": "/etc"}, 400, "adapter_path"),
        ("POST", "/v1/aliases", {"name": "a", "adapter": "tuned", "adapter_path": "/x"}, 400, "adapter_path"),
        ("POST", "/v1/aliases", {"name": "a", "bogus": 1}, 400, "bogus"),
        ("POST", "/v1/aliases", {"name": "a", "metadata": {"k": 1}}, 400, "metadata.k"),
        ("PUT", "/v1/aliases/missing", {"model": MODEL}, 404, "name"),
        ("DELETE", "/v1/aliases/missing", None, 404, "name"),
        ("PUT", "/v1/aliases/fixed", {"model": MODEL, "expected_version": 7}, 409, "expected_version"),
        ("PUT", "/v1/aliases/fixed", {"adapter": "fixed"}, 400, "adapter"),
        ("PUT", "/v1/aliases/fixed", {"expected_version": 0}, 400, "expected_version"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field(server, method, path, body, status, param):
    if call(server, "GET", "/v1/aliases/fixed").status_code == 404:
        assert call(server, "POST", "/v1/aliases", json={"name": "fixed"}).status_code == 200
    r = call(server, method, path, json=body)
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text
    assert call(server, "GET", "/v1/aliases/fixed").json()["version"] == 1  # nothing changed


def test_an_adapter_dir_that_is_no_adapter_is_refused(server, root):
    (root / "adapters" / "empty").mkdir(exist_ok=True)
    r = call(
        server, "POST", "/v1/aliases", json={"name": "b", "adapter_path": str(root / "adapters" / "empty")}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_adapter", r.text
    assert call(server, "GET", "/v1/aliases/b").status_code == 404


def test_a_stream_admitted_before_a_repoint_finishes_on_its_adapter(server, root):
    engine = server[1]
    v1 = call(server, "POST", "/v1/aliases", json={"name": "live", "adapter": "tuned"}).json()["current"]
    engine.release.clear()
    stream = sdk(server).chat.completions.create(
        model="live", messages=[{"role": "user", "content": "hi"}], max_tokens=HELD, stream=True
    )
    chunks = iter(stream)
    first = next(chunks)
    try:
        v2 = call(server, "PUT", "/v1/aliases/live", json={"model": FT}).json()["current"]
        v3 = call(server, "PUT", "/v1/aliases/live", json={"model": MODEL}).json()["current"]
        assert answer(server, "live") == "lora=None done"  # new requests: the new version at once
        time.sleep(0.3)  # v1 is past KEEP_LOADED and its grace: it stays loaded while the stream uses it
        assert v1["served_as"] in engine.adapters and v2["served_as"] in engine.adapters
    finally:
        engine.release.set()
    text = first.choices[0].delta.content + "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == f"lora={v1['served_as']} done" and v3["served_as"] is None
    _eventually(lambda: v1["served_as"] not in engine.adapters)  # unloaded once the stream ended
    assert v2["served_as"] in engine.adapters  # the previous version stays, for a rollback
    listed = call(server, "GET", "/v1/aliases/live").json()["history"]
    assert [v["loaded"] for v in listed] == [True, True, False]


def test_aliases_survive_a_restart(root, server):
    made = call(server, "POST", "/v1/aliases", json={"name": "durable", "adapter": "tuned"}).json()
    again = call(server, "PUT", "/v1/aliases/durable", json={"model": FT}).json()["current"]
    engine = AliasEngine()  # a fresh process: nothing loaded
    with _server(root, engine) as (url, _):
        restarted = (url, engine)
        seen = call(restarted, "GET", "/v1/aliases/durable").json()
        assert [v["version"] for v in seen["history"]] == [2, 1]
        assert seen["created_at"] == made["created_at"] and seen["current"]["adapter"] == FT
        assert answer(restarted, "durable") == f"lora={again['served_as']} done"
        assert {again["served_as"], made["current"]["served_as"]} <= set(engine.adapters)  # both kept


def test_an_alias_whose_adapter_is_gone_after_a_restart_says_so(root, server, tmp_path):
    gone = _adapter_dir(root / "adapters" / "gone")
    assert (
        call(server, "POST", "/v1/aliases", json={"name": "fragile", "adapter_path": gone}).status_code == 200
    )

    class Broken(AliasEngine):
        async def add_lora(self, name: str, path: str) -> None:
            if path == gone:
                raise LoRAOpError(f"adapter '{name}': {path} is not a directory", ErrorKind.INVALID)
            await super().add_lora(name, path)

    engine = Broken()
    with _server(root, engine) as (url, _):
        restarted = (url, engine)
        _eventually(lambda: call(restarted, "GET", "/v1/aliases/fragile").json()["status"] == "unavailable")
        with pytest.raises(openai.InternalServerError) as err:
            answer(restarted, "fragile")
        assert err.value.status_code == 503 and "failed to load" in err.value.message
        fixed = call(restarted, "PUT", "/v1/aliases/fragile", json={"model": MODEL})
        assert fixed.json()["status"] == "serving" and answer(restarted, "fragile") == "lora=None done"


def test_a_repoint_while_the_restart_loads_the_alias_is_not_undone(root, server):
    assert call(server, "POST", "/v1/aliases", json={"name": "racy", "adapter": "tuned"}).status_code == 200

    class Slow(AliasEngine):
        gate = threading.Event()

        async def add_lora(self, name: str, path: str) -> None:
            while not self.gate.is_set():
                await asyncio.sleep(0.01)
            await super().add_lora(name, path)

    engine = Slow()
    with _server(root, engine) as (url, _):
        restarted = (url, engine)
        loading = call(restarted, "GET", "/v1/aliases/racy").json()
        assert loading["status"] == "unavailable" and "loading" in loading["status_details"]
        with pytest.raises(openai.InternalServerError):
            answer(restarted, "racy")  # 503 until loaded
        answers: list = []
        repoint = threading.Thread(
            target=lambda: answers.append(call(restarted, "PUT", "/v1/aliases/racy", json={"model": MODEL}))
        )
        repoint.start()
        time.sleep(0.2)
        engine.gate.set()  # the restore finishes, then the repoint that waited for it
        repoint.join(timeout=30)
        assert answers[0].json()["version"] == 2
        assert answer(restarted, "racy") == "lora=None done"


def test_adapters_routes_keep_out_of_aliases_way(server):
    v1 = call(server, "POST", "/v1/aliases", json={"name": "guarded", "adapter": "tuned"}).json()["current"]
    clash = call(server, "POST", "/v1/adapters", json={"name": "guarded", "path": "/x"})
    assert clash.status_code == 409, clash.text
    busy = call(server, "DELETE", f"/v1/adapters/{v1['served_as']}")
    assert busy.status_code == 409 and "alias 'guarded'" in busy.json()["error"]["message"]


def _eventually(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.05)


# -- over the real engine: a small random model and PEFT adapters ------------------------------------------

PROMPT = [5, 17, 300, 42, 7, 900] * 3
LONG_RUN = 96  # tokens: the stream is still running when the repoint has been answered


@pytest.fixture(scope="module")
def real(random_model_dirs, tmp_path_factory):
    from ember import AsyncEngine, CacheConfig, EngineConfig, LoRAConfig
    from tests.lora.test_lora import ADAPTERS, _build

    base_dir = random_model_dirs["llama-gqa"]
    root = tmp_path_factory.mktemp("alias-adapters")
    for i, name in enumerate(("qv4", "mlp16")):
        _build(base_dir, root / "adapters" / name, *ADAPTERS[name], seed=i)
    engine = AsyncEngine(
        EngineConfig(
            model=str(base_dir),
            cache=CacheConfig(num_blocks=256),
            lora=LoRAConfig(enabled=True, max_loras=2, max_rank=16),
        ),
        mode="thread",
    )
    try:
        with _server(root, engine) as (url, _):
            yield (url,), engine, root
    finally:
        engine.shutdown()


def _text(server, model: str, max_tokens: int = 12) -> str:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    r = call(server, "POST", "/v1/completions", key=KEY, json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_over_the_real_engine_a_stream_finishes_on_the_adapter_it_was_admitted_to(real):
    server, engine, root = real
    made = call(
        server, "POST", "/v1/aliases", json={"name": "bot", "adapter_path": str(root / "adapters/qv4")}
    )
    assert made.status_code == 200, made.text
    v1 = made.json()["current"]
    alone = _text(server, v1["served_as"], LONG_RUN)
    body = {"model": "bot", "prompt": PROMPT, "max_tokens": LONG_RUN, "temperature": 0, "ignore_eos": True}
    text = ""
    started = time.monotonic()
    with httpx.stream(
        "POST",
        server[0] + "/v1/completions",
        json={**body, "stream": True},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    ) as stream:
        lines = stream.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["text"]
                break
        v2 = call(server, "PUT", "/v1/aliases/bot", json={"adapter_path": str(root / "adapters/mlp16")})
        repointed = time.monotonic()
        running = httpx.get(server[0] + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
        assert v2.status_code == 200, v2.text
        for line in lines:
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["text"]
    print(f"repoint after {repointed - started:.2f}s, stream done after {time.monotonic() - started:.2f}s")
    assert 'ember:num_requests_running{model_name="smollm2-135m-instruct"} 1.0' in running
    assert text == alone  # token for token what v1 alone writes
    assert (
        _text(server, "bot")
        == _text(server, v2.json()["current"]["served_as"])
        != _text(server, v1["served_as"])
    )
    call(server, "PUT", "/v1/aliases/bot", json={"model": MODEL})
    _eventually(lambda: v1["served_as"] not in engine.adapters)
    assert _text(server, "bot") == _text(server, MODEL)
