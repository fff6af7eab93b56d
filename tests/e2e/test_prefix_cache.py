"""Prefix caching through the API: cached_tokens in usage, multi-turn reuse, tenants kept apart, the
opt-out, the metrics, and a timing audit in the style of Gu et al. (ICML 2025) that finds sharing
within a tenant and none across tenants."""

from __future__ import annotations

import random
import time

import httpx
import openai
import pytest

from ember import AsyncEngine, CacheConfig, EngineConfig
from ember.server.app import ServerState
from ember.server.run import ServeOptions
from tests.e2e.conftest import MODEL, metric, running_server

KEYS = {"alice": "key-alice", "bob": "key-bob", "carol": "key-carol", "dave": "key-dave"}
BLOCK = 16


@pytest.fixture(scope="module")
def tenants(default_model_dir):
    """Four keys: alice and bob each alone, carol and dave sharing one namespace."""
    engine = AsyncEngine(
        EngineConfig(model=str(default_model_dir), cache=CacheConfig(kv_cache_memory="256MiB")),
        mode="process",
        max_queue=64,
    )
    state = ServerState(
        api_keys=list(KEYS.values()),
        cache_namespaces={KEYS["carol"]: "team", KEYS["dave"]: "team"},
        metrics_public=True,
    )
    try:
        with running_server(engine, state) as url:
            yield url, engine
    finally:
        engine.shutdown()


def _client(url: str, who: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=KEYS[who], max_retries=0)


def _text(seed: int, words: int) -> str:
    rng = random.Random(seed)
    vocab = [
        "river",
        "stone",
        "mill",
        "boat",
        "child",
        "count",
        "lamp",
        "field",
        "bread",
        "window",
        "quiet",
        "north",
        "letter",
    ]
    return " ".join(rng.choice(vocab) for _ in range(words))


def _fresh(seed: int, words: int) -> list[dict]:
    """Messages no other test sends: the text opens the prompt (without a system message of its own,
    the chat template would put its default one first, which every such prompt shares)."""
    return [{"role": "system", "content": _text(seed, words)}, {"role": "user", "content": "Go on."}]


def _chat(client, messages, **kw):
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, **kw)


def _cached(response) -> int:
    return response.usage.prompt_tokens_details.cached_tokens


def _whole_blocks(a: list[int], b: list[int]) -> int:
    """Tokens of b that a cache holding a can serve: whole blocks of the common prefix, last token left."""
    common = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        common += 1
    return min(common, len(b) - 1) // BLOCK * BLOCK


def test_shared_system_prompt_reports_cached_tokens(tenants):
    url, engine = tenants
    client = _client(url, "alice")
    system = {"role": "system", "content": _text(1, 700)}
    first = [system, {"role": "user", "content": "Name the first word."}]
    second = [system, {"role": "user", "content": "Count the boats."}]
    hits_before = metric(url, "ember:prefix_cache_hits_total", {"Authorization": f"Bearer {KEYS['alice']}"})
    assert _cached(_chat(client, first)) == 0
    r = _chat(client, second)
    ids = [engine.tokenizer.apply_chat_template(m) for m in (first, second)]
    assert len(ids[0]) > 700 and r.usage.prompt_tokens == len(ids[1])
    assert _cached(r) == _whole_blocks(ids[0], ids[1]) > 600
    headers = {"Authorization": f"Bearer {KEYS['alice']}"}
    assert metric(url, "ember:prefix_cache_hits_total", headers) - hits_before == _cached(r)
    assert metric(url, "ember:prefix_cache_queries_total", headers) >= len(ids[0]) + len(ids[1])


def test_multi_turn_chat_reuses_its_history_each_turn(tenants):
    url, engine = tenants
    client = _client(url, "bob")
    messages = [{"role": "system", "content": _text(2, 200)}]
    previous: list[int] = []
    for turn in range(4):
        messages.append({"role": "user", "content": f"Turn {turn}: {_text(10 + turn, 30)}"})
        ids = engine.tokenizer.apply_chat_template(messages)
        r = _chat(client, messages)
        if turn == 0:
            assert _cached(r) == 0
        else:
            assert _cached(r) >= _whole_blocks(previous, ids) > 0
        previous = ids
        messages.append({"role": "assistant", "content": r.choices[0].message.content})


def test_streamed_usage_reports_cached_tokens(tenants):
    url, _ = tenants
    client = _client(url, "alice")
    messages = _fresh(3, 300)
    _chat(client, messages)
    stream = _chat(client, messages, stream=True, stream_options={"include_usage": True})
    usage = [c.usage for c in stream if c.usage is not None]
    assert len(usage) == 1 and usage[0].prompt_tokens_details.cached_tokens > 250


def test_tenants_are_isolated_and_shared_namespaces_share(tenants):
    url, _ = tenants
    messages = _fresh(4, 400)
    assert _cached(_chat(_client(url, "alice"), messages)) == 0
    assert _cached(_chat(_client(url, "bob"), messages)) == 0  # alice's blocks are not bob's
    assert _cached(_chat(_client(url, "carol"), messages)) == 0
    assert _cached(_chat(_client(url, "dave"), messages)) > 350  # carol's, in the namespace they share
    assert _cached(_chat(_client(url, "alice"), messages)) > 350  # and alice still has her own


