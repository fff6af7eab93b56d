"""Proposers for speculative decoding: cheap guesses at a sequence's next tokens.

A proposer is asked twice per step. Before scheduling, `lookahead(seq, k)` says how many slots to reserve
for the sequence's guesses (at most k); after scheduling, with those slots allocated and the step's
copy-on-write copies done (`copy_blocks`, for a proposer with a KV cache of its own), `propose(seqs, ks)` returns a Proposal of at most ks[i] tokens per sequence.
Verification (ember.engine.speculative) needs only the tokens and, where the proposer sampled them, the
distributions it sampled from; so a trained head (EAGLE or Medusa style) fits behind the same two calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from ember.engine.model_runner import ModelRunner
from ember.engine.sampler import SamplingBatch, apply_bias_and_penalties, probabilities
from ember.engine.sequence import Sequence, SequenceAhead
from ember.engine.work import Work, decodes_first
from ember.models.llama import LlamaForCausalLM

# The most tokens of a sequence the draft model catches up on in one step.
_CATCH_UP_TOKENS = 128


@dataclass
class Proposal:
    tokens: list[int]
    # [len(tokens), vocab]: the distribution each token was drawn from; None where the proposer chose
    # deterministically (a point mass on the token), as n-gram lookup and greedy drafting do.
    q: torch.Tensor | None = None


class NgramProposer:
    """Prompt lookup: find the last n tokens earlier in the sequence (prompt or output, the most recent
    occurrence, longest n first) and propose the tokens that followed them. Free, and right whenever the
    output copies its input: edits, summaries, code changes, extraction."""

    def __init__(self, ngram_max: int, ngram_min: int):
        self.ngram_max = ngram_max
        self.ngram_min = ngram_min
        self._found: dict[Sequence, list[int]] = {}

    def lookahead(self, seq: Sequence, k: int) -> int:
        tokens = self.lookup(seq.token_ids, k)
        if tokens:
            self._found[seq] = tokens
        return len(tokens)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        pass  # no KV of its own

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Proposal]:
        found, self._found = self._found, {}
        return [Proposal(found.get(seq, [])[:k]) for seq, k in zip(seqs, ks, strict=True)]

    def lookup(self, token_ids: list[int], k: int) -> list[int]:
        n_tokens = len(token_ids)
        if n_tokens < self.ngram_min + 1:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.ngram_max, n_tokens - 1), self.ngram_min - 1, -1):
            # Windows start at 0 .. n_tokens - 1 - n: each match has a token after it, and the suffix
            # itself is not a match.
            windows = sliding_window_view(tokens[:-1], n)
            starts = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if starts.size:
                at = int(starts[-1]) + n
                return token_ids[at : at + k]
        return []


class DraftProposer:
    """A smaller model with the target's tokenizer drafts k tokens, one forward pass each.

    Its KV lives in tensors of its own but is paged by the target's block tables (same block size and
    count), so allocation, copy-on-write, rollback and freeing all follow the target's with no second
    allocator. `Sequence.num_draft_computed` counts the positions whose draft KV is valid; each step the
    draft first catches up on what the target accepted (the whole prompt, the first time), then drafts.
    The draft has no LoRA adapters: for an adapter's requests it proposes the base model's guesses, which
    verification then judges like any others.
    """

    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, device: torch.device):
        self.runner = ModelRunner(model, num_blocks, block_size, device)
        self.generator: torch.Generator | None = None  # the engine's, for sampled drafts

    def lookahead(self, seq: Sequence, k: int) -> int:
        return k

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        self.runner.copy_blocks(copies)

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Proposal]:
        ks = list(ks)
        drafted: list[list[int]] = [[] for _ in seqs]
        dists: list[list[torch.Tensor]] = [[] for _ in seqs]
        # Pass 0 catches each sequence up to its pending token and drafts the first guess. One far behind
        # (its whole prompt, the first time) advances at most _CATCH_UP_TOKENS a step and proposes
        # nothing until it is there, so a long prompt never stalls a step.
        entries, first = [], []
        for i, seq in enumerate(seqs):
            if not ks[i]:
                continue
            start = seq.num_draft_computed
            n = min(seq.num_tokens - start, _CATCH_UP_TOKENS)
            done = start + n == seq.num_tokens
            entries.append((Work.of(seq.token_ids, start, n, seq.block_table), done))
            if done:
                first.append(i)
            else:
                seq.num_draft_computed = start + n
                ks[i] = 0
        if entries:
            self._draft(self._run(entries), first, seqs, drafted, dists)
        # Passes 1 .. k-1 feed back the last guess, one token per sequence.
        for j in range(1, max(ks, default=0)):
            active = [i for i, k in enumerate(ks) if k > j]
            entries = []
            for i in active:
                tokens = seqs[i].token_ids + drafted[i]
                entries.append((Work.of(tokens, len(tokens) - 1, 1, seqs[i].block_table), True))
            self._draft(self._run(entries), active, seqs, drafted, dists)
        for seq, k in zip(seqs, ks, strict=True):
            if k:
                seq.num_draft_computed = seq.num_tokens + k - 1  # the last guess was never fed back
        return [
            Proposal(tokens, torch.stack(q) if q else None) for tokens, q in zip(drafted, dists, strict=True)
        ]

    def _run(self, entries: list[tuple[Work, bool]]) -> torch.Tensor:
        """entries: (work item, wants logits). -> logits of the entries that want them, in entry order."""
        order = decodes_first([work for work, _ in entries])
        wanted = [r for r in order if entries[r][1]]
        rows = [pos for pos, r in enumerate(order) if entries[r][1]]
        logits = self.runner.execute([entries[r][0] for r in order], rows)
        return logits[sorted(range(len(wanted)), key=lambda x: wanted[x])]

    def _draft(self, logits, rows: list[int], seqs, drafted, dists) -> None:
        chosen = self._choose(logits, [SequenceAhead(seqs[i], drafted[i]) for i in rows])
        for (token, q), i in zip(chosen, rows, strict=True):
            drafted[i].append(token)
            if q is not None:
                dists[i].append(q)

    def _choose(
        self, logits: torch.Tensor, seqs: list[SequenceAhead]
    ) -> list[tuple[int, torch.Tensor | None]]:
        """The draft's token per row, after the request's bias and penalties (guessing as the target
        will choose): the argmax for greedy requests, else a draw from the draft's own tempered, filtered
        distribution, which is returned as verification needs it."""
        batch = SamplingBatch.build(seqs, logits.shape[-1], logits.device)
        apply_bias_and_penalties(logits, batch)
        out: list[tuple[int, torch.Tensor | None]] = [(t, None) for t in logits.argmax(dim=-1).tolist()]
        sampled = [r for r, s in enumerate(seqs) if not s.params.greedy]
        if sampled:
            q = probabilities(logits[sampled], batch.take(sampled))
            tokens = torch.multinomial(q, 1, generator=self.generator).squeeze(1).tolist()
            for j, r in enumerate(sampled):
                out[r] = (tokens[j], q[j])
        return out
