"""Offline batch inference: `LLM(model=...).generate(prompts, SamplingParams(...))`, as in vLLM."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

from tqdm.auto import tqdm

from ember.config import engine_config
from ember.engine.llm_engine import LLMEngine
from ember.models.catalog import DEFAULT_MODEL
from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """Keyword arguments are the engine's settings, flat, by the names of the `ember` CLI's flags with
    underscores (`ember.config.engine_kwargs()` lists them): device, dtype, quantization, max_model_len,
    seed, chat_template, block_size, kv_cache_memory, num_blocks, enable_prefix_caching, max_num_seqs,
    max_num_batched_tokens, enable_lora, max_loras, max_lora_rank, speculative ("ngram", "draft:MODEL" or
    a SpeculativeConfig), num_speculative_tokens, draft_num_layers, ... An unknown one raises TypeError."""

    def __init__(self, model: str = DEFAULT_MODEL, **kwargs: Any):
        self.engine = LLMEngine(engine_config(model=model, **kwargs))
        self.tokenizer = self.engine.tokenizer

    def add_lora(self, name: str, path: str) -> None:
        """Register a PEFT LoRA adapter (needs enable_lora=True); generate(..., lora=name) uses it."""
        self.engine.add_lora(name, path)

    def remove_lora(self, name: str) -> None:
        self.engine.remove_lora(name)

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
        lora: str | None | Seq[str | None] = None,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. Prompts are strings or lists of token ids; `lora` is
        an adapter name for all of them or one per prompt (None: the base model), mixed in one batch."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        loras = [lora] * len(prompts) if lora is None or isinstance(lora, str) else list(lora)
        if len(loras) != len(prompts):
            raise ValueError(f"got {len(loras)} adapters for {len(prompts)} prompts")
        ids: list[str] = []
        try:
            for prompt, sp, name in zip(prompts, params, loras, strict=True):
                ids.append(self.engine.add_request(prompt, sp, lora=name).request_id)
        except ValueError:
            for rid in ids:  # all or nothing: no half-added batch left in the engine
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, str]] | Seq[list[dict[str, str]]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate."""
        if messages and isinstance(messages[0], dict):
            messages = [messages]
        prompts = [self.tokenizer.apply_chat_template(m) for m in messages]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="generating", disable=not use_tqdm)
        try:
            while self.engine.has_unfinished_requests():
                for _, error in self.engine.poll_grammars():
                    if error is not None:
                        raise error  # a refused grammar refuses the batch, as a bad prompt would
                outs = self.engine.step()
                if self.engine.last_step_idle:
                    self.engine.wait_for_grammars(0.01)
                for out in outs:
                    if out.finished:
                        final[out.request_id] = out
                        bar.update(1)
        except BaseException:
            for rid in request_ids:
                self.engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return [final[rid] for rid in request_ids]

    def close(self) -> None:
        """Release the engine: its threads, the model and the KV cache. The LLM generates nothing
        afterwards; `with LLM(...) as llm:` closes it on leaving the block."""
        if not isinstance(self.engine, _Closed):
            self.engine.close()
            self.engine = _Closed()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _Closed:
    """Stands in for a closed LLM's engine, so that a later call says what happened."""

    def __getattr__(self, name: str):
        raise RuntimeError("this LLM was closed; make a new one to generate")
