"""Token ids -> streamed text for one sequence: whole characters only, cut at stop strings.

Decoding each new token on its own is wrong twice over: a byte-level BPE token can carry half of a
multi-byte character (an emoji is often two or three tokens), and SentencePiece-style decoders drop the
leading space of the first token in a decode. So each step decodes a short window of recent tokens
twice, with and without the new ones, and emits the difference (the prefix_offset/read_offset scheme of
HF text-generation-inference and vLLM):

    ids:  ... | prefix_offset ... read_offset | new ids
    delta = decode(ids[prefix_offset:])[len(decode(ids[prefix_offset:read_offset])):]

A delta ending in U+FFFD is an incomplete character: the offsets stay put until a later token completes it.
"""

from __future__ import annotations

from collections.abc import Sequence

from ember.tokenizer import Tokenizer

# Prompt tokens decoded as context for the first output token, so its leading space comes out right.
_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Text of one generated sequence, fed token ids as they are sampled.

    `text` is everything decoded so far (cut at a stop string once one matched). `take_delta()` returns
    only what is safe to stream: no half characters, and nothing that may turn out to be the start of a
    stop string. Call `flush()` when the sequence ends for the rest. For byte-level BPE tokenizers the
    final `text` equals `tokenizer.decode(output_ids)` when no stop string matched.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        if isinstance(stop, str):
            raise TypeError(f"stop must be a list of strings, not the string {stop!r}; pass [{stop!r}]")
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty; remove '' from stop")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = list(dict.fromkeys(stop))
        self._include_stop = include_stop_str_in_output
        self._max_stop_len = max(map(len, self._stop), default=0)

        context = list(prompt_ids[-_CONTEXT_TOKENS:])
        if context and self._decode(context).endswith(_REPLACEMENT_CHAR):
            # The prompt ends inside a character. Its tail bytes would fuse with the first output token's
            # bytes and shift everything after; without context the output decodes as decode(output_ids).
            context = []
        self._ids = context
        self._prefix_offset = 0
        self._read_offset = len(context)

        self._text = ""
        self._emitted = 0  # chars of _text already returned by take_delta()
        self._matched_stop: str | None = None
        self._finished = False

    @property
    def text(self) -> str:
        return self._text

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def matched_stop(self) -> str | None:
        return self._matched_stop

    def append(self, new_ids: Sequence[int], check_stop: bool = True) -> str | None:
        """Add sampled token ids. Returns the stop string that matched, if one did: the sequence is then done.

        With `check_stop=False` (the sequence is still short of min_tokens) the text is only added: a stop
        string that ends in it does not count, now or later."""
        if self._finished:
            raise RuntimeError(
                "append() after the sequence finished (a stop string matched or flush() was called); "
                "stop generating for this sequence"
            )
        self._ids.extend(new_ids)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        # Shorter-or-equal: the new tokens add no text yet (a skipped special token) — keep them in the window.
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return None
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return self._add_text(new_text[len(prefix_text) :], check_stop)

    def take_delta(self) -> str:
        """Text that became safe to stream since the last call ('' if none)."""
        end = len(self._text)
        if not self._finished:
            end -= self._held_back()
        if end <= self._emitted:
            return ""
        delta = self._text[self._emitted : end]
        self._emitted = end
        return delta

    def flush(self) -> str:
        """Finish the sequence and return the last delta, including any text held back."""
        if not self._finished:
            # Bytes held for a character that will never be completed come out as decode() shows them (U+FFFD).
            window = self._ids[self._prefix_offset :]
            held = self._decode(window)[
                len(self._decode(self._ids[self._prefix_offset : self._read_offset])) :
            ]
            if held:
                self._add_text(held)
            self._finished = True
        return self.take_delta()

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _add_text(self, piece: str, check_stop: bool = True) -> str | None:
        old_len = len(self._text)
        self._text += piece
        if not self._stop or not check_stop:
            return None
        # A match ending at or before old_len would have been found by an earlier call, so each stop string
        # is searched only where it could end inside the new piece. Of several matches the one that ends
        # first wins (ties: the longer one): that is where a char-by-char stream would have stopped, so the
        # result does not depend on how tokens split the text.
        best: tuple[int, int, str] | None = None
        for s in self._stop:
            start = self._text.find(s, max(0, old_len - len(s) + 1))
            if start != -1 and (best is None or (start + len(s), start) < best[:2]):
                best = (start + len(s), start, s)
        if best is None:
            return None
        end, start, s = best
        self._text = self._text[: end if self._include_stop else start]
        self._matched_stop = s
        self._finished = True
        return s

    def _held_back(self) -> int:
        """Length of the longest unemitted suffix of the text that a stop string starts with."""
        # A full match would already have finished the sequence, so only proper prefixes matter.
        longest = min(self._max_stop_len - 1, len(self._text) - self._emitted)
        for k in range(longest, 0, -1):
            tail = self._text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0
