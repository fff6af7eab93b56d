"""Structured outputs in the engine: masks from the grammar, compiled off the step loop and cached."""

from __future__ import annotations

import json
import threading

import jsonschema
import llguidance
import llguidance.hf
import pytest
import torch

from ember import SamplingParams
from ember.engine.structured import allowed_tokens
from ember.errors import InvalidRequest
from ember.structured_outputs import StructuredOutputs
from tests.fixtures_tokenizer import smollm2_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["cat", "dog", "fox"]},
        "legs": {"type": "integer", "minimum": 0, "maximum": 8},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["kind", "legs", "tags"],
}


def test_bitmask_unpacking_matches_llguidance():
    tok = smollm2_tokenizer()
    llt = llguidance.hf.from_tokenizer(tok.hf, n_vocab=49152, eos_token=[2])
    m = llguidance.LLMatcher(llt, StructuredOutputs(json=SCHEMA).grammar_text())
    m.consume_tokens(tok.encode('{"kind": "', add_special_tokens=False))
    words = torch.frombuffer(bytearray(m.compute_bitmask()), dtype=torch.int32)[None]
    reference = torch.frombuffer(bytearray(m.compute_logit_bias()), dtype=torch.uint8) > 0
    got = allowed_tokens(words, 49152)[0]
    assert torch.equal(got, reference) and 0 < int(got.sum()) < 1000


def _prompt(llm) -> list[int]:
    return llm.tokenizer.encode("An animal as JSON: ")


def test_outputs_follow_the_schema_sampled_and_greedy(random_llm):
    pool = random_llm.engine.kv.pool
    constraint = StructuredOutputs(json=SCHEMA)
    params = [
        SamplingParams(temperature=0, max_tokens=80, structured=constraint),
        SamplingParams(temperature=1.0, n=3, seed=5, max_tokens=80, structured=constraint, logprobs=2),
        SamplingParams(temperature=0, max_tokens=8),  # unconstrained, in the same batch
    ]
    outs = random_llm.generate([_prompt(random_llm)] * 3, params)
    for out in outs[:2]:
        for c in out.outputs:
            assert c.finish_reason == "stop", c.text
            jsonschema.validate(json.loads(c.text), SCHEMA)
    assert len(outs[1].outputs[0].logprobs) == len(outs[1].outputs[0].token_ids)
    assert not outs[2].outputs[0].text.startswith('{"kind"')
    assert pool.num_free == pool.num_blocks


def test_choice_regex_and_grammar(random_llm):
    cases = [
        (StructuredOutputs(choice=["alpha", "beta gamma"]), lambda t: t in ("alpha", "beta gamma")),
        (StructuredOutputs(regex=r"[0-9]{3}-[a-z]{2}"), lambda t: len(t) == 6 and t[3] == "-"),
        (StructuredOutputs(grammar='root ::= "(" [a-c]+ ")"'), lambda t: t[0] == "(" and t[-1] == ")"),
    ]
    for constraint, ok in cases:
        for temperature in (0.0, 1.0):
            sp = SamplingParams(temperature=temperature, seed=3, max_tokens=40, structured=constraint)
            text = random_llm.generate(_prompt(random_llm), sp)[0].outputs[0].text
            assert ok(text), (constraint, text)


def test_a_request_waiting_for_its_grammar_does_not_stall_others(random_llm, monkeypatch):
    engine = random_llm.engine
    release = threading.Event()
    compile_ = type(engine.grammars)._compile

    def slow_compile(self, grammar):
        release.wait(timeout=30)
        return compile_(self, grammar)

    monkeypatch.setattr(type(engine.grammars), "_compile", slow_compile)
    schema = {**SCHEMA, "title": "never seen before"}  # a new grammar: not in the cache
    held = engine.add_request(
        _prompt(random_llm),
        SamplingParams(temperature=0, max_tokens=60, structured=StructuredOutputs(json=schema)),
    )
    free = engine.add_request(_prompt(random_llm), SamplingParams(temperature=0, max_tokens=12))
    assert held.grammar_pending
    done = {}
    while free.request_id not in done or not done[free.request_id].finished:
        for out in engine.step():
            done[out.request_id] = out
    assert (
        done[free.request_id].finished and held.request_id not in done and not held.seqs[0].output_token_ids
    )
    release.set()
    while engine.has_unfinished_requests():
        assert engine.poll_grammars() in ([], [(held, None)])
        for out in engine.step():
            done[out.request_id] = out
        engine.wait_for_grammars(0.01)
    jsonschema.validate(
        json.loads(random_llm.tokenizer.decode(done[held.request_id].outputs[0].token_ids)), schema
    )


def test_a_bad_schema_is_refused_and_leaves_nothing_behind(random_llm):
    bad = SamplingParams(structured=StructuredOutputs(json={"type": "object", "not": {}}))
    for _ in range(2):  # compiled, then from the cache of refusals
        with pytest.raises(InvalidRequest, match="not"):
            random_llm.generate([_prompt(random_llm)] * 2, [SamplingParams(max_tokens=4), bad])
        assert not random_llm.engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputs(json=SCHEMA, regex="a")
    with pytest.raises(InvalidRequest, match="double quotes"):
        StructuredOutputs(json="{not json").grammar_text()


def test_constrained_greedy_output_is_the_same_with_a_prefix_cache_hit(random_llm):
    prompt = random_llm.tokenizer.encode("A long shared preamble. " * 12)
    sp = SamplingParams(temperature=0, max_tokens=60, structured=StructuredOutputs(json=SCHEMA))
    first = random_llm.generate(prompt, sp)[0]
    second = random_llm.generate(prompt, sp)[0]
    assert second.num_cached_tokens > 0
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
