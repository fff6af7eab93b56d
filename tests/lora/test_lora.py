"""Multi-LoRA against PEFT: adapters of different ranks and targets, mixed with the bare base in one
batch, give what PEFT's merged model gives; more adapters than slots swap in and out; bad adapter
files are refused with a clear reason and change nothing."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ember import LLM, SamplingParams, SpeculativeConfig
from ember.errors import InvalidRequest
from ember.lora.adapter import AdapterError
from ember.structured_outputs import StructuredOutputs
from tests.helpers import client_generate, hf_greedy, wait_client_idle

# name -> (rank, alpha, target modules, rsLoRA)
ADAPTERS = {
    "qv4": (4, 8, ["q_proj", "v_proj"], False),
    "all8": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], True),
    "mlp16": (16, 8, ["o_proj", "gate_proj", "down_proj"], False),
}
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [[5, 17, 300 + 11 * i, 42, 7 * i + 1, 900 + i] * 3 for i in range(6)]
ASSIGNED = [None, "qv4", "all8", "mlp16", "qv4", "all8"]  # the bare base, and each adapter, mixed


def _build(base_dir: Path, out: Path, rank: int, alpha: int, targets: list[str], rslora: bool, seed: int):
    """A PEFT adapter with random non-zero A and B, saved; returns PEFT's merged model (the reference)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=targets,
        lora_dropout=0.0,
        use_rslora=rslora,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(out)
    return model.merge_and_unload().eval()


@pytest.fixture(scope="module", params=["llama-gqa", "qwen2-bias"])
def adapters(request, random_model_dirs, tmp_path_factory):
    base_dir = random_model_dirs[request.param]
    root = tmp_path_factory.mktemp(f"adapters-{request.param}")
    refs = {}
    for i, (name, spec) in enumerate(ADAPTERS.items()):
        refs[name] = _build(base_dir, root / name, *spec, seed=i)
    from transformers import AutoModelForCausalLM

    refs[None] = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()
    return base_dir, root, refs


def _want(refs) -> list[list[int]]:
    return [hf_greedy(refs[a], p, GREEDY.max_tokens, [2]) for p, a in zip(PROMPTS, ASSIGNED, strict=True)]


def _engine(base_dir: Path, root: Path, **kw) -> LLM:
    llm = LLM(model=str(base_dir), enable_lora=True, max_lora_rank=16, num_blocks=128, **kw)
    for name in ADAPTERS:
        llm.add_lora(name, str(root / name))
    return llm


def test_mixed_batch_matches_peft_merged_models(adapters):
    base_dir, root, refs = adapters
    want = _want(refs)
    assert len({tuple(w) for w in want}) == len(PROMPTS)  # every adapter changes the output
    for p, a in zip(PROMPTS[1:4], ASSIGNED[1:4], strict=True):  # not vacuous: an adapter changes the base
        assert hf_greedy(refs[a], p, 12, [2]) != hf_greedy(refs[None], p, 12, [2])
    llm = _engine(base_dir, root, max_loras=4)
    got = llm.generate(PROMPTS, GREEDY, lora=ASSIGNED)
    assert [r.outputs[0].token_ids for r in got] == want
    assert llm.engine.lora.num_loads == 3  # all three resident at once, loaded once each
    assert llm.engine.kv.pool.is_whole()


def test_first_token_logprobs_match_peft(adapters):
    base_dir, root, refs = adapters
    llm = _engine(base_dir, root, max_loras=4)
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
    outs = llm.generate(PROMPTS, params, lora=ASSIGNED)
    for prompt, name, out in zip(PROMPTS, ASSIGNED, outs, strict=True):
        with torch.no_grad():
            ref = torch.log_softmax(refs[name](torch.tensor([prompt])).logits[0, -1].float(), dim=-1)
        for token, lp in out.outputs[0].logprobs[0].items():
            assert abs(lp.logprob - ref[token].item()) < 1e-3


def test_more_adapters_than_slots_swap_and_stay_correct(adapters):
    base_dir, root, refs = adapters
    want = _want(refs)
    llm = _engine(base_dir, root, max_loras=1)
    got = llm.generate(PROMPTS, GREEDY, lora=ASSIGNED)
    assert [r.outputs[0].token_ids for r in got] == want
    manager = llm.engine.lora
    assert manager.num_loads >= 3 and sum(manager.users) == 0
    assert llm.engine.kv.pool.is_whole()


