"""One Ray Serve replica: an ember engine (its core on a thread of the replica's process) and the calls
the ingress makes of it over a deployment handle.

What a replica tells the router (`record_routing_stats`, polled by Ray Serve and handed to the router in
the ingress) is the compact form of its prefix cache: one 8-byte key per cached block
(ember.serve_ray.routing.block_key), plus its adapters, queue and KV use. Its health check fails once the
engine has died or its step loop is wedged, so Ray replaces it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import torch

from ember.config import EngineConfig
from ember.engine.async_engine import AsyncEngine
from ember.engine.client import EngineState
from ember.engine.messages import EngineInfo
from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams
from ember.serve_ray.routing import block_key


class EngineReplica:
    def __init__(
        self,
        config: EngineConfig,
        loras: dict[str, str],
        max_queue: int | None,
        threads: int,
        stall_timeout: float,
    ):
        torch.set_num_threads(threads)
        self.engine = AsyncEngine(config, mode="thread", max_queue=max_queue, report_blocks=True)
        self.stall_timeout = stall_timeout
        if loras:
            # The constructor may run on the replica's event loop: the adapters load on a loop of their own.
            failed: list[BaseException] = []

            def load() -> None:
                async def each() -> None:
                    for name, path in loras.items():
                        await self.engine.add_lora(name, path)

                try:
                    asyncio.run(each())
                except BaseException as exc:
                    failed.append(exc)

            t = threading.Thread(target=load, name="ember-loras")
            t.start()
            t.join()
            if failed:
                raise failed[0]

    def describe(self) -> tuple[EngineInfo, dict[str, str]]:
        """What the ingress needs to validate prompts and list models: the engine's info, its adapters."""
        return self.engine.info, dict(self.engine.adapters)

    async def generate(
        self,
        route: dict,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        cache_salt: bytes | None,
        max_cached_tokens: int | None,
        lora: str | None,
    ) -> AsyncIterator[RequestOutput]:
        """The request's outputs as they grow. `route` is for the router (it reads the first argument);
        a cancelled call (the client left) aborts the request here, as AsyncEngine.generate does."""
        stream = self.engine.generate(
            prompt_ids,
            params,
            request_id,
            cache_salt=cache_salt,
            max_cached_tokens=max_cached_tokens,
            lora=lora,
        )
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()

    def record_routing_stats(self) -> dict:
        stats = self.engine.stats
        return {
            "blocks": [block_key(h) for h in list(self.engine.cached_blocks)],
            "adapters": sorted(self.engine.adapters),
            "num_running": stats.num_running if stats else 0,
            "num_waiting": stats.num_waiting if stats else 0,
            "kv_usage": stats.kv_cache_usage if stats else 0.0,
        }

    def check_health(self) -> None:
        if self.engine.state is not EngineState.READY:
            raise RuntimeError(f"the engine has stopped: {self.engine.error}")
        if self.engine.stalled_for() > self.stall_timeout:
            raise RuntimeError(f"the engine's step loop is stalled for {self.engine.stalled_for():.0f} s")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