def test_one_key_per_request(tenants):
    """Two Authorization headers are refused: the gate and the namespace must read the same key."""
    url, _ = tenants
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    two = [("Authorization", f"Bearer {KEYS['alice']}"), ("Authorization", f"Bearer {KEYS['bob']}")]
    assert httpx.post(url + "/v1/completions", json=body, headers=two).status_code == 401
    one = {"Authorization": f"Bearer {KEYS['alice']}"}
    assert httpx.post(url + "/v1/completions", json=body, headers=one).status_code == 200


def test_opting_out_and_capping(tenants):
    url, _ = tenants
    client = _client(url, "alice")
    messages = _fresh(5, 200)
    _chat(client, messages)
    assert _cached(_chat(client, messages, extra_body={"prompt_cache_max_len": 0})) == 0
    assert _cached(_chat(client, messages, extra_body={"prompt_cache_max_len": 40})) == 32
    fresh = _fresh(6, 200)
    _chat(client, fresh, extra_body={"prompt_cache_max_len": 0})  # opted out: leaves nothing behind
    assert _cached(_chat(client, fresh)) == 0
    with pytest.raises(openai.BadRequestError) as err:
        _chat(client, messages, extra_body={"prompt_cache_max_len": -1})
    assert "prompt_cache_max_len" in str(err.value)
    assert _cached(_chat(client, messages)) > 150  # still serving, cache intact


def test_completions_with_token_prompts_hit_too(tenants):
    url, _ = tenants
    headers = {"Authorization": f"Bearer {KEYS['bob']}"}
    prompt = [random.Random(7).randrange(100, 40000) for _ in range(100)]
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0}
    first = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=60).json()
    second = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=60).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 96
    assert first["choices"][0]["text"] == second["choices"][0]["text"]


def test_no_prefix_cache_server_never_hits(default_model_dir):
    engine = AsyncEngine(
        EngineConfig(
            model=str(default_model_dir),
            cache=CacheConfig(kv_cache_memory="64MiB", enable_prefix_caching=False),
        ),
        mode="thread",
    )
    try:
        with running_server(engine) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            messages = _fresh(8, 200)
            assert [_cached(_chat(client, messages)) for _ in range(2)] == [0, 0]
            assert metric(url, "ember:prefix_cache_hits_total") == 0
    finally:
        engine.shutdown()


def test_namespace_options_are_checked():
    assert ServeOptions.parse_namespaces(["team=a,b", "other=c"]) == {"team": ["a", "b"], "other": ["c"]}
    for bad in ("team", "=a", "team="):
        with pytest.raises(ValueError, match="NAME=KEY1,KEY2"):
            ServeOptions.parse_namespaces([bad])
    with pytest.raises(ValueError, match="not one of the --api-key"):
        ServeOptions(api_keys=["a"], cache_namespaces={"team": ["a", "b"]})
    with pytest.raises(ValueError, match="in both"):
        ServeOptions(api_keys=["a", "b"], cache_namespaces={"x": ["a"], "y": ["a", "b"]})


def _ks_greater(x: list[float], y: list[float]) -> float:
    """p-value of the one-sided two-sample KS test that x tends to be smaller (faster) than y."""
    from scipy.stats import ks_2samp

    return ks_2samp(x, y, alternative="greater").pvalue


@pytest.mark.slow
def test_timing_audit_finds_sharing_within_a_tenant_and_none_across(tenants):
    """Gu et al.'s procedure: a victim sends a prompt; the attacker times the same prompt against a fresh
    one of the same length, many times; a one-sided KS test asks whether the victim's prompt is faster.
    alice is the victim; bob (another tenant) must see no difference; alice herself must."""
    url, _ = tenants
    rng = random.Random(11)
    samples, length = 16, 256

    def prompt() -> list[int]:
        return [rng.randrange(100, 40000) for _ in range(length)]

    def timed(who: str, tokens: list[int]) -> float:
        body = {"model": MODEL, "prompt": tokens, "max_tokens": 1, "temperature": 0}
        t0 = time.perf_counter()
        r = httpx.post(
            url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEYS[who]}"}, timeout=120
        )
        assert r.status_code == 200, r.text
        return time.perf_counter() - t0

    times = {"across-victim": [], "across-fresh": [], "within-victim": [], "within-fresh": []}
    timed("alice", prompt())  # warm-up: the first request of a run is slower
    for _ in range(samples):
        victim = prompt()
        timed("alice", victim)
        probes = [("across", "bob", victim, "victim"), ("across", "bob", prompt(), "fresh")]
        probes += [("within", "alice", victim, "victim"), ("within", "alice", prompt(), "fresh")]
        rng.shuffle(probes)  # no order effect between the probes of one sample
        for scope, who, tokens, kind in probes:
            times[f"{scope}-{kind}"].append(timed(who, tokens))
    p_across = _ks_greater(times["across-victim"], times["across-fresh"])
    p_within = _ks_greater(times["within-victim"], times["within-fresh"])
    summary = {k: round(sorted(v)[len(v) // 2] * 1000, 1) for k, v in times.items()}
    print(f"timing audit: medians {summary} ms; KS p across tenants {p_across:.3g}, within {p_within:.3g}")
    assert p_within < 1e-3, f"the audit should detect sharing within a tenant: p={p_within}, {summary} ms"
    assert p_across > 1e-3, f"cross-tenant timing differs: p={p_across}, {summary} ms"
