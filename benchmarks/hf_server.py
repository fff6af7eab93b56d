"""The baseline without a serving engine: HF transformers `generate`, one request at a time, behind a
minimal OpenAI-style streaming API (enough for `ember bench serve`).

    .venv/bin/python benchmarks/hf_server.py --model smollm2-135m-instruct --port 8002

Requests queue on a lock and each runs `generate` alone (greedy, or sampling at the given temperature),
on a thread of its own; every generated token is pushed straight into the event loop and sent as one
chunk, so chunk gaps are token gaps. `ignore_eos` sets min_new_tokens so every request generates exactly
max_tokens. The final chunk carries usage, as OpenAI's does with stream_options.include_usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer

from ember.models.catalog import resolve_model


class _TokenPusher(BaseStreamer):
    """Hands each new token's text to the request's asyncio queue as generate() produces it."""

    def __init__(self, tokenizer, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.tokenizer, self.loop, self.queue = tokenizer, loop, queue
        self.prompt_seen = False
        self.ids: list[int] = []
        self.text = ""

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        delta, self.text = text[len(self.text) :], text
        self.loop.call_soon_threadsafe(self.queue.put_nowait, delta)

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


def create_app(model_name: str, threads: int | None) -> FastAPI:
    if threads:
        torch.set_num_threads(threads)
    path = resolve_model(model_name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "hf"}]}

    async def handle(request: Request, chat: bool):
        body = await request.json()
        if body.get("model") != model_name:
            return JSONResponse({"error": {"message": f"unknown model {body.get('model')}"}}, status_code=404)
        if chat:
            ids = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True)
            if not isinstance(ids, list):  # transformers 5 returns an encoding
                ids = ids["input_ids"]
        else:
            ids = tokenizer.encode(body["prompt"])
        max_tokens = int(body.get("max_tokens") or 16)
        temperature = float(body.get("temperature", 1.0))
        pieces: asyncio.Queue = asyncio.Queue()
        streamer = _TokenPusher(tokenizer, asyncio.get_running_loop(), pieces)
        result: dict = {}

        def run() -> None:
            with lock, torch.inference_mode():
                kwargs = dict(
                    input_ids=torch.tensor([ids]),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                    max_new_tokens=max_tokens,
                    do_sample=temperature > 0,
                    streamer=streamer,
                    pad_token_id=tokenizer.eos_token_id,
                )
                if temperature > 0:
                    kwargs["temperature"] = temperature
                if body.get("ignore_eos"):
                    kwargs["min_new_tokens"] = max_tokens
                out = model.generate(**kwargs)
                result["completion_tokens"] = out.shape[1] - len(ids)

        threading.Thread(target=run, daemon=True).start()
        rid, created = f"hf-{uuid.uuid4().hex}", int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str) -> str:
            choice = {"index": 0, "finish_reason": None}
            choice.update({"delta": {"content": text}} if chat else {"text": text})
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "choices": [choice]})

        async def events():
            while (piece := await pieces.get()) is not None:
                yield chunk(piece) + "\n\n"
            while "completion_tokens" not in result:
                await asyncio.sleep(0.001)
            n = result["completion_tokens"]
            usage = {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}
            yield "data: " + json.dumps({"id": rid, "object": obj, "choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8002)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    uvicorn.run(create_app(args.model, args.threads), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
