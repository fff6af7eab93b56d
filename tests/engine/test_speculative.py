"""Speculative decoding: greedy output is exactly plain decoding's, sampled output follows the target's
distribution, rejected KV is rolled back and nothing leaks, and speculation steps aside for large batches."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chi2_contingency, chisquare

from ember import LLM, SamplingParams, SpeculativeConfig
from ember.engine.proposers import NgramProposer, Proposal
from ember.engine.speculative import Speculator
from tests.helpers import filtered_probs_of as filtered_probs
from tests.helpers import make_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def _spec(method: str, model_dir, **kw) -> SpeculativeConfig:
    if method == "ngram":
        return SpeculativeConfig(method="ngram", ngram_min=1, **kw)
    # The draft: the target's own first layer and its LM head, a valid (and poor) draft model.
    return SpeculativeConfig(method="draft", draft_model=str(model_dir), draft_num_layers=1, **kw)


def _prompts(tokenizer, seed: int) -> list[list[int]]:
    a, b, c, d = make_prompts(tokenizer, [12, 30, 7, 50], seed=seed)
    return [a * 3, b, c + c, d + d[:20], b[:5] * 6]


# A random model's greedy text never repeats, so prompt lookup would find nothing to propose. A strong
# bias on a few tokens makes it cycle among them, in patterns lookup predicts often but not always.
LOOP3 = {100: 50.0, 200: 50.0, 300: 50.0}
LOOP2 = {100: 50.0, 200: 50.0}


def _mixed_params() -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logit_bias=LOOP3),
        SamplingParams(
            temperature=0, max_tokens=33, ignore_eos=True, logprobs=2, presence_penalty=0.7, logit_bias=LOOP2
        ),
        SamplingParams(temperature=0, max_tokens=25, n=2, repetition_penalty=1.3, min_tokens=5),
        SamplingParams(temperature=0.9, max_tokens=30, seed=11, ignore_eos=True),  # seeded: plain decoding
        SamplingParams(temperature=0, max_tokens=47, ignore_eos=True),
    ]


def _ids(outputs) -> list[list[list[int]]]:
    return [[c.token_ids for c in r.outputs] for r in outputs]


# -- prompt lookup ----------------------------------------------------------------------------------


def test_ngram_lookup_prefers_the_longest_then_the_most_recent_match():
    ngram = NgramProposer(ngram_max=3, ngram_min=1)
    # [1, 2, 3] occurs at the start: the three tokens after it are proposed.
    assert ngram.lookup([1, 2, 3, 4, 1, 9, 9, 1, 2, 3], 3) == [4, 1, 9]
    # [5, 6] occurs twice: the later occurrence wins; what follows may be shorter than k.
    assert ngram.lookup([5, 6, 9, 5, 6, 7, 5, 6], 4) == [7, 5, 6]
    # Only a 1-gram matches, and only with ngram_min 1.
    assert ngram.lookup([8, 1, 2, 3, 8], 2) == [1, 2]
    assert NgramProposer(3, 2).lookup([8, 1, 2, 3, 8], 2) == []
    assert ngram.lookup([1, 2, 3], 2) == []  # nothing repeats
    assert ngram.lookup([4], 2) == []


# -- exactness --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama-gqa", "mistral-window"])
@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_and_seeded_outputs_equal_plain_decoding(random_model_dirs, kind, method):
    """A mixed batch (penalties, logprobs, n=2, min_tokens, logit bias, a seeded sample, plain greedy) is token for
    token what plain decoding gives, on its first run and again from the prefix cache; blocks of 4 tokens
    make rollbacks cross block boundaries."""
    model_dir = random_model_dirs[kind]
    plain = LLM(model=str(model_dir), block_size=4, num_blocks=512)
    prompts = _prompts(plain.tokenizer, seed=5)
    params = _mixed_params()
    want = plain.generate(prompts, params)
    spec = LLM(
        model=str(model_dir),
        block_size=4,
        num_blocks=512,
        speculative=_spec(method, model_dir, max_batch_tokens=64),
    )
    for round_ in range(2):  # the second run reads its prompts from the prefix cache
        got = spec.generate(prompts, params)
        assert _ids(got) == _ids(want)
        for g, w in zip(got[1].outputs[0].logprobs, want[1].outputs[0].logprobs, strict=True):
            assert g.keys() == w.keys()
            for t in g:
                assert g[t].logprob == pytest.approx(w[t].logprob, abs=1e-4)
                # Verification and plain decoding attend through different code (the CPU kernels decode
                # one query at a time): deep in a 49k vocabulary, float rounding can swap near-tied tokens.
                assert abs(g[t].rank - w[t].rank) <= (0 if w[t].rank <= 5 else 2)
        if round_:
            assert all(r.num_cached_tokens > 0 for r in got)
    s = spec.engine.speculator
    assert s.num_accepted_tokens > 0  # speculation did happen,
    assert s.num_draft_tokens > s.num_accepted_tokens  # and rejections were rolled back
    assert s.num_emitted_tokens == s.num_accepted_tokens + s.num_drafts
    assert spec.engine.kv.pool.is_whole()


def test_a_full_copy_as_draft_is_always_accepted(random_model_dirs):
    """The target as its own draft: every proposal kept, one bonus token per step, the output unchanged."""
    model_dir = random_model_dirs["qwen2-bias"]
    plain = LLM(model=str(model_dir), num_blocks=256)
    # The long prompt: the draft catches up on it over several steps before it proposes.
    prompts = _prompts(plain.tokenizer, seed=8)[:3] + make_prompts(plain.tokenizer, [300], seed=9)
    spec = LLM(
        model=str(model_dir),
        num_blocks=256,
        speculative=SpeculativeConfig(
            method="draft", draft_model=str(model_dir), num_speculative_tokens=5, max_batch_tokens=64
        ),
    )
    assert _ids(spec.generate(prompts, GREEDY)) == _ids(plain.generate(prompts, GREEDY))
    s = spec.engine.speculator
    assert s.num_drafts > 0 and s.num_accepted_tokens == s.num_draft_tokens
    assert s.num_emitted_tokens > 5 * s.num_drafts  # k + 1 tokens per speculative step, short only at the end


@pytest.mark.parametrize("max_tokens", [3, 20])
def test_samples_fork_before_any_speculation(random_model_dirs, max_tokens):
    """A prompt whose last prefill chunk is a single token leaves the parent of an n=2 request with one
    token pending before it has forked: it must sample plainly (and fork) first, or its samples would
    never all exist."""
    model_dir = random_model_dirs["llama-gqa"]
    prompt = make_prompts(LLM(model=str(model_dir), num_blocks=8).tokenizer, [9], seed=4)[0]
    assert len(prompt) % 4 == 1  # chunks of 4, then 1
    params = SamplingParams(temperature=0, max_tokens=max_tokens, n=2, ignore_eos=True, logit_bias=LOOP3)
    want = LLM(model=str(model_dir), num_blocks=64, max_num_batched_tokens=4).generate(prompt, params)
    spec = LLM(
        model=str(model_dir),
        num_blocks=64,
        max_num_batched_tokens=4,
        speculative=SpeculativeConfig(
            method="ngram", ngram_min=1, num_speculative_tokens=2, max_batch_tokens=64
        ),
    )
    got = spec.generate(prompt, params)
    assert _ids(got) == _ids(want) and len(got[0].outputs) == 2
    assert spec.engine.kv.pool.is_whole()


def test_min_p_probabilities_are_normalised():
    """Rejection sampling compares p with q, so the filtered distribution must sum to one."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -3.0], [0.5, 0.4, 0.3, 0.2]])
    params = [SamplingParams(min_p=0.3), SamplingParams(top_k=2, min_p=0.1)]
    probs = filtered_probs(logits, params)
    assert torch.allclose(probs.sum(dim=-1), torch.ones(2))
    assert probs[0, 3] == 0 and probs[1, 2] == 0


