"""Speculative decoding: propose, check every proposal in one pass, keep what the target would have made.

Per step, a running sequence in decode (one pending token d_0) gets up to k proposed tokens d_1..d_k from
a proposer (ember.engine.proposers). The target model scores d_0..d_k as one chunk over the paged KV
cache, which gives k + 1 distributions: p_i predicts the token after d_i. Acceptance goes left to right:

- Greedy: d_{i+1} is kept while it is argmax p_i. The first mismatch is replaced by argmax p_i; if all k
  are kept, argmax p_k is one more token for free. The output is plain greedy decoding, token for token.
- Sampling (Leviathan et al. 2023; Chen et al. 2023): keep d_{i+1} with probability min(1, p_i(d) / q_i(d)),
  q_i being the distribution the proposer drew it from (a point mass for n-gram lookup). At the first
  rejection, draw from the residual max(0, p_i - q_i) / Z; if all are kept, draw from p_k. Every emitted
  token is then distributed exactly as p: P(x) = q(x) min(1, p(x)/q(x)) + (1 - sum_y min(p, q)(y)) *
  max(0, p(x) - q(x)) / Z = min(p, q)(x) + max(0, p - q)(x) = p(x), since Z = 1 - sum_y min(p, q)(y).

p_i is the distribution plain decoding would sample from at that position: bias, penalties and min_tokens
see the kept proposals before it as output. The KV of rejected positions is rolled back: the computed
length stops after the last kept token, and blocks past the sequence's end go back to the pool.

Speculation adapts. Per step, k shrinks as the batch grows, so that running sequences x (1 + k) stays
within `max_batch_tokens`, and is off past it: a large batch keeps the hardware busy already, and
verifying guesses would cost more than they save. Per sequence, one whose recent acceptance rate falls
below `min_acceptance` pauses for a few steps, twice as many at each pause in a row. Sequences under a grammar and seeded sampled ones do not
speculate: a seeded sample must not depend on what shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.config import SpeculativeConfig
from ember.engine.proposers import DraftProposer, NgramProposer, Proposal
from ember.engine.sampler import SamplingBatch, apply_bias_and_penalties, logprob_entries, probabilities
from ember.engine.sequence import Sequence, SequenceAhead
from ember.outputs import Logprob

# Steps a sequence with a low acceptance rate decodes plainly before it proposes again: doubled at each
# pause in a row (a proposer that is never right costs ever less), back to the start once it does well.
_PAUSE_STEPS = 8
_MAX_PAUSE_STEPS = 256


@dataclass
class Verdict:
    tokens: list[int]  # the kept proposals, then one token from the target
    logprobs: list[dict[int, Logprob]] | None  # per token, where the request asked for logprobs
    chosen_logprobs: list[float] | None


class Speculator:
    def __init__(self, config: SpeculativeConfig, proposer: NgramProposer | DraftProposer):
        self.config = config
        self.proposer = proposer
        # Cumulative, as vLLM counts them: proposed, kept, and emitted by speculative steps (kept + 1 each).
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.num_emitted_tokens = 0

    def plan(self, running: list[Sequence]) -> None:
        """Before scheduling: set each running sequence's lookahead (slots for its proposals)."""
        for seq in running:
            seq.num_lookahead = 0
        if not running:
            return
        k = min(self.config.num_speculative_tokens, self.config.max_batch_tokens // len(running) - 1)
        if k < 1:
            return
        for seq in running:
            if not self._eligible(seq):
                continue
            if seq.spec_paused_steps:
                seq.spec_paused_steps -= 1
                continue
            k_seq = min(k, seq.request.max_total_tokens - seq.num_tokens - 1)
            if k_seq > 0:
                seq.num_lookahead = self.proposer.lookahead(seq, k_seq)

    @staticmethod
    def _eligible(seq: Sequence) -> bool:
        return (
            seq.num_tokens - seq.num_computed_tokens == 1
            and (seq.params.n == 1 or seq.request.forked)  # its samples fork off its first sampled token
            and seq.request.grammar is None
            and (seq.generator is None or seq.params.greedy)
        )

    def propose(self, scheduled: dict[Sequence, int]) -> dict[Sequence, Proposal]:
        """After scheduling (slots allocated, block copies done): the proposals, for the sequences that
        were granted lookahead slots and got at least one token."""
        seqs, ks = [], []
        for seq, n in scheduled.items():
            granted = n - (seq.num_tokens - seq.num_computed_tokens)
            if seq.num_lookahead and granted > 0:
                seqs.append(seq)
                ks.append(granted)
        proposals = self.proposer.propose(seqs, ks)
        return {s: p for s, p in zip(seqs, proposals, strict=True) if p.tokens}

    def verify(
        self,
        logits: torch.Tensor,
        seqs: list[Sequence],
        proposals: list[Proposal],
        generator: torch.Generator | None,
    ) -> list[Verdict]:
        """logits [sum(1 + len(proposal.tokens)), vocab]: per sequence, the rows of its pending token and
        of each proposed token, in order."""
        views: list[SequenceAhead] = []
        for seq, prop in zip(seqs, proposals, strict=True):
            views += [SequenceAhead(seq, prop.tokens[:j]) for j in range(len(prop.tokens) + 1)]
        processed = logits.clone()
        batch = SamplingBatch.build(views, logits.shape[-1], logits.device)
        apply_bias_and_penalties(processed, batch)
        best = processed.argmax(dim=-1).tolist()
        sampled = [r for r, v in enumerate(views) if not v.params.greedy]
        probs = torch.empty(0)
        if sampled:
            probs = torch.zeros_like(processed)
            probs[sampled] = probabilities(processed[sampled], batch.take(sampled))

        verdicts, start = [], 0
        for seq, prop in zip(seqs, proposals, strict=True):
            k = len(prop.tokens)
            if seq.params.greedy:
                kept = 0
                while kept < k and best[start + kept] == prop.tokens[kept]:
                    kept += 1
                last = best[start + kept]
            else:
                kept, last = self._accept_sampled(probs[start : start + k + 1], prop, generator)
            tokens = prop.tokens[:kept] + [last]
            verdicts.append(self._verdict(logits[start : start + kept + 1], seq, tokens))
            self._learn(seq, kept, k)
            start += k + 1
        return verdicts

    @staticmethod
    def _accept_sampled(p: torch.Tensor, prop: Proposal, generator) -> tuple[int, int]:
        """p [k + 1, vocab]: the target's distributions. -> (proposals kept, the token after them)."""
        k = len(prop.tokens)
        d = torch.tensor(prop.tokens, device=p.device)
        at = torch.arange(k, device=p.device)
        p_d = p[at, d]
        q_d = torch.ones_like(p_d) if prop.q is None else prop.q[at, d]
        u = torch.rand(k, generator=generator, device=p.device)
        rejected = (u * q_d >= p_d).nonzero()  # kept with probability min(1, p / q)
        if rejected.numel() == 0:
            return k, int(torch.multinomial(p[k], 1, generator=generator))
        kept = int(rejected[0])
        if prop.q is None:
            residual = p[kept].clone()
            residual[d[kept]] = 0.0  # p - q for a point mass q, clipped at 0
        else:
            residual = (p[kept] - prop.q[kept]).clamp_(min=0.0)
        if not float(residual.sum()) > 0.0:  # p == q up to rounding: a rejection had no probability
            residual = p[kept]
        return kept, int(torch.multinomial(residual, 1, generator=generator))

    @staticmethod
    def _verdict(raw: torch.Tensor, seq: Sequence, tokens: list[int]) -> Verdict:
        """raw [len(tokens), vocab]: the target's logits at each emitted token's position."""
        p = seq.params
        if p.logprobs is None:
            return Verdict(tokens, None, None)
        rows = list(range(len(tokens)))
        entries, chosen = logprob_entries(
            torch.log_softmax(raw, dim=-1), tokens, [p.logprobs] * len(tokens), rows
        )
        return Verdict(tokens, entries, chosen)

    def _learn(self, seq: Sequence, kept: int, proposed: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += kept
        seq.spec_acceptance = 0.5 * seq.spec_acceptance + 0.5 * kept / proposed
        floor = self.config.min_acceptance
        if seq.spec_acceptance < floor:
            seq.spec_paused_steps = min(_PAUSE_STEPS << seq.spec_num_pauses, _MAX_PAUSE_STEPS)
            seq.spec_num_pauses += 1
            seq.spec_acceptance = 1.5 * floor  # after the pause, one more miss pauses it again
        elif seq.spec_acceptance >= 0.5:
            seq.spec_num_pauses = 0
