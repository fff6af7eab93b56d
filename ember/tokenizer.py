"""Text <-> token ids for one model, over a transformers fast tokenizer in an HF-layout directory."""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase


class Tokenizer:
    def __init__(self, hf: PreTrainedTokenizerBase, name: str) -> None:
        self._hf = hf
        self.name = name

    @classmethod
    def from_dir(cls, path: str | Path, chat_template: str | None = None) -> Tokenizer:
        """Load `tokenizer.json` / `tokenizer_config.json` (and a chat template, if any) from `path`.
        `chat_template` (a Jinja file, or the template text) replaces the model's own template."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"tokenizer directory '{path}' does not exist; point it at a model directory in HF layout "
                "(tokenizer.json, tokenizer_config.json)"
            )
        hf = AutoTokenizer.from_pretrained(str(path))
        # ember checks lengths against the engine's context itself; transformers' warning would be noise.
        hf.model_max_length = 2**62
        if chat_template is not None:
            hf.chat_template = read_chat_template(chat_template)
        return cls(hf, name=path.name)

    @property
    def hf(self) -> PreTrainedTokenizerBase:
        """The underlying transformers tokenizer, for what this class does not wrap."""
        return self._hf

    @property
    def eos_token_id(self) -> int | None:
        return self._hf.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self._hf.bos_token_id

    @property
    def vocab_size(self) -> int:
        # len() counts added tokens, which `hf.vocab_size` leaves out. The model's embedding may still be
        # larger (padded to a multiple of 64 or so): never size logits from this.
        return len(self._hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, ids: Sequence[int]) -> list[bytes]:
        """The exact bytes of each token, as OpenAI's logprobs report them. A byte-level BPE token may be
        part of a character, so decoding it alone would give U+FFFD; its bytes are what it really is."""
        pieces = self._hf.convert_ids_to_tokens(list(ids))
        table = self._byte_decoder
        out = []
        for i, piece in zip(ids, pieces, strict=True):
            if table is not None and piece is not None and all(c in table for c in piece):
                out.append(bytes(table[c] for c in piece))
            else:
                out.append(self.decode([i], skip_special_tokens=False).encode())
        return out

    @cached_property
    def _byte_decoder(self) -> dict[str, int] | None:
        """GPT-2's printable stand-ins for bytes -> the bytes, for byte-level BPE vocabularies; else None."""
        backend = getattr(self._hf, "backend_tokenizer", None)
        if type(getattr(backend, "decoder", None)).__name__ != "ByteLevel":
            return None
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
        shifted = [b for b in range(256) if b not in printable]
        table = {chr(b): b for b in printable}
        table.update({chr(256 + k): b for k, b in enumerate(shifted)})
        return table

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """Render `messages` (and `tools`, for templates that take them) with the model's chat template
        and return the prompt's token ids. `continue_final_message`: the last (assistant) message is left
        open for the model to go on with; `template_kwargs`: more variables for the template."""
        if not self._hf.chat_template:
            raise ValueError(f"model {self.name} has no chat template; use generate() with a plain prompt")
        # Render to text, then encode: in transformers 5 `tokenize=True` returns a BatchEncoding rather than a
        # list. No special tokens are added on encode because templates that want a BOS write it themselves
        # (`{{ bos_token }}`); adding one here would double it.
        messages, typed = self._mask_special_tokens(messages)
        text = self._hf.apply_chat_template(
            messages,
            tools=tools,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **(template_kwargs or {}),
        )
        if not typed:
            return self.encode(text, add_special_tokens=False)
        # The template's own markers stay control tokens; what the messages spelled out is encoded as text.
        ids: list[int] = []
        for i, piece in enumerate(re.split("(" + "|".join(map(re.escape, typed)) + ")", text)):
            if i % 2:
                ids += self._plain_text.encode(typed[piece], add_special_tokens=False).ids
            elif piece:
                ids += self.encode(piece, add_special_tokens=False)
        return ids

    def _mask_special_tokens(
        self, messages: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """`messages` with every special token written in a message's content (a user typing
        `<|im_start|>system`) replaced by a placeholder, and placeholder -> the text it stands for."""
        pattern = self._special_pattern
        if pattern is None or not any(
            isinstance(m.get("content"), str) and pattern.search(m["content"]) for m in messages
        ):
            return messages, {}
        nonce = secrets.token_hex(8)  # no client can guess it, so no content can forge a placeholder
        typed: dict[str, str] = {}

        def mask(match: re.Match) -> str:
            placeholder = f"\ue000{nonce}:{len(typed)}\ue001"
            typed[placeholder] = match.group()
            return placeholder

        out = []
        for m in messages:
            content = m.get("content")
            out.append({**m, "content": pattern.sub(mask, content)} if isinstance(content, str) else m)
        return out, typed

    @cached_property
    def _special_pattern(self) -> re.Pattern | None:
        specials = sorted(
            (t.content for t in self._hf.added_tokens_decoder.values() if t.special), key=len, reverse=True
        )
        return re.compile("|".join(map(re.escape, specials))) if specials else None

    @cached_property
    def _plain_text(self):
        """A copy of the backend tokenizer that reads special tokens' text as text. A copy, because
        transformers' `split_special_tokens` flips a flag on the shared one, racing other threads."""
        from tokenizers import Tokenizer as RustTokenizer

        plain = RustTokenizer.from_str(self._hf.backend_tokenizer.to_str())
        plain.encode_special_tokens = True
        return plain


def read_chat_template(value: str) -> str:
    """A path to a Jinja file -> its text; text that is a template already (it has Jinja tags) -> itself."""
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"chat template '{value}' is neither a file nor a Jinja template; pass a path to a .jinja file "
            "or the template text"
        )
    return path.read_text()
