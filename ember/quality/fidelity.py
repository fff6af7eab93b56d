"""Fidelity of a setting against the float32 unquantized reference, on ember's own engine for both sides.

The reference decodes greedily on each prompt and keeps its next-token distribution at every position.
The candidate (another quantization or dtype) is then fed the reference's tokens (teacher forcing), so its
distributions line up position by position with the reference's, and is scored on them:

- agreement: the fraction of positions where the candidate's argmax is the reference's token;
- KL(ref || cand) of the next-token distributions, mean and 99th percentile over positions;
- sequence agreement: the fraction of prompts whose greedy continuation is identical. Fed the reference's
  tokens, the candidate sees exactly what it would have generated itself up to its first disagreement, so
  its free-running continuation is identical if and only if it agrees at every position: no second pass.

Both sides run one sequence at a time, prefill then one-token decode steps, as a request alone in the
engine runs: the quantized layers compute decode rows on their packed kernels and many-row steps on dense
copies (ember.models.quant), so these are the numerics of a lightly loaded engine. A setting scored against
itself gets agreement 1.0 and KL 0 exactly.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ember.config import engine_config
from ember.llm import LLM

REFERENCE_DTYPE = "float32"


@dataclass
class Reference:
    """The float32 unquantized model's greedy continuations and its next-token log-probabilities at each
    of their positions: what candidates are scored against (build once, score many settings)."""

    model: str
    prompts: list[str]
    max_tokens: int
    prompt_ids: list[list[int]]
    tokens: list[list[int]]  # per prompt, the greedy continuation (ends at an EOS or after max_tokens)
    logprobs: list[torch.Tensor] = field(repr=False)  # per prompt, [len(tokens), vocab] float32
    tokens_per_s: float  # single-sequence decode, model steps only


@dataclass
class PromptFidelity:
    """One prompt's share: its positions, how many agreed, and where the continuations first part."""

    tokens: int
    agreed: int
    first_divergence: int | None  # position of the first disagreement; None: identical continuation
    kl_mean: float


@dataclass
class Fidelity:
    """A setting's fidelity to the float32 reference over a prompt set (see the module docstring)."""

    model: str
    quantization: str | None
    dtype: str
    prompts: int
    max_tokens: int
    tokens: int  # positions scored, over all prompts
    agreement: float  # fraction of positions where the candidate's argmax is the reference's token
    kl_mean: float  # KL(ref || cand) in nats, mean over positions
    kl_p99: float  # ... its 99th percentile
    sequence_agreement: float  # fraction of prompts whose greedy continuation is identical
    tokens_per_s: float  # the candidate's single-sequence decode, model steps only
    reference_tokens_per_s: float  # the reference's, on the same prompts and tokens, timed alongside
    speedup: float  # median over prompts of reference time / candidate time, each pair timed back to back
    per_prompt: list[PromptFidelity]

    def to_json(self) -> dict:
        return asdict(self)


Progress = Callable[[int, int], None]  # (prompts done, prompts in all), after each prompt


def reference(
    model: str, *, prompts: list[str], max_tokens: int = 32, progress: Progress | None = None
) -> Reference:
    """Greedy continuations of the float32 unquantized model on `prompts` (see Reference)."""
    _check_inputs(prompts, max_tokens)
    with _open(model, None, REFERENCE_DTYPE) as llm:
        ids = [_prompt_ids(llm, p) for p in prompts]
        tokens, logprobs, seconds = [], [], 0.0
        for i, prompt in enumerate(ids):
            toks, lps, s = _decode(llm, prompt, max_tokens)
            tokens.append(toks)
            logprobs.append(lps)
            seconds += s
            if progress is not None:
                progress(i + 1, len(ids))
    return Reference(model, list(prompts), max_tokens, ids, tokens, logprobs, _rate(tokens, seconds))


