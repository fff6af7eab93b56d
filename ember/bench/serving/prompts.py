"""Random prompt text of an exact token length, built from a tokenizer's own word tokens.

Random token ids decode to text that rarely re-encodes to the same ids (byte fragments merge, special
tokens vanish), so lengths would drift. Instead the pool is the vocabulary's whole-word tokens (" the",
" river"): a space-separated run of them re-encodes one token per word. The first word is also one
token without its space, so a text of n words is n tokens, and two texts joined by a space are the sum
of their lengths (a shared prefix keeps its exact tokens). A final measure-and-trim keeps lengths exact
on tokenizers where that does not hold.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

from ember.models.catalog import resolve_model
from ember.tokenizer import Tokenizer

_WORD = re.compile(r"\s?[a-z]{2,}")
# Below this many single-token words the pool is taken without the one-token check (odd tokenizers).
_MIN_POOL = 256


class PromptSampler:
    """Draws prompt text of a given token length from a seeded generator."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.words, self.first_words = _word_pools(tokenizer)

    @classmethod
    @lru_cache(maxsize=4)
    def for_model(cls, name: str) -> PromptSampler:
        """The sampler for a catalog name, model directory or HF repo id; cached across runs."""
        return cls(Tokenizer.from_dir(resolve_model(name)))

    def count(self, text: str) -> int:
        """Tokens in `text` as content (no BOS): what the prompt adds to a request."""
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def text(self, num_tokens: int, rng: np.random.Generator) -> str:
        if num_tokens < 1:
            raise ValueError(f"a prompt needs at least 1 token, got {num_tokens}")
        words = [str(rng.choice(self.first_words)), *rng.choice(self.words, size=num_tokens - 1)]
        text = " ".join(words)
        # Exact by construction on byte-level BPE; elsewhere a correction or two trims or pads it.
        for _ in range(8):
            n = self.count(text)
            if n == num_tokens:
                break
            if n > num_tokens:
                words = words[: max(1, len(words) - (n - num_tokens))]
            else:
                words += list(rng.choice(self.words, size=num_tokens - n))
            text = " ".join(words)
        return text


def _word_pools(tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(words that are one token after a space, those of them also one token at the start of a text)"""
    hf = tokenizer.hf
    decoded = hf.batch_decode([[i] for i in range(len(hf))])
    # sorted: the pool's order must not depend on set iteration, or a seed would not reproduce a workload
    candidates = sorted({s.strip() for s in decoded if _WORD.fullmatch(s)})
    if not candidates:
        raise ValueError(f"tokenizer {hf.name_or_path} has no plain lowercase word tokens to build prompts")
    spaced = hf([" " + w for w in candidates], add_special_tokens=False)["input_ids"]
    bare = hf(candidates, add_special_tokens=False)["input_ids"]
    words = [w for w, ids in zip(candidates, spaced, strict=True) if len(ids) == 1]
    if len(words) < _MIN_POOL:
        return np.array(candidates), np.array(candidates)
    first = [w for w, a, b in zip(candidates, spaced, bare, strict=True) if len(a) == 1 and len(b) == 1]
    return np.array(words), np.array(first or words)