def test_preemption_and_aborts_with_many_rejections_leave_the_pool_whole(random_model_dirs):
    """A poor draft (most proposals rejected) in a pool too small for the batch: sequences are preempted
    and recomputed, some are aborted mid-way; outputs still equal plain decoding, every block returns."""
    model_dir = random_model_dirs["mistral-window"]
    plain = LLM(model=str(model_dir), block_size=2)
    prompts = make_prompts(plain.tokenizer, [20, 33, 9, 41, 27, 15], seed=2)
    want = _ids(plain.generate(prompts, GREEDY))
    spec = LLM(model=str(model_dir), block_size=2, num_blocks=60, speculative=_spec("draft", model_dir))
    engine = spec.engine
    for i, p in enumerate(prompts):
        engine.add_request(p, GREEDY, f"r{i}")
    final, steps = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        steps += 1
        if steps == 12:
            engine.abort_request("r1")
        for seq in engine.scheduler.running:  # rolled back: no block past what the tokens need
            assert len(seq.block_table) <= engine.kv.blocks_for(seq.num_tokens)
    assert engine.scheduler.num_preemptions > 0
    assert "r1" not in final
    for i in (0, 2, 3, 4, 5):
        assert final[f"r{i}"].outputs[0].token_ids == want[i][0]
    s = engine.speculator
    assert s.num_draft_tokens > 2 * s.num_accepted_tokens
    assert engine.kv.pool.is_whole()


