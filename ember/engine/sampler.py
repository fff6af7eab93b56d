"""From logits to the next token of every sampling row in the batch, on tensors.

The engine describes a step's rows once as a `SamplingBatch` (temperatures, top-k/p, min-p, seeds,
bias and penalties as tensors); the functions here read nothing else. Order of processing, per row:
logit_bias and penalties change the logits; a grammar (structured outputs) masks the tokens it does not
allow; greedy rows take the argmax; the others are divided by their temperature, filtered by top-k,
top-p and min-p, and sampled. Sampling draws with the exponential-race trick (argmax of p / E,
E ~ Exp(1), is a draw from p) so that every seeded row uses only its own generator: the same seed gives
the same text whatever shares the batch. Logprobs are those of the model's raw distribution, before any
of this processing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from ember.outputs import Logprob


@dataclass
class SampleResult:
    token_ids: list[int]
    # Per row, where logprobs were requested (None elsewhere): the chosen token's entry plus the top
    # alternatives, and the chosen token's logprob.
    logprobs: list[dict[int, Logprob] | None]
    chosen_logprobs: list[float | None]


@dataclass
class SamplingBatch:
    """A step's sampling parameters, one row per logits row. Each optional part is None when no row
    uses it, so plain greedy rows cost nothing to process."""

    greedy: torch.Tensor  # [N] bool
    all_greedy: bool
    temperature: torch.Tensor  # [N] float, 1.0 on greedy rows
    top_k: torch.Tensor | None  # [N] long, the vocabulary size where off
    top_p: torch.Tensor | None  # [N] float, inf where off
    min_p: torch.Tensor | None  # [N] float, 0 where off
    generators: list[torch.Generator | None]  # per row: its own seeded generator, or None
    num_logprobs: list[int | None]  # per row: alternatives wanted (None: no logprobs)
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (rows, token ids, values)
    banned: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids): stop tokens before min_tokens
    repetition: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (rows, penalties, seen [R, vocab])
    counts: (
        tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None
    )  # (rows, freq, pres, [R, vocab])

    @classmethod
    def build(cls, rows: list[Any], vocab: int, device: torch.device | str = "cpu") -> SamplingBatch:
        """`rows`: anything with a Sequence's params, generator, token_ids, output_token_ids,
        num_output_tokens and request.eos_token_ids (speculative decoding scores positions ahead of a
        sequence through SequenceAhead views)."""
        params = [r.params for r in rows]
        greedy = [p.greedy for p in params]

        def t(values, dtype=torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        top_k = top_p = min_p = None
        if any(p.top_k or p.top_p < 1.0 for p in params):
            top_k = t([p.top_k if 0 < p.top_k < vocab else vocab for p in params], torch.long)
            top_p = t([p.top_p if p.top_p < 1.0 else float("inf") for p in params])
        if any(p.min_p > 0 for p in params):
            min_p = t([p.min_p for p in params])
        bias, banned, rep, cnt = ([], [], []), ([], []), ([], [], []), ([], [], [], [])
        for i, (row, p) in enumerate(zip(rows, params, strict=True)):
            if p.logit_bias:
                bias[0].extend([i] * len(p.logit_bias))
                bias[1].extend(p.logit_bias)
                bias[2].extend(p.logit_bias.values())
            if p.min_tokens and row.num_output_tokens < p.min_tokens:
                stops = list(p.stop_token_ids) + ([] if p.ignore_eos else list(row.request.eos_token_ids))
                banned[0].extend([i] * len(stops))
                banned[1].extend(stops)
            if p.repetition_penalty != 1.0:
                rep[0].append(i)
                rep[1].append(p.repetition_penalty)
                rep[2].append(row.token_ids)
            if p.presence_penalty or p.frequency_penalty:
                cnt[0].append(i)
                cnt[1].append(p.frequency_penalty)
                cnt[2].append(p.presence_penalty)
                cnt[3].append(row.output_token_ids)
        repetition = counts = None
        if rep[0]:
            # CTRL-style, as HF and vLLM: over prompt and output.
            seen = torch.zeros(len(rep[0]), vocab, dtype=torch.bool, device=device)
            for j, ids in enumerate(rep[2]):
                seen[j, t(ids, torch.long)] = True
            repetition = (t(rep[0], torch.long), t(rep[1]), seen)
        if cnt[0]:
            # OpenAI's definition, over the generated tokens only.
            hist = torch.stack(
                [torch.bincount(t(ids, torch.long), minlength=vocab)[:vocab] for ids in cnt[3]]
            )
            counts = (t(cnt[0], torch.long), t(cnt[1]), t(cnt[2]), hist)
        return cls(
            greedy=t(greedy, torch.bool),
            all_greedy=all(greedy),
            temperature=t([1.0 if g else p.temperature for g, p in zip(greedy, params, strict=True)]),
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            generators=[getattr(r, "generator", None) for r in rows],
            num_logprobs=[p.logprobs for p in params],
            bias=(t(bias[0], torch.long), t(bias[1], torch.long), t(bias[2])) if bias[0] else None,
            banned=(t(banned[0], torch.long), t(banned[1], torch.long)) if banned[0] else None,
            repetition=repetition,
            counts=counts,
        )

    def take(self, rows: list[int]) -> SamplingBatch:
        """The filtering part of these rows (bias and penalties are applied before rows are taken)."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.greedy.device)
        greedy = self.greedy[idx]
        return replace(
            self,
            greedy=greedy,
            all_greedy=bool(greedy.all()),
            temperature=self.temperature[idx],
            top_k=None if self.top_k is None else self.top_k[idx],
            top_p=None if self.top_p is None else self.top_p[idx],
            min_p=None if self.min_p is None else self.min_p[idx],
            generators=[self.generators[r] for r in rows],
            num_logprobs=[self.num_logprobs[r] for r in rows],
            bias=None,
            banned=None,
            repetition=None,
            counts=None,
        )


