"""From logits to the next token of every sampling sequence in the batch.

Order of processing, per row: logit_bias and penalties change the logits; a grammar (structured outputs)
masks the tokens it does not allow; greedy rows take the argmax;
the others are divided by their temperature, filtered by top-k, top-p and min-p, and sampled. Sampling
draws with the exponential-race trick (argmax of p / E, E ~ Exp(1), is a draw from p) so that every
seeded row uses only its own generator: the same seed gives the same text whatever shares the batch.
Logprobs are those of the model's raw distribution, before any of this processing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.engine.sequence import Sequence
from ember.outputs import Logprob


@dataclass
class SampleResult:
    token_ids: list[int]
    # Per row, where logprobs were requested (None elsewhere): the chosen token's entry plus the top
    # alternatives, and the chosen token's logprob.
    logprobs: list[dict[int, Logprob] | None]
    chosen_logprobs: list[float | None]


def sample(
    logits: torch.Tensor,
    seqs: list[Sequence],
    generator: torch.Generator | None = None,
    allowed: torch.Tensor | None = None,
) -> SampleResult:
    """logits [N, vocab] fp32, one row per sequence in `seqs`; `generator` serves rows without a seed;
    `allowed` [N, vocab] bool: the tokens structured outputs permit (None: all)."""
    wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    # The model's raw distribution, only where someone asked for logprobs (a full-vocab pass per row).
    raw_logprobs = torch.log_softmax(logits[wanted], dim=-1) if wanted else None
    raw = logits
    logits = logits.clone()
    apply_bias_and_penalties(logits, seqs)
    if allowed is not None:
        logits.masked_fill_(~allowed, float("-inf"))
        dead = torch.isinf(logits.max(dim=-1).values)
        if bool(dead.any()):
            # Only tokens the other processing banned remain (the grammar allows only EOS while
            # min_tokens forbids it): the grammar wins, as an invalid output helps nobody.
            logits[dead] = raw[dead].masked_fill(~allowed[dead], float("-inf"))

    params = [s.params for s in seqs]
    greedy = torch.tensor([p.greedy for p in params], device=logits.device)
    chosen = logits.argmax(dim=-1)
    if not bool(greedy.all()):
        temps = torch.tensor(
            [p.temperature if p.temperature > 0 else 1.0 for p in params], device=logits.device
        )
        probs = filtered_probs(logits / temps[:, None], params)
        sampled = (probs / _exponential_noise(probs, seqs, generator)).argmax(dim=-1)
        chosen = torch.where(greedy, chosen, sampled)

    token_ids = chosen.tolist()
    result = SampleResult(token_ids, [None] * len(seqs), [None] * len(seqs))
    if wanted:
        entries, lps = logprob_entries(raw_logprobs, token_ids, params, wanted)
        for i, entry, lp in zip(wanted, entries, lps, strict=True):  # back to their rows
            result.logprobs[i] = entry
            result.chosen_logprobs[i] = lp
    return result


def apply_bias_and_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """In place, row i for seqs[i]. A row may be any object with a Sequence's params, request, token_ids,
    output_token_ids and num_output_tokens (speculative decoding scores positions ahead of the sequence)."""
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=logits.device)
            vals = torch.tensor(list(p.logit_bias.values()), device=logits.device, dtype=logits.dtype)
            logits[i].index_add_(0, ids, vals)
        if p.min_tokens and seq.num_output_tokens < p.min_tokens:
            # Stop tokens may not end a sequence before min_tokens; mask them out until then.
            stops = list(p.stop_token_ids) + ([] if p.ignore_eos else seq.request.eos_token_ids)
            if stops:
                logits[i, stops] = float("-inf")
        if not p.uses_penalties:
            continue
        row = logits[i]
        if p.repetition_penalty != 1.0:
            # CTRL-style, as HF and vLLM: over prompt and output, shrink positive logits, grow negative ones.
            seen = torch.tensor(seq.token_ids, device=logits.device).unique()
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            # OpenAI's definition, over the generated tokens only.
            out = torch.tensor(seq.output_token_ids, device=logits.device, dtype=torch.long)
            counts = torch.bincount(out, minlength=row.shape[0])[: row.shape[0]].to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


def filtered_probs(logits: torch.Tensor, params) -> torch.Tensor:
    """logits [N, vocab] already divided by the temperature -> the probabilities sampled from, after
    top-k, top-p and min-p."""
    top_k = [p.top_k for p in params]
    top_p = [p.top_p for p in params]
    min_p = [p.min_p for p in params]
    vocab = logits.shape[-1]
    if any(k for k in top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        k = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=logits.device)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        drop = ranks >= k[:, None]
        # top-p: keep the smallest head of the sorted distribution whose mass reaches p (at least one token).
        sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        thresholds = torch.tensor([p if p < 1.0 else float("inf") for p in top_p], device=logits.device)
        drop |= mass_before >= thresholds[:, None]
        drop[:, 0] = False
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    if any(m > 0 for m in min_p):
        floor = torch.tensor(min_p, device=logits.device)[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < floor, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)  # speculative acceptance compares p with q
    return probs


def _exponential_noise(probs: torch.Tensor, seqs: list[Sequence], generator) -> torch.Tensor:
    noise = torch.empty_like(probs).exponential_(generator=generator)
    for i, seq in enumerate(seqs):
        if seq.generator is not None:
            noise[i] = torch.empty_like(noise[i]).exponential_(generator=seq.generator)
    return noise


def logprob_entries(sub, token_ids, params, wanted) -> tuple[list[dict[int, Logprob]], list[float]]:
    """sub [len(wanted), vocab]: raw logprobs of the rows that asked for them."""
    k_max = max(params[i].logprobs for i in wanted)
    top_vals, top_ids = sub.topk(max(k_max, 1), dim=-1)
    chosen = torch.tensor([token_ids[i] for i in wanted], device=sub.device)
    chosen_lp = sub.gather(1, chosen[:, None])
    # rank 1 = most likely: one more than the number of tokens strictly more likely than the chosen one
    ranks = (sub > chosen_lp).sum(dim=-1) + 1
    chosen_lp = chosen_lp.squeeze(1).tolist()
    entries = []
    for j, i in enumerate(wanted):
        entry = {token_ids[i]: Logprob(chosen_lp[j], int(ranks[j]))}
        for r in range(params[i].logprobs):
            entry.setdefault(int(top_ids[j, r]), Logprob(float(top_vals[j, r]), r + 1))
        entries.append(entry)
    return entries, chosen_lp