def test_prefix_cache_is_not_shared_across_adapters(adapters):
    base_dir, root, _ = adapters
    llm = _engine(base_dir, root, max_loras=4)
    prompt = list(range(300, 340))
    params = SamplingParams(temperature=0, max_tokens=2)
    cached = [llm.generate(prompt, params, lora=a)[0].num_cached_tokens for a in ("qv4", "all8", None, "qv4")]
    assert cached == [0, 0, 0, 32]
    # The cache is keyed by the adapter's weights, not its name: the same weights again reuse their KV,
    # other weights under the old name (a new version) reuse nothing.
    llm.engine.remove_lora("qv4")
    llm.add_lora("qv4", str(root / "qv4"))
    assert llm.generate(prompt, params, lora="qv4")[0].num_cached_tokens == 32
    llm.engine.remove_lora("qv4")
    llm.add_lora("qv4", str(root / "mlp16"))  # weights no request of this prompt has run with
    assert llm.generate(prompt, params, lora="qv4")[0].num_cached_tokens == 0


def test_unknown_adapter_and_adapters_off(adapters, random_model_dirs):
    base_dir, root, _ = adapters
    llm = _engine(base_dir, root, max_loras=2)
    with pytest.raises(InvalidRequest, match="no LoRA adapter named 'nope'"):
        llm.generate(PROMPTS[0], GREEDY, lora="nope")
    plain = LLM(model=str(base_dir), num_blocks=32)
    with pytest.raises(InvalidRequest, match="serves no LoRA adapters"):
        plain.generate(PROMPTS[0], GREEDY, lora="qv4")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_bad_adapters_are_refused_and_change_nothing(adapters, random_model_dirs, tmp_path):
    base_dir, root, refs = adapters
    llm = _engine(base_dir, root, max_loras=2)
    before = dict(llm.engine.lora.adapters)
    good = root / "all8"

    missing = _copy(good, tmp_path / "missing")
    (missing / "adapter_config.json").unlink()
    pickled = _copy(good, tmp_path / "pickled")
    torch.save(load_file(str(pickled / "adapter_model.safetensors")), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    shape = _copy(good, tmp_path / "shape")
    tensors = load_file(str(shape / "adapter_model.safetensors"))
    key = next(k for k in tensors if "k_proj.lora_B" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0] * 2, tensors[key].shape[1])
    save_file(tensors, str(shape / "adapter_model.safetensors"))
    rank = _copy(good, tmp_path / "rank")
    cfg = json.loads((rank / "adapter_config.json").read_text())
    (rank / "adapter_config.json").write_text(json.dumps({**cfg, "r": 32}))
    dora = _copy(good, tmp_path / "dora")
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    target = _copy(good, tmp_path / "target")
    (target / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj", "lm_head"]}))
    garbage = _copy(good, tmp_path / "garbage")
    (garbage / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    listed = _copy(good, tmp_path / "listed")
    (listed / "adapter_config.json").write_text("[1, 2]")
    numbers = _copy(good, tmp_path / "numbers")
    (numbers / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj", 7]}))
    regex = _copy(good, tmp_path / "regex")
    (regex / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": "q_proj|("}))
    alpha = _copy(good, tmp_path / "alpha")
    (alpha / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": -4}))
    nan = _copy(good, tmp_path / "nan")
    tensors = load_file(str(nan / "adapter_model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, str(nan / "adapter_model.safetensors"))

    cases = {
        missing: "no adapter_config.json",
        pickled: "pickle",
        shape: "another model",
        rank: "exceeds this server's maximum LoRA rank",
        dora: "DoRA",
        target: "not LoRA-able",
        garbage: "cannot read adapter_model.safetensors",
        listed: "must hold a JSON object",
        numbers: "non-empty list of module names",
        regex: "not one ember accepts",
        alpha: "lora_alpha must be a positive number",
        nan: "NaN or infinite",
        tmp_path / "nowhere": "not a directory",
    }
    for path, why in cases.items():
        with pytest.raises(AdapterError, match=why):
            llm.add_lora("bad", str(path))
    with pytest.raises(AdapterError, match="already loaded"):
        llm.add_lora("qv4", str(good))
    with pytest.raises(AdapterError, match="adapter name"):
        llm.add_lora("a:b", str(good))
    assert llm.engine.lora.adapters == before
    got = llm.generate(PROMPTS, GREEDY, lora=ASSIGNED)  # still serving, still right
    assert [r.outputs[0].token_ids for r in got] == _want(refs)


def test_an_adapter_with_waiting_requests_cannot_be_removed(adapters):
    base_dir, root, refs = adapters
    llm = _engine(base_dir, root, max_loras=1, max_num_seqs=1)
    engine = llm.engine
    engine.add_request(PROMPTS[0], GREEDY, "first", lora="qv4")
    engine.add_request(PROMPTS[1], GREEDY, "second", lora="all8")  # waits: one sequence at a time
    engine.step()
    for name in ("qv4", "all8"):  # running, and waiting
        with pytest.raises(AdapterError, match="in use"):
            engine.remove_lora(name)
    while engine.has_unfinished_requests():
        engine.step()
    engine.remove_lora("all8")
    with pytest.raises(KeyError):
        engine.remove_lora("all8")
    assert engine.kv.pool.is_whole()


def test_requests_for_resident_adapters_pass_one_waiting_for_a_slot(adapters):
    """One slot, held by a running request: a request for another adapter waits for it, and the ones
    behind it for the base model or the resident adapter are not held up."""
    base_dir, root, refs = adapters
    llm = _engine(base_dir, root, max_loras=1)
    engine = llm.engine
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    engine.add_request(PROMPTS[0], long, "holder", lora="qv4")
    engine.step()
    engine.add_request(PROMPTS[1], GREEDY, "blocked", lora="all8")
    engine.add_request(PROMPTS[2], GREEDY, "base", lora=None)
    engine.add_request(PROMPTS[3], GREEDY, "resident", lora="qv4")
    engine.step()
    running = {s.request.request_id for s in engine.scheduler.running}
    assert running == {"holder", "base", "resident"}
    assert [s.request.request_id for s in engine.scheduler.waiting] == ["blocked"]
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out.outputs[0].token_ids
    assert final["blocked"] == hf_greedy(refs["all8"], PROMPTS[1], GREEDY.max_tokens, [2])
    assert final["base"] == hf_greedy(refs[None], PROMPTS[2], GREEDY.max_tokens, [2])
    assert engine.kv.pool.is_whole() and sum(engine.lora.users) == 0


def test_structured_outputs_with_adapters(adapters):
    """Grammars and adapters in one batch: each constrained output follows its grammar and is what the
    same request gives alone."""
    base_dir, root, _ = adapters
    llm = _engine(base_dir, root, max_loras=4)
    pattern = r"[a-z]{2,8}( [a-z]{2,8}){0,3}"
    sp = SamplingParams(temperature=0, max_tokens=40, structured=StructuredOutputs(regex=pattern))
    batch = llm.generate(PROMPTS, sp, lora=ASSIGNED)
    alone = [llm.generate(p, sp, lora=a)[0] for p, a in zip(PROMPTS, ASSIGNED, strict=True)]
    assert [r.outputs[0].token_ids for r in batch] == [r.outputs[0].token_ids for r in alone]
    for r in batch:
        assert r.outputs[0].finish_reason == "stop"
        assert re.fullmatch(pattern, r.outputs[0].text), r.outputs[0].text
    assert llm.engine.kv.pool.is_whole()


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_speculative_decoding_with_adapters(adapters, method):
    """Speculation in a batch of adapters and the bare base still gives what PEFT's merged models give.
    The draft (the base's first layer) runs without adapters: its guesses for an adapter's requests are
    the base model's, which verification, run with the adapter, judges like any others."""
    base_dir, root, refs = adapters
    if method == "ngram":
        spec = SpeculativeConfig(method="ngram", ngram_min=1, max_batch_tokens=64)
    else:
        spec = SpeculativeConfig(
            method="draft", draft_model=str(base_dir), draft_num_layers=1, max_batch_tokens=64
        )
    llm = _engine(base_dir, root, max_loras=4, speculative=spec)
    got = llm.generate(PROMPTS, GREEDY, lora=ASSIGNED)
    assert [r.outputs[0].token_ids for r in got] == _want(refs)
    # A strong bias on three tokens makes every model cycle among them, so that guesses are kept too.
    looping = SamplingParams(
        temperature=0, max_tokens=24, ignore_eos=True, logit_bias=dict.fromkeys([5, 17, 42], 50.0)
    )
    plain = _engine(base_dir, root, max_loras=4).generate(PROMPTS, looping, lora=ASSIGNED)
    got = llm.generate(PROMPTS, looping, lora=ASSIGNED)
    assert [r.outputs[0].token_ids for r in got] == [r.outputs[0].token_ids for r in plain]
    s = llm.engine.speculator
    assert 0 < s.num_accepted_tokens < s.num_draft_tokens
    assert llm.engine.kv.pool.is_whole()


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_mixed_adapters_match_peft_through_both_clients(adapters, mode):
    """Three adapters and the bare base in one batch through the serving client, the core on a thread
    and in a process: PEFT's merged models' greedy tokens."""
    import asyncio

    from ember import AsyncEngine, CacheConfig, EngineConfig, LoRAConfig

    base_dir, root, refs = adapters
    config = EngineConfig(
        model=str(base_dir),
        cache=CacheConfig(num_blocks=128),
        lora=LoRAConfig(enabled=True, max_rank=16),
    )
    engine = AsyncEngine(config, mode=mode)

    async def load():
        for name in ADAPTERS:
            await engine.add_lora(name, str(root / name))

    try:
        asyncio.run(load())
        got = client_generate(engine, PROMPTS, GREEDY, ASSIGNED)
        assert [r.outputs[0].token_ids for r in got] == _want(refs)
        wait_client_idle(engine)
    finally:
        engine.shutdown()