# -- distribution -----------------------------------------------------------------------------------


@pytest.mark.parametrize("point_mass", [True, False])
def test_acceptance_rule_emits_the_target_distribution(point_mass):
    """The rule alone, on a 6-token vocabulary: whatever q proposes, the token emitted at each position is
    distributed as p there (chi-square goodness of fit over 20,000 draws)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor(
        [[0.5, 0.2, 0.1, 0.1, 0.05, 0.05], [0.05, 0.05, 0.6, 0.1, 0.1, 0.1], [0.3, 0.3, 0.1, 0.1, 0.1, 0.1]]
    )
    q = torch.tensor([[0.1, 0.6, 0.1, 0.1, 0.05, 0.05], [0.2, 0.2, 0.2, 0.2, 0.1, 0.1]])
    first, second = torch.zeros(6), torch.zeros(6)
    trials = 20_000
    for _ in range(trials):
        if point_mass:
            prop = Proposal([0, 2])  # n-gram lookup: a fixed guess
        else:
            prop = Proposal(torch.multinomial(q, 1, generator=gen).squeeze(1).tolist(), q)
        kept, last = Speculator._accept_sampled(p, prop, gen)
        emitted = prop.tokens[:kept] + [last]
        first[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[1]] += 1
    assert chisquare(first, p[0] * trials).pvalue > 1e-3
    assert chisquare(second, p[1] * second.sum()).pvalue > 1e-3
    assert second.sum() > trials / 4  # the second position was reached often enough to test


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_sampled_tokens_are_distributed_as_plain_sampling(random_model_dirs, method):
    """Whole engine, small random model, 600 samples of 4 tokens each way, over five tokens the prompt
    holds (so lookup always finds a guess): at every position after the first (the first is sampled by the prefill step, without speculation), a chi-square test of the
    contingency table does not tell speculative from plain decoding."""
    model_dir = random_model_dirs["llama-gqa"]
    five = [100, 200, 300, 400, 500]  # biased far above the rest: the model's logits decide among them
    prompt = make_prompts(LLM(model=str(model_dir), num_blocks=8).tokenizer, [10], seed=1)[0] + five * 2
    params = SamplingParams(
        temperature=1.0, max_tokens=4, ignore_eos=True, logit_bias=dict.fromkeys(five, 50.0)
    )
    config = _spec(method, model_dir, max_batch_tokens=100_000, num_speculative_tokens=3, min_acceptance=0.0)
    counts = []
    for speculative in (None, config):
        llm = LLM(model=str(model_dir), num_blocks=4096, speculative=speculative, seed=7)
        outs = llm.generate([prompt] * 600, params)
        counts.append([[o.outputs[0].token_ids[j] for o in outs] for j in range(4)])
        if speculative is not None:
            s = llm.engine.speculator
            assert s.num_draft_tokens > 800 and 0 < s.num_accepted_tokens < s.num_draft_tokens
    for j in (1, 2, 3):
        tokens = sorted(set(counts[0][j]) | set(counts[1][j]))
        table = [[col.count(t) for t in tokens] for col in (counts[0][j], counts[1][j])]
        table = [[a, b] for a, b in zip(*table, strict=True) if a + b >= 10]  # drop sparse cells
        assert chi2_contingency(list(zip(*table, strict=True))).pvalue > 1e-3


# -- adaptivity -------------------------------------------------------------------------------------


def test_large_batches_decode_plainly_and_small_ones_speculate(random_model_dirs):
    model_dir = random_model_dirs["llama-gqa"]
    llm = LLM(model=str(model_dir), num_blocks=512, speculative=_spec("ngram", model_dir))
    prompts = _prompts(llm.tokenizer, seed=3)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logit_bias=LOOP3)
    llm.generate((prompts * 4)[:16], params)  # 16 running x (1 + k) is past max_batch_tokens 16
    assert llm.engine.speculator.num_drafts == 0
    llm.generate(prompts[:2], params)
    assert llm.engine.speculator.num_drafts > 0


def test_a_sequence_with_low_acceptance_pauses_ever_longer():
    spec = Speculator(SpeculativeConfig(method="ngram", min_acceptance=0.25), NgramProposer(4, 1))

    class Seq:
        spec_acceptance, spec_paused_steps, spec_num_pauses = 1.0, 0, 0

    seq = Seq()
    for _ in range(2):
        spec._learn(seq, kept=0, proposed=4)
        assert seq.spec_paused_steps == 0
    spec._learn(seq, kept=0, proposed=4)  # 1 -> 0.5 -> 0.25 -> 0.125: below the floor
    pauses = [seq.spec_paused_steps]
    for _ in range(3):  # after each pause, one more miss pauses it again, for twice as long
        spec._learn(seq, kept=0, proposed=4)
        pauses.append(seq.spec_paused_steps)
    assert pauses == [8, 16, 32, 64]
    spec._learn(seq, kept=4, proposed=4)  # a good step ends the streak
    assert seq.spec_num_pauses == 0


def test_config_is_checked():
    assert SpeculativeConfig.parse("ngram").method == "ngram"
    assert SpeculativeConfig.parse("draft:some-model").draft_model == "some-model"
    assert SpeculativeConfig.parse("none").method is None
    for bad in ("medusa", "draft:", "ngram:3"):
        with pytest.raises(ValueError, match="ngram or draft"):
            SpeculativeConfig.parse(bad)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeConfig(method="ngram", num_speculative_tokens=0)
    with pytest.raises(ValueError, match="draft_num_layers applies to a draft model"):
        SpeculativeConfig.parse("ngram", draft_num_layers=4)
    with pytest.raises(ValueError, match="inside the SpeculativeConfig"):
        LLM(model="unused", speculative=SpeculativeConfig(method="ngram"), num_speculative_tokens=3)


def test_a_draft_deeper_than_its_model_is_refused(random_model_dirs):
    model_dir = random_model_dirs["llama-gqa"]
    with pytest.raises(ValueError, match="draft_num_layers is 9; the draft model has 3"):
        LLM(model=str(model_dir), num_blocks=8, speculative=f"draft:{model_dir}", draft_num_layers=9)


# -- the real default model -------------------------------------------------------------------------

TEXT = (
    "The committee met on Tuesday to discuss the budget for the new library, which will open next spring near "
    "the river. Members agreed that the reading room should have more windows and that the children's section "
    "needs new shelves."
)
CHATS = [
    [{"role": "user", "content": f"Repeat this text exactly:\n\n{TEXT}"}],
    [
        {
            "role": "user",
            "content": f"Fix the spelling and return the text:\n\n{TEXT.replace('windows', 'windos')}",
        }
    ],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_default_model_greedy_equals_plain_decoding(default_model_dir, default_llm, method):
    """The real model, grounded and open prompts in one batch: identical greedy text with speculation, on
    the first run and again with every prompt from the prefix cache."""
    params = [
        SamplingParams(temperature=0, max_tokens=48),
        SamplingParams(temperature=0, max_tokens=48, logprobs=1),
        SamplingParams(temperature=0, max_tokens=24, presence_penalty=0.5),
        SamplingParams(temperature=0, max_tokens=32, n=2),
    ]
    want = _ids(default_llm.chat(CHATS, params))
    if method == "ngram":
        config = SpeculativeConfig(method="ngram", max_batch_tokens=64)
    else:  # the model's first 26 of 30 layers as a truncated draft, kept proposing whatever it scores
        config = SpeculativeConfig(
            method="draft",
            draft_model=str(default_model_dir),
            draft_num_layers=26,
            max_batch_tokens=64,
            min_acceptance=0.0,
        )
    spec = LLM(model=str(default_model_dir), kv_cache_memory="256MiB", speculative=config)
    for round_ in range(2):
        got = spec.chat(CHATS, params)
        assert _ids(got) == want
        if round_:
            assert all(r.num_cached_tokens > 0 for r in got)
    s = spec.engine.speculator
    assert 0 < s.num_accepted_tokens < s.num_draft_tokens
    assert spec.engine.kv.pool.is_whole()
