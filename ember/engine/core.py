"""The engine core: admit requests, schedule a step, run the model, sample, report what each sample gained.

`step()` is one iteration of continuous batching over token ids: schedule -> execute -> update. It is
synchronous and single-threaded and knows no text: clients (ember.engine.llm_engine in process,
ember.engine.async_engine on a thread or in a process) validate prompts and detokenize on their side,
around the same core.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ember.config import EngineConfig
from ember.engine.kv_cache import KVCacheManager, root_hash
from ember.engine.messages import CoreStats, EngineInfo, RequestUpdate, SampleUpdate
from ember.engine.model_runner import ModelRunner
from ember.engine.proposers import DraftProposer, NgramProposer, Proposal
from ember.engine.sampler import SamplingBatch, sample
from ember.engine.scheduler import Scheduler
from ember.engine.sequence import Request, Sequence
from ember.engine.speculative import Speculator, Verdict
from ember.engine.structured import GrammarCompiler, allowed_tokens, bitmask_words
from ember.engine.work import Work, decodes_first
from ember.errors import InvalidRequest
from ember.lora.adapter import AdapterError
from ember.lora.manager import LoRAManager
from ember.models.catalog import resolve_model
from ember.models.config import ModelConfig
from ember.models.loader import load_model
from ember.models.lora import enable_lora
from ember.outputs import Logprob
from ember.sampling_params import SamplingParams
from ember.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class EngineCore:
    """Token ids in, per-step deltas out (`RequestUpdate`): what every engine client drives."""

    def __init__(self, config: EngineConfig):
        self.config = config
        if config.auto_choice is not None:
            c = config.auto_choice
            log.info("auto: quantization %s, dtype %s: %s", c.quantization or "none", c.dtype, c.reason)
        path = resolve_model(config.model)
        self.tokenizer = Tokenizer.from_dir(path, chat_template=config.chat_template)
        self.device = torch.device(config.device)
        self.model_config = ModelConfig.from_dir(path)
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        self.model = load_model(
            path, self.model_config, config.torch_dtype, self.device, self.max_model_len, config.quantization
        )
        self.eos_token_ids = self.model_config.eos_token_ids or [self.tokenizer.eos_token_id]
        cache = config.cache
        per_block = ModelRunner.bytes_per_block(
            self.model_config, cache.block_size, config.torch_dtype, self.model.backend
        )
        draft = self._draft_source() if config.speculative.method == "draft" else None
        if draft is not None:  # the draft's KV blocks mirror the target's, within the same budget
            per_block += ModelRunner.bytes_per_block(
                draft[1], cache.block_size, config.torch_dtype, self.model.backend
            )
        num_blocks = cache.num_blocks or max(1, cache.kv_budget(self.device) // per_block)
        log.info(
            "KV cache: %d blocks of %d tokens (%.0f MiB%s)",
            num_blocks,
            cache.block_size,
            num_blocks * per_block / 2**20,
            ", the draft model's included" if draft is not None else "",
        )
        self.kv = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.lora: LoRAManager | None = None
        if config.lora.enabled:
            lc = config.lora
            enable_lora(self.model, lc.max_loras, lc.max_rank)
            self.lora = LoRAManager(self.model, self.model_config, lc.max_loras, lc.max_rank, lc.max_adapters)
        self.runner = ModelRunner(self.model, num_blocks, cache.block_size, self.device)
        if self.runner.backend.name == "cuda" and not config.enforce_eager:
            self.runner.enable_decode_graphs(config.scheduler.max_num_seqs, self.max_model_len)
        self.scheduler = Scheduler(config.scheduler, self.kv, self.lora)
        self.requests: dict[str, Request] = {}
        self._grammars: GrammarCompiler | None = None  # made on first use
        self._awaiting_grammar: dict[str, Request] = {}  # requests whose grammar is compiling
        self.last_step_idle = False  # the last step had nothing to schedule
        # Draws for requests without a seed of their own: reproducible per engine seed.
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.speculator = self._speculator(num_blocks, draft) if config.speculative.method else None

    def _draft_source(self) -> tuple[Path, ModelConfig]:
        """Where the draft model comes from and its config (truncated as asked), checked against the target."""
        sc = self.config.speculative
        path = resolve_model(sc.draft_model)
        cfg = ModelConfig.from_dir(path)
        if sc.draft_num_layers is not None:
            if sc.draft_num_layers > cfg.num_hidden_layers:
                raise ValueError(
                    f"draft_num_layers is {sc.draft_num_layers}; the draft model has {cfg.num_hidden_layers}"
                )
            cfg = dataclasses.replace(cfg, num_hidden_layers=sc.draft_num_layers)
        if Tokenizer.from_dir(path).hf.get_vocab() != self.tokenizer.hf.get_vocab():
            raise ValueError(f"the draft model '{sc.draft_model}' has another tokenizer than the target")
        if cfg.vocab_size != self.model_config.vocab_size:
            raise ValueError(
                f"the draft model's vocabulary has {cfg.vocab_size} rows, the target's "
                f"{self.model_config.vocab_size}"
            )
        return path, cfg

    def _speculator(self, num_blocks: int, draft: tuple[Path, ModelConfig] | None) -> Speculator:
        sc = self.config.speculative
        if draft is None:
            return Speculator(sc, NgramProposer(sc.ngram_max, sc.ngram_min))
        path, cfg = draft
        model = load_model(
            path, cfg, self.config.torch_dtype, self.device, self.max_model_len, self.config.quantization
        )
        log.info("draft model %s: %d layers", sc.draft_model, cfg.num_hidden_layers)
        proposer = DraftProposer(model, num_blocks, self.kv.block_size, self.device)
        proposer.generator = self.generator
        return Speculator(sc, proposer)

    # -- requests -----------------------------------------------------------------------------------

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(
            self.max_model_len,
            self.model_config.vocab_size,
            self.kv.pool.num_blocks,
            self.kv.block_size,
            self.lora is not None,
            list(self.eos_token_ids),
        )

    def add_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        *,
        prompt: str | None = None,
        cache_salt: bytes | None = None,
        max_cached_tokens: int | None = None,
        lora: str | None = None,
    ) -> Request:
        """Admit a prompt the client's InputProcessor has checked. `cache_salt` names the prefix-cache
        namespace: requests share cached KV only under the same salt (the server derives it from the API
        key). `max_cached_tokens` caps how many prompt tokens may come from the cache; 0 keeps the
        request out of the cache entirely (no reads, no writes). `lora` names a loaded adapter (see
        add_lora). `prompt` is the text the ids came from, kept for the outputs."""
        adapter = None
        if lora is not None:
            if self.lora is None:
                raise InvalidRequest(
                    "this engine serves no LoRA adapters (enable them in LoRAConfig)", param="model"
                )
            self.lora.check(lora)
            adapter = self.lora.adapters[lora]
        if max_cached_tokens is not None and max_cached_tokens < 0:
            raise InvalidRequest(
                f"prompt_cache_max_len must be >= 0 (got {max_cached_tokens})", param="prompt_cache_max_len"
            )
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.requests:
            raise InvalidRequest(f"request id '{request_id}' is already in use", param="request_id")
        ids = list(prompt_ids)
        # Without max_tokens a request may run to the context's end, or to what the pool can hold alone.
        max_tokens = params.max_tokens or min(self.max_model_len, self._pool_tokens) - len(ids)
        request = Request(
            request_id, prompt, ids, params, len(ids) + max_tokens, eos_token_ids=self.eos_token_ids
        )
        request.lora = lora
        if max_cached_tokens != 0:
            # Never shared across adapters: the root takes the adapter's identity (a re-added name is new).
            request.cache_root = root_hash(cache_salt, None if adapter is None else adapter.uid)
            request.max_cached_tokens = max_cached_tokens
        if params.structured is not None:
            self._constrain(request)  # raises at once for a grammar known to be bad
        request.seqs.append(self._new_sequence(request, 0))
        self.requests[request_id] = request
        self.scheduler.add(request.seqs[0])
        if request.grammar_pending:
            self._awaiting_grammar[request_id] = request
        return request

    # -- structured outputs -------------------------------------------------------------------------

    @property
    def grammars(self) -> GrammarCompiler:
        if self._grammars is None:
            self._grammars = GrammarCompiler(
                self.tokenizer.hf, self.model_config.vocab_size, self.eos_token_ids
            )
        return self._grammars

    def _constrain(self, request: Request) -> None:
        future = self.grammars.submit(request.params.structured.grammar_text())
        request.grammar = future
        if future.done():  # cached: ready (or refused) now
            request.grammar_template = future.result()

    def poll_grammars(self) -> list[tuple[Request, InvalidRequest | None]]:
        """Requests whose grammar finished compiling since the last call, each with its error (None when
        it compiled). A refused request is dropped from the engine, and nothing of it was computed."""
        resolved = []
        for rid, request in list(self._awaiting_grammar.items()):
            if not request.grammar.done():
                continue
            del self._awaiting_grammar[rid]
            error = request.grammar.exception()
            if error is None:
                request.grammar_template = request.grammar.result()
            elif not isinstance(error, InvalidRequest):
                log.error("compiling a grammar failed: %r", error)
                error = InvalidRequest(
                    f"the grammar could not be compiled: {error!r}", param="response_format"
                )
            if error is not None and self.requests.pop(rid, None) is not None:
                for seq in request.seqs:
                    self.scheduler.finish(seq)
            resolved.append((request, error))
        return resolved

    def wait_for_grammars(self, timeout: float) -> None:
        """Sleep until some pending grammar is compiled, or `timeout` seconds (for loops with nothing else to do)."""
        pending = [r.grammar for r in self._awaiting_grammar.values()]
        if pending:
            concurrent.futures.wait(pending, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)

    @property
    def _pool_tokens(self) -> int:
        return self.kv.pool.num_blocks * self.kv.block_size

    def _new_sequence(self, request: Request, index: int) -> Sequence:
        p = request.params
        generator = None
        if p.seed is not None:
            # Sample i of a seeded request has a seed of its own, derived from the request's.
            generator = torch.Generator(device=self.device)
            generator.manual_seed((p.seed * 1_000_003 + index) % 2**63)
        return Sequence(
            request,
            index,
            list(request.prompt_token_ids),
            generator,
            logprobs=[] if p.logprobs is not None else None,
        )

    # -- adapters -----------------------------------------------------------------------------------

    def add_lora(self, name: str, path: str) -> None:
        """Register a PEFT LoRA adapter under `name` (checked now; AdapterError says what is wrong)."""
        if self.lora is None:
            raise InvalidRequest("this engine serves no LoRA adapters (enable them in LoRAConfig)")
        self.lora.add(name, path)

    def remove_lora(self, name: str) -> None:
        """Unregister an adapter; refused (AdapterError) while requests use it, running or waiting.
        KeyError if unknown."""
        if self.lora is None:
            raise KeyError(name)
        users = sum(1 for r in self.requests.values() if r.lora == name)
        if users and name in self.lora.adapters:
            raise AdapterError(f"adapter '{name}' is in use by {users} unfinished requests")
        self.lora.remove(name)

    def abort_request(self, request_id: str) -> RequestUpdate | None:
        request = self.requests.pop(request_id, None)
        self._awaiting_grammar.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"
        return self._request_update(request, aborted=True)

    def finish_sequence(self, request_id: str, index: int, stop_reason: str | None = None) -> None:
        """End one sample early with finish_reason "stop" (a caller matched a stop string in its text)."""
        request = self.requests.get(request_id)
        if request is None:
            return
        for seq in request.seqs:
            if seq.index == index and not seq.finished:
                self._finish(seq, "stop", stop_reason)
        if request.finished:
            del self.requests[request_id]

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- the step: schedule -> execute -> update ---------------------------------------------------

    def step(self) -> list[RequestUpdate]:
        """One iteration of continuous batching; what each touched request gained."""
        plan = self._schedule()
        if plan is None:
            return []
        start = time.perf_counter()
        logits = self.runner.execute(plan.work, plan.sample_rows, plan.lora_slots, plan.num_logits)
        updates = self._update(plan, logits)
        self.scheduler.observe(sum(w.num_new for w in plan.work), time.perf_counter() - start)
        return updates

    def _schedule(self) -> StepPlan | None:
        if self.speculator is not None:
            self.speculator.plan(self.scheduler.running)
        sched = self.scheduler.schedule()
        self.last_step_idle = sched.empty
        if sched.empty:
            return None
        now = time.monotonic()
        for seq in sched.num_scheduled:
            if seq.request.first_scheduled_time is None:
                seq.request.first_scheduled_time = now
        copies = self.kv.take_copies()
        self.runner.copy_blocks(copies)
        proposals: dict[Sequence, Proposal] = {}
        if self.speculator is not None:
            self.speculator.proposer.copy_blocks(copies)  # the draft's KV follows copy-on-write
            proposals = self.speculator.propose(sched.num_scheduled)
        return StepPlan.build(sched.num_scheduled, proposals)

    def _update(self, plan: StepPlan, logits: torch.Tensor) -> list[RequestUpdate]:
        for seq, work in zip(plan.seqs, plan.work, strict=True):
            if seq not in plan.proposals:  # verified sequences commit what they keep, below
                seq.num_computed_tokens += work.num_new
                self.kv.commit(seq)
        touched: dict[str, Request] = {}
        rows, seqs = [], []
        for row, seq in zip(plan.plain_rows, plan.to_sample, strict=True):
            group = [seq]
            if seq.params.n > 1 and not seq.request.forked:
                group += self._fork(seq)
            rows += [row] * len(group)
            seqs += group
        if seqs:
            picked = logits[torch.tensor(rows, device=logits.device)]
            vocab = picked.shape[-1]
            batch = SamplingBatch.build(seqs, vocab, picked.device)
            result = sample(picked, batch, self.generator, self._grammar_masks(seqs, vocab))
            for i, seq in enumerate(seqs):
                self._append_token(seq, result.token_ids[i], result.logprobs[i])
                touched[seq.request.request_id] = seq.request
        if plan.to_verify:
            verdicts = self.speculator.verify(
                logits[torch.tensor(plan.verify_rows, device=logits.device)],
                plan.to_verify,
                [plan.proposals[s] for s in plan.to_verify],
                self.generator,
            )
            for seq, verdict in zip(plan.to_verify, verdicts, strict=True):
                self._keep(seq, verdict)
                touched[seq.request.request_id] = seq.request
        updates = [self._request_update(r) for r in touched.values()]
        for r in touched.values():
            if r.finished:
                del self.requests[r.request_id]
        return updates

    def _keep(self, seq: Sequence, verdict: Verdict) -> None:
        """After verification: the KV of the pending token and the kept proposals stays, the rest is
        rolled back; then the kept tokens and the target's own next token are appended one by one (any
        of them may end the sequence)."""
        length, kept = seq.num_tokens, len(verdict.tokens) - 1
        seq.token_ids.extend(verdict.tokens[:kept])  # for the prefix cache's block hashes
        seq.num_computed_tokens = length + kept
        self.kv.commit(seq)
        del seq.token_ids[length:]
        seq.num_draft_computed = min(seq.num_draft_computed, seq.num_computed_tokens)
        for i, token in enumerate(verdict.tokens):
            self._append_token(seq, token, None if verdict.logprobs is None else verdict.logprobs[i])
            self.speculator.num_emitted_tokens += 1
            if seq.finished:
                return
        self.kv.trim(seq)

    def _grammar_masks(self, seqs: list[Sequence], width: int) -> torch.Tensor | None:
        """[len(seqs), width] bool: the tokens each row's grammar allows (all, for rows without one)."""
        rows = [i for i, s in enumerate(seqs) if s.request.grammar_template is not None]
        if not rows:
            return None
        matchers = []
        for i in rows:
            seq = seqs[i]
            if seq.matcher is None:
                seq.matcher = seq.request.grammar_template.deep_copy()
            matchers.append(seq.matcher)
        bitmask = torch.full((len(rows), bitmask_words(width)), -1, dtype=torch.int32)
        self.grammars.fill_masks(matchers, bitmask)
        allowed = torch.ones(len(seqs), width, dtype=torch.bool)
        allowed[rows] = allowed_tokens(bitmask, width)
        return allowed.to(self.device)

    def _fork(self, parent: Sequence) -> list[Sequence]:
        request = parent.request
        request.forked = True
        children = []
        for index in range(1, request.params.n):
            child = self._new_sequence(request, index)
            child.num_computed_tokens = parent.num_computed_tokens
            self.kv.fork(parent, child)
            children.append(child)
        request.seqs += children
        self.scheduler.insert_after(parent, children)
        return children

    def _append_token(self, seq: Sequence, token: int, entry: dict[int, Logprob] | None) -> None:
        """Append a sampled token and end the sample if it must: the grammar refused it or is complete,
        EOS, a stop token, the length limit. Stop strings are text: the client matches them."""
        p = seq.params
        seq.token_ids.append(token)
        if seq.logprobs is not None:
            seq.logprobs.append(entry)
        if seq.matcher is not None and not seq.matcher.consume_token(token):
            # The mask allowed only what the grammar accepts, so this is a bug; end the sample, say why.
            log.error(
                "grammar refused token %d of request %s: %s",
                token,
                seq.request.request_id,
                seq.matcher.get_error(),
            )
            self._finish(seq, "stop", None)
        elif not p.ignore_eos and token in seq.request.eos_token_ids:
            self._finish(seq, "stop", None)
        elif token in p.stop_token_ids:
            self._finish(seq, "stop", token)
        elif seq.matcher is not None and seq.matcher.is_stopped():
            self._finish(seq, "stop", None)  # the grammar is complete: nothing may follow
        elif seq.num_tokens >= seq.request.max_total_tokens:
            self._finish(seq, "length", None)

    def _finish(self, seq: Sequence, reason: str, stop_reason: str | int | None) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.finish(seq)

    def _request_update(self, request: Request, aborted: bool = False) -> RequestUpdate:
        """What the request's samples gained since the last update: new tokens and logprobs only."""
        samples = []
        for seq in request.seqs:
            new_ids = seq.token_ids[seq.num_prompt_tokens + seq.num_emitted_tokens :]
            if not new_ids and seq.finish_reason is None:
                continue
            seq.num_emitted_tokens += len(new_ids)
            new_logprobs = None
            if seq.logprobs is not None:  # entries not shipped yet: the core keeps none it has sent
                new_logprobs, seq.logprobs = seq.logprobs, []
            samples.append(SampleUpdate(seq.index, new_ids, new_logprobs, seq.finish_reason, seq.stop_reason))
        queued = request.first_scheduled_time
        return RequestUpdate(
            request.request_id,
            samples,
            request.num_cached_tokens,
            None if queued is None else queued - request.arrival_time,
            aborted,
        )

    def close(self) -> None:
        """Release what the core holds: unfinished requests are aborted, the grammar compiler's threads
        stopped, and the model, its KV cache and any draft model let go, so a process can build engine
        after engine (as the optimizer does) without growing. The core serves nothing afterwards;
        calling close again does nothing."""
        if self.runner is None:
            return
        for request_id in list(self.requests):
            self.abort_request(request_id)
        if self._grammars is not None:
            self._grammars.shutdown()
            self._grammars = None
        # The scheduler and the LoRA manager hold the model too (through the adapter slots).
        self.model = self.runner = self.speculator = self.lora = self.scheduler = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the freed blocks back to the device, for the next engine

    def stats(self) -> CoreStats:
        sched, pool, spec = self.scheduler, self.kv.pool, self.speculator
        return CoreStats(
            num_running=len({s.request.request_id for s in sched.running}),
            num_waiting=len({s.request.request_id for s in sched.waiting}),
            kv_cache_usage=1.0 - pool.num_free / pool.num_blocks,
            num_preemptions=sched.num_preemptions,
            prefix_cache_queries=self.kv.prefix_queries,
            prefix_cache_hits=self.kv.prefix_hits,
            spec_draft_tokens=spec.num_draft_tokens if spec else 0,
            spec_accepted_tokens=spec.num_accepted_tokens if spec else 0,
            spec_emitted_tokens=spec.num_emitted_tokens if spec else 0,
            cache_events=pool.take_cache_events(),
        )


