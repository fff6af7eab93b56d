"""The engine loop: admit requests, schedule a step, run the model, sample, detokenize, report.

`step()` is one iteration of continuous batching. It is synchronous and single-threaded; `LLM` drives
it to completion for offline batches and `AsyncEngine` runs it on a thread for online serving.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
import uuid
from pathlib import Path

import torch

from ember.config import EngineConfig
from ember.engine.detokenizer import IncrementalDetokenizer
from ember.engine.kv_cache import KVCacheManager, root_hash
from ember.engine.model_runner import ModelRunner
from ember.engine.proposers import DraftProposer, NgramProposer
from ember.engine.sampler import sample
from ember.engine.scheduler import Scheduler
from ember.engine.sequence import Request, Sequence
from ember.engine.speculative import Speculator, Verdict
from ember.engine.structured import GrammarCompiler, allowed_tokens, bitmask_words
from ember.errors import InvalidRequest
from ember.lora.adapter import AdapterError
from ember.lora.manager import LoRAManager
from ember.models.catalog import resolve_model
from ember.models.config import ModelConfig
from ember.models.loader import load_model
from ember.models.lora import enable_lora
from ember.outputs import CompletionOutput, RequestOutput
from ember.sampling_params import SamplingParams
from ember.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class LLMEngine:
    """`detokenize=False` leaves text and stop strings to the caller (the server's frontend does them off
    the step loop); outputs then carry token ids only."""

    def __init__(self, config: EngineConfig, detokenize: bool = True):
        self.config = config
        self.detokenize = detokenize
        path = resolve_model(config.model)
        self.tokenizer = Tokenizer.from_dir(path)
        self.device = torch.device(config.device)
        self.model_config = ModelConfig.from_dir(path)
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        self.model = load_model(
            path, self.model_config, config.torch_dtype, self.device, self.max_model_len, config.quantization
        )
        self.eos_token_ids = self.model_config.eos_token_ids or [self.tokenizer.eos_token_id]
        cache = config.cache
        per_block = ModelRunner.bytes_per_block(self.model_config, cache.block_size, config.torch_dtype)
        draft = self._draft_source() if config.speculative.method == "draft" else None
        if draft is not None:  # the draft's KV blocks mirror the target's, within the same budget
            per_block += ModelRunner.bytes_per_block(draft[1], cache.block_size, config.torch_dtype)
        num_blocks = cache.num_blocks or max(1, cache.kv_cache_memory // per_block)
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

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        cache_salt: str | bytes | None = None,
        max_cached_tokens: int | None = None,
        lora: str | None = None,
    ) -> Request:
        """`cache_salt` names the prefix-cache namespace: requests share cached KV only under the same
        salt (the server derives it from the API key). `max_cached_tokens` caps how many prompt tokens
        may come from the cache; 0 keeps the request out of the cache entirely (no reads, no writes).
        `lora` names a loaded adapter to run with (see add_lora)."""
        params = params or SamplingParams()
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
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
        self._validate(ids, params)
        # Without max_tokens a request may run to the context's end, or to what the pool can hold alone.
        max_tokens = params.max_tokens or min(self.max_model_len, self._pool_tokens) - len(ids)
        request = Request(
            request_id, text, ids, params, len(ids) + max_tokens, eos_token_ids=self.eos_token_ids
        )
        request.lora = lora
        if max_cached_tokens != 0:
            salt = cache_salt.encode() if isinstance(cache_salt, str) else cache_salt
            # Never shared across adapters: the root takes the adapter's identity (a re-added name is new).
            request.cache_root = root_hash(salt, None if adapter is None else adapter.uid)
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

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        vocab = self.model_config.vocab_size
        if not ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(
                f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt"
            )
        bad = [t for t in (params.logit_bias or {}) if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(
                f"logit_bias token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="logit_bias"
            )
        want = len(ids) + (params.max_tokens or 1)
        if want > self.max_model_len:
            raise InvalidRequest(
                f"this model's maximum context length is {self.max_model_len} tokens; the request asks "
                f"for {want} ({len(ids)} in the prompt, {params.max_tokens or 1} to generate)",
                param="max_tokens" if params.max_tokens and len(ids) < self.max_model_len else "prompt",
                code="context_length_exceeded",
            )
        capacity = self._pool_tokens
        if want > capacity:
            raise InvalidRequest(
                f"the request needs {want} tokens of KV cache; the pool holds {capacity} "
                "(raise the KV cache memory budget)",
                param="max_tokens",
                code="context_length_exceeded",
            )

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
        detok = None
        if self.detokenize:
            detok = IncrementalDetokenizer(
                self.tokenizer,
                request.prompt_token_ids,
                skip_special_tokens=p.skip_special_tokens,
                stop=p.stop_list,
                include_stop_str_in_output=p.include_stop_str_in_output,
            )
        return Sequence(
            request,
            index,
            list(request.prompt_token_ids),
            detok,
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

    def abort_request(self, request_id: str) -> RequestOutput | None:
        request = self.requests.pop(request_id, None)
        self._awaiting_grammar.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"
        return self._output(request)

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

    # -- the step -----------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        if self.speculator is not None:
            self.speculator.plan(self.scheduler.running)
        sched = self.scheduler.schedule()
        self.last_step_idle = sched.empty
        if sched.empty:
            return []
        now = time.monotonic()
        for seq in sched.num_scheduled:
            if seq.request.first_scheduled_time is None:
                seq.request.first_scheduled_time = now
        copies = self.kv.take_copies()
        self.runner.copy_blocks(copies)
        proposals = {}
        if self.speculator is not None:
            self.speculator.proposer.copy_blocks(copies)  # the draft's KV follows copy-on-write
            proposals = self.speculator.propose(sched.num_scheduled)
        # A sequence's work: what it had pending, plus its proposed tokens (scored in the same pass).
        work_of = {}
        for seq, n in sched.num_scheduled.items():
            prop = proposals.get(seq)
            if prop is None:
                work_of[seq] = (
                    seq.token_ids,
                    seq.num_computed_tokens,
                    min(n, seq.num_tokens - seq.num_computed_tokens),
                )
            else:
                work_of[seq] = (seq.token_ids + prop.tokens, seq.num_computed_tokens, 1 + len(prop.tokens))
        # Decodes first, then prefill chunks and verifications: the layout the attention code expects.
        items = sorted(work_of.items(), key=lambda item: item[1][2] != 1)
        work, sample_rows, num_logits, to_sample, to_verify = [], [], [], [], []
        slots = [seq.lora_slot for seq, _ in items]
        for j, (seq, (tokens, start, n)) in enumerate(items):
            work.append((tokens, start, n, seq.block_table))
            if seq in proposals:
                sample_rows.append(j)
                num_logits.append(n)
                to_verify.append(seq)
            elif start + n == seq.num_tokens:
                sample_rows.append(j)
                num_logits.append(1)
                to_sample.append(seq)
        logits = self.runner.execute(work, sample_rows, slots, num_logits)
        for seq, (_, _, n) in items:
            if seq not in proposals:  # verified sequences commit what they keep, below
                seq.num_computed_tokens += n
                self.kv.commit(seq)

        # Logit rows follow sample_rows: split them into plain samples and verifications.
        plain_rows, verify_rows, row = [], [], 0
        for j, m in zip(sample_rows, num_logits, strict=True):
            seq = items[j][0]
            (verify_rows.extend if seq in proposals else plain_rows.extend)(range(row, row + m))
            row += m
        touched: dict[str, Request] = {}
        rows, seqs = [], []
        for i, seq in enumerate(to_sample):
            group = [seq]
            if seq.params.n > 1 and not seq.request.forked:
                group += self._fork(seq)
            rows += [plain_rows[i]] * len(group)
            seqs += group
        if seqs:
            picked = logits[torch.tensor(rows, device=logits.device)]
            result = sample(picked, seqs, self.generator, self._grammar_masks(seqs, picked.shape[-1]))
            for i, seq in enumerate(seqs):
                entry = result.logprobs[i]
                self._append_token(seq, result.token_ids[i], result.chosen_logprobs[i], entry)
                touched[seq.request.request_id] = seq.request
        if to_verify:
            verdicts = self.speculator.verify(
                logits[torch.tensor(verify_rows, device=logits.device)],
                to_verify,
                [proposals[s] for s in to_verify],
                self.generator,
            )
            for seq, verdict in zip(to_verify, verdicts, strict=True):
                self._keep(seq, verdict)
                touched[seq.request.request_id] = seq.request
        outputs = [self._output(r) for r in touched.values()]
        for r in touched.values():
            if r.finished:
                del self.requests[r.request_id]
        return outputs

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
            entry = None if verdict.logprobs is None else verdict.logprobs[i]
            logprob = None if verdict.chosen_logprobs is None else verdict.chosen_logprobs[i]
            self._append_token(seq, token, logprob, entry)
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

    def _append_token(self, seq: Sequence, token: int, logprob: float | None, entry) -> None:
        p = seq.params
        seq.token_ids.append(token)
        if seq.logprobs is not None:
            seq.logprobs.append(entry)
            seq.cumulative_logprob += logprob
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
        elif (
            seq.detokenizer is not None
            and (matched := seq.detokenizer.append([token], seq.num_output_tokens >= p.min_tokens))
            is not None
        ):
            self._finish(seq, "stop", matched)
        elif seq.matcher is not None and seq.matcher.is_stopped():
            self._finish(seq, "stop", None)  # the grammar is complete: nothing may follow
        elif seq.num_tokens >= seq.request.max_total_tokens:
            self._finish(seq, "length", None)

    def _finish(self, seq: Sequence, reason: str, stop_reason: str | int | None) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.finish(seq)

    def _output(self, request: Request) -> RequestOutput:
        outs = []
        for seq in request.seqs:
            detok = seq.detokenizer
            delta = "" if detok is None else detok.flush() if seq.finished else detok.take_delta()
            new_ids = seq.output_token_ids[seq.num_emitted_tokens :]
            seq.num_emitted_tokens = seq.num_output_tokens
            outs.append(
                CompletionOutput(
                    index=seq.index,
                    text="" if detok is None else detok.text,
                    token_ids=list(seq.output_token_ids),
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                    cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                    delta_text=delta,
                    delta_token_ids=new_ids,
                )
            )
        queued = request.first_scheduled_time
        return RequestOutput(
            request.request_id,
            request.prompt,
            request.prompt_token_ids,
            outs,
            request.finished,
            num_cached_tokens=request.num_cached_tokens,
            queue_time=None if queued is None else queued - request.arrival_time,
        )

    # -- teardown -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Release what the engine holds: unfinished requests are aborted, the grammar compiler's threads
        stopped, and the model, its KV cache and any draft model let go, so a process can build engine
        after engine (as the optimizer does) without growing. The engine serves nothing afterwards;
        calling close again does nothing."""
        for request_id in list(self.requests):
            self.abort_request(request_id)
        if self._grammars is not None:
            self._grammars.shutdown()
            self._grammars = None
        # The scheduler and the LoRA manager hold the model too (through the adapter slots).
        self.model = self.runner = self.speculator = self.lora = self.scheduler = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the freed blocks back to the device, for the next engine
