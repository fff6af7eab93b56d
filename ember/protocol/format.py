"""RequestOutput -> OpenAI response bodies: choices, streamed chunks, usage and logprobs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ember.outputs import CompletionOutput, Logprob, RequestOutput
from ember.protocol import tools

SYSTEM_FINGERPRINT = "ember-0.1"


class TokenBytes(Protocol):
    """What logprobs need of a tokenizer (ember.tokenizer.Tokenizer is one): the exact bytes of each token.
    Taken as an interface so that formatting never imports transformers."""

    def token_bytes(self, ids: Sequence[int]) -> list[bytes]: ...


def usage(outs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outs)},
    }


def perf_metrics(outs: list[RequestOutput], started: float, first: float, ended: float) -> dict:
    """Fireworks' perf_metrics (the names of its `fireworks-*` headers), from monotonic times in seconds:
    when the request arrived, when its first token was out, when its last was."""
    u = usage(outs)
    decoding = ended - first
    return {
        "prompt-tokens": u["prompt_tokens"],
        "cached-prompt-tokens": u["prompt_tokens_details"]["cached_tokens"],
        "completion-tokens": u["completion_tokens"],
        "server-time-to-first-token": round(first - started, 6),
        "server-processing-time": round(ended - started, 6),
        "tokens-per-second": round(u["completion_tokens"] / decoding, 3) if decoding > 0 else None,
    }


def raw_output(prompt_text: str, out: RequestOutput, c: CompletionOutput) -> dict:
    """Fireworks' raw_output: the prompt and the completion as the model read and wrote them (chat
    markup and tool-call blocks included)."""
    return {
        "prompt_fragments": [prompt_text],
        "prompt_token_ids": list(out.prompt_token_ids),
        "completion": c.text,
        "completion_token_ids": list(c.token_ids),
    }


def envelope(rid: str, created: int, model: str, obj: str) -> dict:
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }


class LogprobFormatter:
    """Token logprobs in OpenAI's two shapes: chat (`content` entries with bytes) and legacy completions."""

    def __init__(self, tokenizer: TokenBytes, top: int):
        self.tokenizer = tokenizer
        self.top = top

    def _tops(self, entry: dict[int, Logprob]) -> list[tuple[int, Logprob]]:
        ranked = sorted(((t, lp) for t, lp in entry.items() if lp.rank <= self.top), key=lambda x: x[1].rank)
        return ranked[: self.top]

    def _strings(self, ids: list[int]) -> tuple[list[str], list[list[int]]]:
        raw = self.tokenizer.token_bytes(ids)
        return [b.decode("utf-8", errors="replace") for b in raw], [list(b) for b in raw]

    def chat(self, token_ids: list[int], entries: list[dict[int, Logprob]]) -> dict:
        content = []
        for tid, entry in zip(token_ids, entries, strict=True):
            tops = self._tops(entry)
            strs, raw = self._strings([tid] + [t for t, _ in tops])
            content.append(
                {
                    "token": strs[0],
                    "logprob": entry[tid].logprob,
                    "bytes": raw[0],
                    "top_logprobs": [
                        {"token": s, "logprob": lp.logprob, "bytes": b}
                        for (_, lp), s, b in zip(tops, strs[1:], raw[1:], strict=True)
                    ],
                }
            )
        return {"content": content, "refusal": None}

    def completion(self, token_ids: list[int], entries: list[dict[int, Logprob]], offset: int) -> dict:
        """`offset`: characters of completion text before these tokens (for text_offset)."""
        out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, entry in zip(token_ids, entries, strict=True):
            tops = self._tops(entry)
            strs, _ = self._strings([tid] + [t for t, _ in tops])
            out["tokens"].append(strs[0])
            out["token_logprobs"].append(entry[tid].logprob)
            out["top_logprobs"].append({s: lp.logprob for (_, lp), s in zip(tops, strs[1:], strict=True)})
            out["text_offset"].append(offset)
            offset += len(strs[0])
        return out