@dataclass
class StepPlan:
    """A scheduled step laid out for the runner (decodes first, see ember.engine.work) and what to do with
    its logits: plain samples and speculative verifications."""

    seqs: list[Sequence]
    work: list[Work]
    lora_slots: list[int | None]
    sample_rows: list[int]  # indices into work whose last new tokens want logits
    num_logits: list[int]  # per sample row: 1, or 1 + proposals for a verification
    proposals: dict[Sequence, Proposal]
    to_sample: list[Sequence] = field(default_factory=list)
    plain_rows: list[int] = field(default_factory=list)  # logit rows of to_sample, in order
    to_verify: list[Sequence] = field(default_factory=list)
    verify_rows: list[int] = field(default_factory=list)  # logit rows of to_verify, concatenated

    @classmethod
    def build(cls, num_scheduled: dict[Sequence, int], proposals: dict[Sequence, Proposal]) -> StepPlan:
        items = []
        for seq, n in num_scheduled.items():
            prop = proposals.get(seq)
            start = seq.num_computed_tokens
            if prop is None:  # what it had pending
                work = Work.of(seq.token_ids, start, min(n, seq.num_tokens - start), seq.block_table)
            else:  # the pending token and the proposals, scored in the same pass
                work = Work(seq.token_ids[start:] + prop.tokens, start, 1 + len(prop.tokens), seq.block_table)
            items.append((seq, work))
        items = [items[i] for i in decodes_first([w for _, w in items])]
        plan = cls(
            [seq for seq, _ in items],
            [work for _, work in items],
            [seq.lora_slot for seq, _ in items],
            [],
            [],
            proposals,
        )
        row = 0
        for j, (seq, work) in enumerate(items):
            if seq in proposals:
                plan.sample_rows.append(j)
                plan.num_logits.append(work.num_new)
                plan.to_verify.append(seq)
                plan.verify_rows.extend(range(row, row + work.num_new))
                row += work.num_new
            elif work.start + work.num_new == seq.num_tokens:  # the prompt is done: sample its next token
                plan.sample_rows.append(j)
                plan.num_logits.append(1)
                plan.to_sample.append(seq)
                plan.plain_rows.append(row)
                row += 1
        return plan
