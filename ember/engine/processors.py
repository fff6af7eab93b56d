"""The client side of the engine, shared by every client: one input processor that turns a prompt into
checked token ids before the core sees it, one output processor that turns the core's token deltas into
text (incremental detokenization, stop strings, logprobs, the n samples of a request).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ember.engine.detokenizer import IncrementalDetokenizer
from ember.engine.messages import EngineInfo, RequestUpdate
from ember.errors import InvalidRequest
from ember.grammar_check import GrammarChecker
from ember.outputs import CompletionOutput, Logprob, RequestOutput
from ember.sampling_params import SamplingParams
from ember.tokenizer import Tokenizer


class InputProcessor:
    """Tokenize and validate against the loaded engine: vocabulary, context length, pool capacity, and
    a grammar's limits (checked in a worker process: ember/grammar_check.py). May block for as long as a
    grammar check takes: call it off an event loop."""

    def __init__(self, tokenizer: Tokenizer, info: EngineInfo):
        self.tokenizer = tokenizer
        self.info = info
        # No token covers more characters than the vocabulary's longest entry (for a byte-level BPE, its
        # bytes; a character is at least one). Twice that, and never under 32, leaves room for tokenizers
        # that normalize text before they split it: a text longer than this many characters per token of
        # context cannot fit, so it is refused before the tokenizer spends seconds on all of it.
        longest = max((len(t) for t in tokenizer.hf.get_vocab()), default=1)
        self.chars_per_token_bound = max(32, 2 * longest)
        self.max_prompt_chars = info.max_model_len * self.chars_per_token_bound
        self.grammars = GrammarChecker()

    def close(self) -> None:
        self.grammars.close()

    def token_ids(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """The prompt's ids, checked; InvalidRequest names what is wrong."""
        if isinstance(prompt, str):
            self.check_text_length(len(prompt))
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.validate(ids, params)
        return ids

    def check_text_length(self, chars: int, param: str = "prompt") -> None:
        """InvalidRequest when text of `chars` characters holds more tokens than the context, for sure."""
        if chars > self.max_prompt_chars:
            raise InvalidRequest(
                f"the prompt has {chars} characters, more than this model's maximum context length of "
                f"{self.info.max_model_len} tokens can hold (a token covers at most "
                f"{self.chars_per_token_bound} characters)",
                param=param,
                code="context_length_exceeded",
            )

    def validate(self, ids: list[int], params: SamplingParams) -> None:
        info = self.info
        vocab = info.vocab_size
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
        if want > info.max_model_len:
            raise InvalidRequest(
                f"this model's maximum context length is {info.max_model_len} tokens; the request asks "
                f"for {want} ({len(ids)} in the prompt, {params.max_tokens or 1} to generate)",
                param="max_tokens" if params.max_tokens and len(ids) < info.max_model_len else "prompt",
                code="context_length_exceeded",
            )
        if want > info.pool_tokens:
            raise InvalidRequest(
                f"the request needs {want} tokens of KV cache; the pool holds {info.pool_tokens} "
                "(raise the KV cache memory budget)",
                param="max_tokens",
                code="context_length_exceeded",
            )
        room = min(info.max_model_len, info.pool_tokens) - len(ids)
        if params.min_tokens > room:
            raise InvalidRequest(
                f"min_tokens is {params.min_tokens}, but the context has room for {room} tokens after the "
                f"{len(ids)}-token prompt",
                param="min_tokens",
                code="context_length_exceeded",
            )
        if params.structured is not None:
            self.grammars.check(params.structured)


@dataclass(eq=False)
class SampleState:
    """The text side of one sample: its tokens so far and where its detokenizer stands."""

    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_emitted: int = 0  # tokens already handed out as deltas


@dataclass(eq=False)
class RequestState:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    samples: list[SampleState]
    lora: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    last_token: float | None = None  # when the last token arrived (serving metrics)

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


@dataclass
class Processed:
    """What one update made: the caller's output, the samples whose stop string matched (the core must
    stop them: request id, index, the string), and how many tokens the update brought."""

    output: RequestOutput
    stops: list[tuple[str, int, str]]
    new_tokens: int


class OutputProcessor:
    """Per-request text state; `process()` turns one RequestUpdate into one RequestOutput."""

    def __init__(self, tokenizer: Tokenizer, eos_token_ids: list[int]):
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)

    def new_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_ids: list[int],
        params: SamplingParams,
        lora: str | None = None,
    ) -> RequestState:
        samples = [
            SampleState(
                IncrementalDetokenizer(
                    self.tokenizer,
                    prompt_ids,
                    skip_special_tokens=params.skip_special_tokens,
                    stop=params.stop_list,
                    include_stop_str_in_output=params.include_stop_str_in_output,
                ),
                logprobs=[] if params.logprobs is not None else None,
            )
            for _ in range(params.n)
        ]
        return RequestState(request_id, prompt, prompt_ids, params, samples, lora)

    def process(self, state: RequestState, u: RequestUpdate) -> Processed:
        """Apply the core's update to `state`. A stop string found in a sample's new text ends it here
        (finish_reason "stop", the tokens after it dropped) and is listed in `stops` for the core."""
        stops = []
        new_tokens = 0
        params = state.params
        for su in u.samples:
            s = state.samples[su.index]
            if s.finish_reason is not None:  # its stop string ended it already
                continue
            last = len(su.new_token_ids) - 1
            for k, token in enumerate(su.new_token_ids):
                s.token_ids.append(token)
                new_tokens += 1
                if s.logprobs is not None and su.new_logprobs:
                    s.logprobs.append(su.new_logprobs[k])
                    s.cumulative_logprob += su.new_logprobs[k][token].logprob
                if k == last and su.finish_reason == "stop" and self._ends(token, params):
                    break  # EOS or a stop token ended it: not part of the text (a grammar's last token is)
                matched = s.detok.append([token], len(s.token_ids) >= params.min_tokens)
                if matched is not None:
                    s.finish_reason, s.stop_reason = "stop", matched
                    stops.append((u.request_id, su.index, matched))
                    break
            if s.finish_reason is None and su.finish_reason is not None:
                s.finish_reason, s.stop_reason = su.finish_reason, su.stop_reason
        if u.aborted:
            for s in state.samples:
                if s.finish_reason is None:
                    s.finish_reason = "abort"
        return Processed(self._output(state, u), stops, new_tokens)

    def _ends(self, token: int, params: SamplingParams) -> bool:
        """Whether `token` is one that ends a sample without being part of its text."""
        return token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids)

    @staticmethod
    def _output(state: RequestState, u: RequestUpdate) -> RequestOutput:
        outs = []
        for index, s in enumerate(state.samples):
            delta = s.detok.flush() if s.finish_reason is not None else s.detok.take_delta()
            new_ids = s.token_ids[s.num_emitted :]
            s.num_emitted = len(s.token_ids)
            outs.append(
                CompletionOutput(
                    index=index,
                    text=s.detok.text,
                    token_ids=list(s.token_ids),
                    finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason,
                    logprobs=list(s.logprobs) if s.logprobs is not None else None,
                    cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                    delta_text=delta,
                    delta_token_ids=new_ids,
                )
            )
        return RequestOutput(
            state.request_id,
            state.prompt,
            state.prompt_ids,
            outs,
            state.finished,
            num_cached_tokens=u.num_cached_tokens,
            queue_time=u.queue_time,
        )
