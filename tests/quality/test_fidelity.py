"""ember.quality.fidelity: a setting scored against itself is exact; a lossy one is not; the reference's
greedy loop is the engine's greedy decoding; bad settings are refused before any model loads."""

from __future__ import annotations

import pytest
import torch

from ember import LLM, SamplingParams
from ember.config import ConfigError
from ember.quality.fidelity import kl_divergence, measure, reference
from ember.quality.prompts import builtin_prompts

PROMPTS = ["What is 17 times 23?", "Write a Python function that reverses a string.", "Hi there!"]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def tiny(random_model_dirs) -> str:
    return str(random_model_dirs["llama-gqa"])


@pytest.fixture(scope="module")
def tiny_reference(tiny):
    return reference(tiny, prompts=PROMPTS, max_tokens=MAX_TOKENS)


def test_reference_against_itself_is_exact(tiny, tiny_reference):
    f = measure(tiny, quantization=None, prompts=PROMPTS, max_tokens=MAX_TOKENS, reference=tiny_reference)
    assert f.agreement == 1.0 and f.sequence_agreement == 1.0
    assert f.kl_mean == 0.0 and f.kl_p99 == 0.0
    assert f.tokens == sum(len(t) for t in tiny_reference.tokens) == len(PROMPTS) * MAX_TOKENS
    assert all(p.first_divergence is None for p in f.per_prompt)
    assert f.to_json()["quantization"] is None
    assert f.speedup > 0 and f.tokens_per_s > 0 and f.reference_tokens_per_s > 0  # timed in pairs


def test_reference_tokens_are_the_engines_greedy_output(tiny, tiny_reference):
    with LLM(tiny, kv_cache_memory="64MiB") as llm:
        outs = llm.generate(tiny_reference.prompt_ids, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    assert [list(o.outputs[0].token_ids) for o in outs] == tiny_reference.tokens


def test_lossy_setting_on_tiny_model_has_kl(tiny, tiny_reference):
    f = measure(
        tiny,
        quantization="int8",
        dtype="bfloat16",
        prompts=PROMPTS,
        max_tokens=MAX_TOKENS,
        reference=tiny_reference,
    )
    assert (f.quantization, f.dtype) == ("int8", "bfloat16")
    assert f.kl_mean > 0 and f.kl_p99 > 0
    assert 0.0 <= f.agreement <= 1.0 and f.tokens == len(PROMPTS) * MAX_TOKENS


def test_reference_for_other_prompts_is_refused(tiny, tiny_reference):
    with pytest.raises(ValueError, match="another model, prompt set or max_tokens"):
        measure(tiny, quantization=None, prompts=PROMPTS[:1], max_tokens=MAX_TOKENS, reference=tiny_reference)


@pytest.mark.parametrize(
    ("quantization", "dtype", "message"),
    [("q3_k", "float32", "quantization: must be"), ("int4", "float32", "int4 runs with bfloat16")],
)
def test_bad_setting_is_a_clear_error_before_loading(quantization, dtype, message):
    # a model that does not exist: the setting is refused before anything is loaded or resolved
    with pytest.raises(ConfigError, match=message):
        measure("no-such-model", quantization=quantization, dtype=dtype, prompts=PROMPTS)


def test_no_prompts_is_refused():
    with pytest.raises(ValueError, match="no prompts"):
        measure("no-such-model", quantization=None, prompts=[])


def test_kl_divergence_matches_torch_distributions():
    torch.manual_seed(0)
    p, q = torch.log_softmax(torch.randn(5, 11), -1), torch.log_softmax(torch.randn(5, 11), -1)
    want = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=p), torch.distributions.Categorical(logits=q)
    )
    torch.testing.assert_close(kl_divergence(p, q), want)
    assert torch.equal(kl_divergence(p, p), torch.zeros(5))


@pytest.mark.slow
def test_lossy_quantization_on_default_model_differs(default_model_dir):
    """q4_1 on the default model (whose weights are Q4_1 already: the loss is its int8 activations and its
    q8_0 LM head) moves the next-token distributions and, somewhere in these prompts, a greedy choice."""
    model, prompts = str(default_model_dir), builtin_prompts()[:4]
    ref = reference(model, prompts=prompts, max_tokens=16)
    f = measure(
        model, quantization="q4_1", prompts=prompts, max_tokens=16, reference=ref, time_reference=False
    )
    assert f.kl_mean > 0 and f.kl_p99 > 0
    assert f.agreement < 1.0
