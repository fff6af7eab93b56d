"""Reference runs for the tests: HF transformers greedy generation and ember's raw prefill logits."""

from __future__ import annotations

import torch

from ember import LLM


def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int]) -> list[int]:
    x = torch.tensor([prompt_ids])
    with torch.inference_mode():
        y = hf_model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_ids,
            pad_token_id=eos_ids[0],
            top_k=None,
            top_p=None,
            temperature=None,
        )
    return y[0, len(prompt_ids) :].tolist()


def hf_last_logits(hf_model, prompt_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(torch.tensor([prompt_ids])).logits[0, -1].float()


def ember_last_logits(llm: LLM, prompt_ids: list[int]) -> torch.Tensor:
    """One prefill of the whole prompt through ember's runner and paged cache: the last position's logits."""
    engine = llm.engine
    pool = engine.kv.pool
    blocks = [pool.allocate() for _ in range(engine.kv.blocks_for(len(prompt_ids)))]
    try:
        work = [(prompt_ids, 0, len(prompt_ids), blocks)]
        return engine.runner.execute(work, [0])[0]
    finally:
        for b in blocks:
            pool.decref(b)


def make_prompts(tokenizer, lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Chat-templated prompts of roughly the given token lengths (real text, not random ids)."""
    words = [
        "the",
        "river",
        "carried",
        "small",
        "stones",
        "past",
        "the",
        "old",
        "mill",
        "while",
        "children",
        "counted",
        "boats",
        "and",
        "an",
        "engineer",
        "measured",
        "the",
        "flow",
        "of",
        "water",
        "through",
        "the",
        "narrow",
        "gate",
        "near",
        "the",
        "bridge",
    ]
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for n in lengths:
        k = max(1, int(n * 0.8))
        picks = torch.randint(len(words), (k,), generator=g).tolist()
        text = " ".join(words[i] for i in picks)
        ids = tokenizer.apply_chat_template([{"role": "user", "content": f"Summarize: {text}"}])
        prompts.append(ids)
    return prompts


# A tool the function-calling tests declare (server unit tests and end-to-end).
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}


def assert_follows_along_common_greedy_path(
    ref: LLM, got: LLM, max_tokens: int = 6, tol: float = 0.15
) -> None:
    """Greedy runs of both engines on the same prompts: along each run's common prefix the next-token
    distributions agree within `tol` (in logprob), and most of the runs stay on that prefix."""
    from ember import SamplingParams

    prompts = [[5, 17, 300 + i, 42, 7 * i + 1] * (i + 1) for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=5)
    same, compared = 0, 0
    for a, b in zip(ref.generate(prompts, params), got.generate(prompts, params), strict=True):
        for want, have, ta, tb in zip(
            a.outputs[0].logprobs,
            b.outputs[0].logprobs,
            a.outputs[0].token_ids,
            b.outputs[0].token_ids,
            strict=True,
        ):
            for t in set(want) & set(have):
                assert abs(want[t].logprob - have[t].logprob) < tol
                compared += 1
            if ta != tb:
                break
            same += 1
    assert same >= 0.75 * max_tokens * len(prompts) and compared >= 3 * len(prompts)


def client_generate(engine, prompts: list, params, loras: list | None = None) -> list:
    """Run `prompts` concurrently through an engine client (AsyncEngine, in a thread or a process):
    the final RequestOutput of each, in order."""
    import asyncio

    async def one(prompt, lora):
        last = None
        async for out in engine.generate(prompt, params, lora=lora):
            last = out
        return last

    async def run():
        return await asyncio.gather(
            *(one(p, a) for p, a in zip(prompts, loras or [None] * len(prompts), strict=True))
        )

    return asyncio.run(run())


def wait_client_idle(engine, timeout: float = 30.0) -> None:
    """Until the client's core reports nothing running or waiting and every KV block free."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats
        if s is not None and s.num_running == s.num_waiting == 0 and s.kv_cache_usage == 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"the engine did not go idle: {engine.stats}")


def sample_rows(logits, rows: list, generator=None):
    """The tensor sampler on rows that look like sequences (params, token ids, a generator): the batch
    built as the engine builds it each step."""
    from ember.engine.sampler import SamplingBatch, sample

    return sample(logits, SamplingBatch.build(rows, logits.shape[-1], logits.device), generator)


def filtered_probs_of(logits, params: list):
    """top-k, top-p and min-p of these SamplingParams, one per row, on logits already tempered."""
    from types import SimpleNamespace

    from ember.engine.sampler import SamplingBatch, filtered_probs

    rows = [SimpleNamespace(params=p, num_output_tokens=0) for p in params]
    return filtered_probs(logits, SamplingBatch.build(rows, logits.shape[-1], logits.device))