def sample(
    logits: torch.Tensor,
    batch: SamplingBatch,
    generator: torch.Generator | None = None,
    allowed: torch.Tensor | None = None,
) -> SampleResult:
    """logits [N, vocab] fp32; `generator` serves rows without a seed; `allowed` [N, vocab] bool: the
    tokens structured outputs permit (None: all)."""
    wanted = [i for i, k in enumerate(batch.num_logprobs) if k is not None]
    # The model's raw distribution, only where someone asked for logprobs (a full-vocab pass per row).
    raw_logprobs = torch.log_softmax(logits[wanted], dim=-1) if wanted else None
    raw = logits
    logits = logits.clone()
    apply_bias_and_penalties(logits, batch)
    if allowed is not None:
        logits.masked_fill_(~allowed, float("-inf"))
        dead = torch.isinf(logits.max(dim=-1).values)
        if bool(dead.any()):
            # Only tokens the other processing banned remain (the grammar allows only EOS while
            # min_tokens forbids it): the grammar wins, as an invalid output helps nobody.
            logits[dead] = raw[dead].masked_fill(~allowed[dead], float("-inf"))
    chosen = logits.argmax(dim=-1)
    if not batch.all_greedy:
        probs = probabilities(logits, batch)
        sampled = (probs / _exponential_noise(probs, batch, generator)).argmax(dim=-1)
        chosen = torch.where(batch.greedy, chosen, sampled)
    token_ids = chosen.tolist()
    result = SampleResult(token_ids, [None] * len(token_ids), [None] * len(token_ids))
    if wanted:
        entries, lps = logprob_entries(raw_logprobs, token_ids, batch.num_logprobs, wanted)
        for i, entry, lp in zip(wanted, entries, lps, strict=True):  # back to their rows
            result.logprobs[i] = entry
            result.chosen_logprobs[i] = lp
    return result


def apply_bias_and_penalties(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """In place, on logits [N, vocab]."""
    if batch.bias is not None:
        rows, ids, vals = batch.bias
        logits.index_put_((rows, ids), vals.to(logits.dtype), accumulate=True)
    if batch.banned is not None:
        logits[batch.banned] = float("-inf")
    if batch.repetition is not None:
        # Shrink positive logits, grow negative ones, where the token was seen.
        rows, penalty, seen = batch.repetition
        sub = logits[rows]
        pen = penalty[:, None].to(sub.dtype)
        logits[rows] = torch.where(seen, torch.where(sub > 0, sub / pen, sub * pen), sub)
    if batch.counts is not None:
        rows, freq, pres, hist = batch.counts
        hist = hist.to(logits.dtype)
        logits[rows] -= freq[:, None] * hist + pres[:, None] * (hist > 0).to(logits.dtype)


def probabilities(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Processed logits [N, vocab] -> the distributions the rows sample from: divided by the
    temperature, then filtered (the one place sampling, verification and drafting temper and filter)."""
    return filtered_probs(logits / batch.temperature[:, None], batch)


def filtered_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logits [N, vocab] already divided by the temperature -> probabilities after top-k, top-p and
    min-p."""
    if batch.top_k is not None:
        vocab = logits.shape[-1]
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        drop = ranks >= batch.top_k[:, None]
        # top-p: keep the smallest head of the sorted distribution whose mass reaches p (at least one token).
        sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop |= mass_before >= batch.top_p[:, None]
        drop[:, 0] = False
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    if batch.min_p is not None:
        floor = batch.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < floor, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)  # speculative acceptance compares p with q
    return probs


def _exponential_noise(probs: torch.Tensor, batch: SamplingBatch, generator) -> torch.Tensor:
    noise = torch.empty_like(probs).exponential_(generator=generator)
    for i, g in enumerate(batch.generators):
        if g is not None:
            noise[i] = torch.empty_like(noise[i]).exponential_(generator=g)
    return noise


def logprob_entries(
    sub: torch.Tensor, token_ids: list[int], num_logprobs: list[int | None], wanted: list[int]
) -> tuple[list[dict[int, Logprob]], list[float]]:
    """sub [len(wanted), vocab]: raw logprobs of the rows that asked for them."""
    k_max = max(num_logprobs[i] for i in wanted)
    top_vals, top_ids = sub.topk(max(k_max, 1), dim=-1)
    chosen = torch.tensor([token_ids[i] for i in wanted], device=sub.device)
    chosen_lp = sub.gather(1, chosen[:, None])
    # rank 1 = most likely: one more than the number of tokens strictly more likely than the chosen one
    ranks = (sub > chosen_lp).sum(dim=-1) + 1
    chosen_lp = chosen_lp.squeeze(1).tolist()
    entries = []
    for j, i in enumerate(wanted):
        entry = {token_ids[i]: Logprob(chosen_lp[j], int(ranks[j]))}
        for r in range(num_logprobs[i]):
            entry.setdefault(int(top_ids[j, r]), Logprob(float(top_vals[j, r]), r + 1))
        entries.append(entry)
    return entries, chosen_lp