def chat_choice(
    c: CompletionOutput, index: int, logprobs: LogprobFormatter | None, tool_mode: str | None = None
) -> dict:
    """`tool_mode`: the request's tool choice (None: no tools in play), to read calls out of the text."""
    message = {"role": "assistant", "content": c.text, "refusal": None}
    reason = _reason(c)
    calls = tools.parse(c.text) if tool_mode is not None else None
    if calls is not None:  # the output is calls: complete ones come back, a cut-off tail is dropped
        message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": calls or None}
        if calls and reason in ("stop", "length"):
            reason = "tool_calls"
    return {
        "index": index,
        "message": message,
        "logprobs": logprobs.chat(c.token_ids, c.logprobs) if logprobs and c.logprobs is not None else None,
        "finish_reason": reason,
    }


def completion_choice(c: CompletionOutput, index: int, logprobs: LogprobFormatter | None) -> dict:
    lp = logprobs.completion(c.token_ids, c.logprobs, 0) if logprobs and c.logprobs is not None else None
    return {"index": index, "text": c.text, "logprobs": lp, "finish_reason": _reason(c)}


def _reason(c: CompletionOutput) -> str | None:
    # OpenAI knows stop and length; an aborted sample (the server shut down under it) reads as length-cut.
    return "length" if c.finish_reason == "abort" else c.finish_reason


class ChunkMaker:
    """Streamed chunks for one response: one id and created for all, role first, finish_reason last."""

    def __init__(
        self,
        base: dict,
        chat: bool,
        n: int,
        logprobs: LogprobFormatter | None,
        include_usage: bool,
        tool_mode: str | None = None,
        echo: list[str] | None = None,
        raw: list[str] | None = None,
    ):
        """`echo`: per prompt, text that opens each of its choices; `raw`: per prompt, its text, for a
        raw_output on each choice's last chunk."""
        self.base = base
        self.chat = chat
        self.n = n
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.tool_mode = tool_mode
        self.echo = echo
        self.raw = raw
        self.calls: dict[int, tools.CallStream] = {}  # per choice, where tools are in play
        self.started: set[int] = set()
        self.done: set[int] = set()
        self.offsets: dict[int, int] = {}  # characters streamed so far per choice, for text_offset

    def chunks(self, prompt_index: int, out: RequestOutput) -> list[dict]:
        result = []
        for c in out.outputs:
            index = prompt_index * self.n + c.index
            if index in self.done:
                continue
            if not c.delta_text and not c.delta_token_ids and not c.finish_reason and index in self.started:
                continue
            if c.finish_reason:
                self.done.add(index)
            k = len(c.delta_token_ids)
            lp = None
            if self.logprobs and c.logprobs is not None and k:
                entries = c.logprobs[-k:]
                if self.chat:
                    lp = self.logprobs.chat(c.delta_token_ids, entries)
                else:
                    lp = self.logprobs.completion(c.delta_token_ids, entries, self.offsets.get(index, 0))
            reason = _reason(c) if c.finish_reason else None
            text = c.delta_text
            if self.echo is not None and index not in self.started:
                text = self.echo[prompt_index] + text
            if self.chat:
                delta = {"content": text}
                if self.tool_mode is not None:
                    stream = self.calls.setdefault(index, tools.CallStream(self.tool_mode != "auto"))
                    text, call_deltas = stream.feed(c.delta_text)
                    delta = {"content": text or None} if stream.mode != "text" else delta
                    if call_deltas:
                        delta["tool_calls"] = call_deltas
                    elif stream.mode != "text" and not reason and index in self.started and not lp:
                        continue  # nothing to say yet: arguments held back at a possible end
                    if reason:
                        reason = stream.finish_reason(reason)
                if index not in self.started:
                    delta = {"role": "assistant", **delta}
                choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}
            else:
                choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": reason}
            if self.raw is not None and c.finish_reason:
                choice["raw_output"] = raw_output(self.raw[prompt_index], out, c)
            self.offsets[index] = self.offsets.get(index, 0) + len(c.delta_text)
            self.started.add(index)
            chunk = {**self.base, "choices": [choice]}
            if self.include_usage:
                chunk["usage"] = None
            result.append(chunk)
        return result

    def usage_chunk(self, outs: list[RequestOutput]) -> dict:
        return {**self.base, "choices": [], "usage": usage(outs)}
