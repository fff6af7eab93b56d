"""Structured outputs: grammars that constrain decoding, one token mask row per sequence per step.

Backed by llguidance (see the README for why): a request's constraint (ember/structured_outputs.py: a
JSON schema, any JSON object, a Lark or GBNF grammar, a regex or a list of choices) becomes one llguidance
grammar string, which is also its cache key. Compiling it (building the Earley parser and warming the lexer on the vocabulary) runs on
a worker thread, never on the step loop; a sequence waits in the queue until its grammar is ready, and
the others go on. A compiled grammar is kept as a template matcher; each sequence runs a cheap copy of
it (copies share the lexer's state cache, so later masks are ~0.1 ms).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ember.errors import InvalidRequest
from ember.structured_outputs import explain_error

log = logging.getLogger(__name__)


class GrammarCompiler:
    """Compiles grammars on worker threads and caches them by their text (failures too, so a bad schema
    sent again is refused at once). `submit` never blocks; the future gives a template matcher or raises
    InvalidRequest naming the problem."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids: list[int], max_cached: int = 512):
        self.vocab_size = vocab_size
        self.max_cached = max_cached
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ember-grammar")
        self._cache: OrderedDict[str, Future] = OrderedDict()
        self._lock = threading.Lock()
        self.num_compiled = 0
        # Wrapping the vocabulary takes ~0.5 s: started now, off the caller's thread, needed by the first compile.
        self._tokenizer = self._pool.submit(_llg_tokenizer, hf_tokenizer, vocab_size, eos_token_ids)
        self._executor = None

    def submit(self, grammar: str) -> Future:
        with self._lock:
            future = self._cache.get(grammar)
            if future is not None:
                self._cache.move_to_end(grammar)
                return future
            future = self._pool.submit(self._compile, grammar)
            self._cache[grammar] = future
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
            return future

    def _compile(self, grammar: str):
        import llguidance

        tokenizer = self._tokenizer.result()
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequest(explain_error(matcher.get_error()), param="response_format")
        matcher.compute_bitmask()  # builds the lexer's first states here rather than on the step loop
        self.num_compiled += 1
        return matcher

    def fill_masks(self, matchers: list, bitmask: torch.Tensor) -> None:
        """Row i of `bitmask` [len(matchers), words] int32 <- the allowed tokens of matchers[i], in parallel."""
        import llguidance
        import llguidance.torch

        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        llguidance.torch.fill_next_token_bitmask_par(
            self._executor, [(m, i) for i, m in enumerate(matchers)], bitmask
        )

    def shutdown(self) -> None:
        """Stop the worker threads (a compile under way finishes first) and drop what they built."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._cache.clear()
        self._executor = None  # llguidance's own worker threads go with it


def _llg_tokenizer(hf_tokenizer, vocab_size: int, eos_token_ids: list[int]):
    import llguidance.hf

    return llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=list(eos_token_ids))


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, words] int32 bitmask -> [rows, vocab_size] bool, True where the grammar allows the token."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [rows, words, 32]; bit j of word w is token 32w + j
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()