def measure(
    model: str,
    *,
    quantization: str | None,
    dtype: str = "float32",
    prompts: list[str],
    max_tokens: int = 32,
    reference: Reference | None = None,
    time_reference: bool = True,
    progress: Progress | None = None,
) -> Fidelity:
    """Score `quantization` at `dtype` against the float32 unquantized reference on `prompts`.

    `reference`: one built earlier by `reference()` for the same model, prompts and max_tokens (scoring
    several settings then decodes the reference once); without it, it is built here first (`progress`
    then counts its prompts, then the candidate's). An unknown quantization or dtype, or a pair the
    engine does not run, raises ConfigError before any model is loaded.

    Speed on a busy machine drifts by more than the settings differ, so by default the reference engine
    is loaded again and each prompt's tokens are decoded by both back to back, in alternating order: the
    speedup is the median of those pairs. `time_reference=False` skips that (half the work); the
    reference's speed is then the one measured when it was built, at another time.
    """
    _check_inputs(prompts, max_tokens)
    # Refuse a bad setting before any model loads, and name it as the engine reads it ('none' -> None).
    setting = engine_config(model=model, quantization=quantization, dtype=dtype)
    quantization, dtype = setting.quantization, setting.dtype
    ref = (
        reference
        if reference is not None
        else _reference(model, prompts=prompts, max_tokens=max_tokens, progress=progress)
    )
    if (ref.model, ref.prompts, ref.max_tokens) != (model, list(prompts), max_tokens):
        raise ValueError(
            "the reference was built for another model, prompt set or max_tokens "
            f"({ref.model!r}, {len(ref.prompts)} prompts, max_tokens {ref.max_tokens}); build it with "
            "reference(model, prompts=..., max_tokens=...) for these"
        )
    per_prompt, kls, seconds, ref_seconds, pairs = [], [], 0.0, 0.0, []
    timer = _open(model, None, REFERENCE_DTYPE) if time_reference else nullcontext()
    with _open(model, quantization, dtype) as llm, timer as ref_llm:
        for i in range(len(prompts)):
            if _prompt_ids(llm, prompts[i]) != ref.prompt_ids[i]:
                raise ValueError(f"prompt {i} tokenizes differently for the candidate than for the reference")
            args = (ref.prompt_ids[i], max_tokens, ref.tokens[i])
            # Each pair back to back, who goes first alternating, so a drift in speed falls on both alike.
            if ref_llm is not None and i % 2:
                rs = _decode(ref_llm, *args)[2]
            _, cand, cs = _decode(llm, *args)
            if ref_llm is not None and not i % 2:
                rs = _decode(ref_llm, *args)[2]
            seconds += cs
            if ref_llm is not None:
                ref_seconds += rs
                if cs > 0 and rs > 0:
                    pairs.append(rs / cs)
            kl = kl_divergence(ref.logprobs[i], cand)
            kls.append(kl)
            hits = cand.argmax(-1) == torch.tensor(ref.tokens[i])
            misses = (~hits).nonzero()
            first = int(misses[0]) if len(misses) else None
            per_prompt.append(PromptFidelity(len(hits), int(hits.sum()), first, float(kl.mean())))
            if progress is not None:
                progress(i + 1, len(prompts))
    all_kl = torch.cat(kls).double()
    n = sum(p.tokens for p in per_prompt)
    rate = _rate(ref.tokens, seconds)
    ref_rate = _rate(ref.tokens, ref_seconds) if time_reference else ref.tokens_per_s
    return Fidelity(
        model=model,
        quantization=quantization,
        dtype=dtype,
        prompts=len(prompts),
        max_tokens=max_tokens,
        tokens=n,
        agreement=sum(p.agreed for p in per_prompt) / n,
        kl_mean=float(all_kl.mean()),
        kl_p99=float(torch.quantile(all_kl, 0.99)),
        sequence_agreement=sum(p.first_divergence is None for p in per_prompt) / len(per_prompt),
        tokens_per_s=rate,
        reference_tokens_per_s=ref_rate,
        speedup=statistics.median(pairs) if pairs else (rate / ref_rate if ref_rate else 0.0),
        per_prompt=per_prompt,
    )


_reference = reference  # measure's `reference` argument shadows the function inside it


def kl_divergence(ref_logprobs: torch.Tensor, cand_logprobs: torch.Tensor) -> torch.Tensor:
    """[N, vocab] log-probabilities of each -> [N] KL(ref || cand) in nats: sum p_ref (log p_ref - log p_cand)."""
    kl = F.kl_div(cand_logprobs, ref_logprobs, reduction="none", log_target=True).sum(-1)
    return kl.clamp(min=0.0)  # >= 0 in exact arithmetic; float rounding can leave a -1e-9


def _check_inputs(prompts: list[str], max_tokens: int) -> None:
    if not prompts:
        raise ValueError("no prompts: pass at least one")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1 (got {max_tokens})")


def _open(model: str, quantization: str | None, dtype: str) -> LLM:
    """An engine for one setting, with no prefix cache: _decode takes its KV blocks from the pool
    directly, and the engine runs nothing else meanwhile."""
    return LLM(
        model, quantization=quantization, dtype=dtype, enable_prefix_caching=False, kv_cache_memory="256MiB"
    )


def _prompt_ids(llm: LLM, prompt: str) -> list[int]:
    """A prompt as a user's chat message where the model has a chat template (as it is served), else as text."""
    tok = llm.tokenizer
    if tok.hf.chat_template:
        return tok.apply_chat_template([{"role": "user", "content": prompt}])
    return tok.encode(prompt)


@torch.inference_mode()
def _decode(
    llm: LLM, prompt: list[int], max_tokens: int, forced: list[int] | None = None
) -> tuple[list[int], torch.Tensor, float]:
    """Greedy decoding of one sequence on the engine's runner and paged cache: the prompt in one prefill,
    then one token per step, as a request alone in the engine runs. `forced`: feed these tokens instead
    of the model's own choices (teacher forcing; decodes len(forced) positions).

    -> (tokens, log-probabilities [len(tokens), vocab] float32, seconds spent in decode steps).
    """
    engine = llm.engine
    eos = set(engine.eos_token_ids)
    steps = len(forced) if forced is not None else max_tokens
    total = len(prompt) + steps
    if total > engine.max_model_len:
        raise ValueError(
            f"prompt ({len(prompt)} tokens) + {steps} tokens exceeds max_model_len {engine.max_model_len}"
        )
    pool = engine.kv.pool
    if engine.kv.blocks_for(total) > pool.num_free:
        raise ValueError(f"prompt + continuation ({total} tokens) do not fit the engine's KV cache")
    blocks = [pool.allocate() for _ in range(engine.kv.blocks_for(total))]
    tokens, logprobs, seconds = [], [], 0.0
    try:
        logits = engine.runner.execute([(prompt, 0, len(prompt), blocks)], [0])[0]
        for i in range(steps):
            logprobs.append(torch.log_softmax(logits.float(), -1))
            token = forced[i] if forced is not None else int(logits.argmax())
            tokens.append(token)
            if i + 1 == steps or (forced is None and token in eos):
                break
            start = time.perf_counter()
            logits = engine.runner.execute([([token], len(prompt) + i, 1, blocks)], [0])[0]
            seconds += time.perf_counter() - start
    finally:
        for b in blocks:
            pool.decref(b)
    return tokens, torch.stack(logprobs), seconds


def _rate(tokens: list[list[int]], seconds: float) -> float:
    """Decode steps per second: each continuation's tokens after its first (that one comes from prefill)."""
    steps = sum(len(t) - 1 for t in tokens)
    return steps / seconds if seconds > 0 else 0.0
