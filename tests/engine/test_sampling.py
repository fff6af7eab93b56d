"""The sampler and the stop rules, end to end through the engine, with the default model where text matters."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ember import SamplingParams
from tests.helpers import make_prompts
from tests.helpers import sample_rows as sample


def _fake_seq(params: SamplingParams, token_ids=(1, 2, 3), prompt_len=1, generator=None):
    return SimpleNamespace(
        params=params,
        token_ids=list(token_ids),
        output_token_ids=list(token_ids[prompt_len:]),
        num_output_tokens=len(token_ids) - prompt_len,
        generator=generator,
        request=SimpleNamespace(eos_token_ids=[0]),
    )


def test_penalties_follow_their_definitions():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0]])
    seq = _fake_seq(
        SamplingParams(temperature=0, frequency_penalty=0.5, presence_penalty=0.25),
        token_ids=[4, 3, 3, 1],
        prompt_len=1,
    )
    # output tokens 3, 3, 1: token 3 loses 2*0.5 + 0.25, token 1 loses 0.5 + 0.25 -> argmax becomes 0
    assert sample(logits.clone(), [seq]).token_ids == [0]
    rep = _fake_seq(SamplingParams(temperature=0, repetition_penalty=2.0), token_ids=[3, 0], prompt_len=1)
    # prompt token 3 and output token 0 are penalised: 3.0 -> 1.5, 2.0 -> 1.0; argmax is still 3
    assert sample(logits.clone(), [rep]).token_ids == [3]
    rep8 = _fake_seq(SamplingParams(temperature=0, repetition_penalty=8.0), token_ids=[3, 0], prompt_len=1)
    # 3.0 -> 0.375 and 2.0 -> 0.25 both fall below the unpenalised 0.5 of token 2
    assert sample(logits.clone(), [rep8]).token_ids == [2]
    neg = torch.tensor([[-2.0, -1.0, -0.6]])
    rep_neg = _fake_seq(SamplingParams(temperature=0, repetition_penalty=2.0), token_ids=[1, 0], prompt_len=1)
    assert sample(neg, [rep_neg]).token_ids == [2]  # negative logits grow more negative: -1.0 -> -2.0


def test_logit_bias_and_filters_reduce_to_greedy():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    bias = _fake_seq(SamplingParams(temperature=0, logit_bias={7: 100.0}))
    assert sample(logits[:1].clone(), [bias]).token_ids == [7]
    greedy = logits.argmax(-1).tolist()
    filtered = [
        _fake_seq(SamplingParams(temperature=1.0, top_k=1)),
        _fake_seq(SamplingParams(temperature=1.0, top_p=1e-6)),
        _fake_seq(SamplingParams(temperature=1.0, min_p=1.0)),
        _fake_seq(SamplingParams(temperature=0.0)),
    ]
    assert sample(logits.clone(), filtered).token_ids == greedy


def test_top_k_and_top_p_keep_only_their_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    for _ in range(50):
        s = sample(logits.clone(), [_fake_seq(SamplingParams(top_k=2))]).token_ids[0]
        assert s in (0, 1)
        s = sample(logits.clone(), [_fake_seq(SamplingParams(top_p=0.7))]).token_ids[0]
        assert s in (0, 1)  # 0.5 < 0.7 needs the second token; 0.8 >= 0.7 stops there
        s = sample(logits.clone(), [_fake_seq(SamplingParams(min_p=0.5))]).token_ids[0]
        assert s in (0, 1)  # 0.3 >= 0.5 * 0.5


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = torch.log(probs)[None].repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    seqs = [_fake_seq(SamplingParams(temperature=1.0), generator=g) for _ in range(4000)]
    counts = torch.bincount(torch.tensor(sample(logits, seqs).token_ids), minlength=3).float() / 4000
    assert torch.allclose(counts, probs, atol=0.03)


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(default_llm):
    prompts = make_prompts(default_llm.tokenizer, [10, 40, 80], seed=8)
    seeded = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=20, seed=1234)
    alone = default_llm.generate(prompts[0], seeded)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=25)
    batch = default_llm.generate(prompts, [seeded, others, others])
    assert batch[0].outputs[0].token_ids == alone
    other_seed = default_llm.generate(
        prompts[0], SamplingParams(temperature=1.0, top_p=0.95, max_tokens=20, seed=99)
    )
    assert other_seed[0].outputs[0].token_ids != alone


def test_n_samples_are_distinct_and_share_the_prompt_blocks(default_llm):
    engine = default_llm.engine
    prompt = make_prompts(default_llm.tokenizer, [200], seed=9)[0]
    params = SamplingParams(n=4, temperature=1.0, max_tokens=12, seed=7)
    engine.add_request(prompt, params, "fork")
    used_after_fork = None
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if len(out.outputs) == 4 and used_after_fork is None:
                used_after_fork = engine.kv.pool.num_blocks - engine.kv.pool.num_free
            if out.finished:
                final = out
    prompt_blocks = engine.kv.blocks_for(len(prompt))
    assert used_after_fork < 2 * prompt_blocks  # four samples, one copy of the prompt's KV
    texts = [o.text for o in final.outputs]
    assert len(set(texts)) == 4 and [o.index for o in final.outputs] == [0, 1, 2, 3]
    assert engine.kv.pool.is_whole()
    again = default_llm.generate(prompt, params)[0]
    assert [o.text for o in again.outputs] == texts  # seeded n > 1 reproduces too


@pytest.fixture(scope="module")
def reference_reply(default_llm):
    prompt = default_llm.tokenizer.apply_chat_template([{"role": "user", "content": "Name three colors."}])
    out = default_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40))[0].outputs[0]
    return prompt, out


def test_stop_string_spanning_tokens_is_cut_and_excluded(default_llm, reference_reply):
    prompt, ref = reference_reply
    # A stop string that starts inside one token and ends inside a later one.
    tokens = [default_llm.tokenizer.decode([t]) for t in ref.token_ids]
    start = len(tokens[0]) + len(tokens[1]) + len(tokens[2]) - 1
    stop = ref.text[start : start + 4]
    assert len(stop) == 4
    out = default_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, stop=[stop, "zzzz"]))[0]
    c = out.outputs[0]
    assert c.text == ref.text[: ref.text.index(stop)]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    kept = default_llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=40, stop=[stop], include_stop_str_in_output=True)
    )[0].outputs[0]
    assert kept.text == ref.text[: ref.text.index(stop) + len(stop)]


def test_stop_token_max_tokens_eos_and_ignore_eos(default_llm, reference_reply):
    prompt, ref = reference_reply
    assert ref.finish_reason == "stop" and ref.token_ids[-1] in default_llm.engine.eos_token_ids
    third = ref.token_ids[2]
    out = default_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[third]))
    c = out[0].outputs[0]
    assert c.token_ids == ref.token_ids[:3] and c.finish_reason == "stop" and c.stop_reason == third
    c = default_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=5))[0].outputs[0]
    assert c.token_ids == ref.token_ids[:5] and c.finish_reason == "length"
    n = len(ref.token_ids)
    c = default_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=n + 5, ignore_eos=True))[0]
    assert len(c.outputs[0].token_ids) == n + 5 and c.outputs[0].finish_reason == "length"
    c = default_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=n + 5, min_tokens=n + 2))[0]
    assert len(c.outputs[0].token_ids) >= n + 2


def test_min_tokens_holds_off_stop_strings(default_llm, reference_reply):
    prompt, ref = reference_reply
    text = default_llm.tokenizer.decode(ref.token_ids)
    stop = text.split()[1]  # a word near the start of the reply
    early = default_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, stop=[stop]))[
        0
    ].outputs[0]
    assert early.finish_reason == "stop" and early.text == text[: text.index(stop)]
    held = default_llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=40, stop=[stop], min_tokens=len(early.token_ids) + 4)
    )[0].outputs[0]
    assert len(held.token_ids) >= len(early.token_ids) + 4
    assert held.text.startswith(text[: text.index(stop) + len(stop)])  # went past the early match


def test_logprobs_with_top_alternatives(default_llm, reference_reply):
    prompt, ref = reference_reply
    c = default_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6, logprobs=5))[0].outputs[0]
    assert len(c.logprobs) == 6
    for tok, entry in zip(c.token_ids, c.logprobs, strict=True):
        assert tok in entry and entry[tok].rank == 1  # greedy picks the most likely
        assert len(entry) == 5
        ranked = sorted(entry.values(), key=lambda lp: lp.rank)
        assert [lp.rank for lp in ranked] == [1, 2, 3, 4, 5]
        assert all(a.logprob >= b.logprob for a, b in zip(ranked, ranked[1:], strict=False))
    assert c.cumulative_logprob == pytest.approx(
        sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs, strict=True)), abs=1e-4
    )


def test_logprobs_land_on_their_own_rows_in_a_mixed_batch():
    """Rows that asked for logprobs get theirs, rows that did not get none, whatever the order."""
    logits = torch.log_softmax(torch.randn(4, 50, generator=torch.Generator().manual_seed(0)), dim=-1)
    wants = [None, 2, None, 0]
    seqs = [_fake_seq(SamplingParams(temperature=0, logprobs=k)) for k in wants]
    result = sample(logits, seqs)
    for row, k in enumerate(wants):
        if k is None:
            assert result.logprobs[row] is None and result.chosen_logprobs[row] is None
        else:
            token = result.token_ids[row]
            assert token == int(logits[row].argmax())
            assert result.logprobs[row][token].logprob == pytest.approx(float(logits[row, token]), abs=1e-5)
            assert len(result.logprobs[row]) == max(k, 1)


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_k=-2),
        dict(n=0),
        dict(max_tokens=0),
        dict(logprobs=21),
        dict(stop=[""]),
        dict(logit_bias={1: 200.0}),
        dict(presence_penalty=3),
    ],
)
def test_bad_params_name_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_bad_requests_are_refused_cleanly(default_llm):
    from ember.errors import InvalidRequest

    engine = default_llm.engine
    with pytest.raises(InvalidRequest, match="empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(InvalidRequest, match="vocabulary"):
        engine.add_request([10**9], SamplingParams())
    with pytest.raises(InvalidRequest) as e:
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=10**6))
    assert e.value.code == "context_length_exceeded"
    assert not engine.has_unfinished_requests() and engine.kv.pool.is_whole()
