"""`ember serve --ray`: the engine replicas as a Ray Serve deployment, and the client ember's routes use.

Locally Ray is started here (and stopped with the server); with --ray-address it joins that cluster. The
HTTP ingress stays ember's own server in this process (its keys, store, gateway and drain), so only the
engines scale out; Ray's HTTP proxy is not started.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import ray
from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig

from ember.config import EngineConfig, ServerConfig
from ember.models.catalog import resolve_model
from ember.serve_ray.client import RayEngineClient
from ember.serve_ray.replica import EngineReplica
from ember.tokenizer import Tokenizer

log = logging.getLogger("ember.serve_ray")

APP_NAME = "ember"
# How often Ray Serve polls each replica's routing stats for the router (its prefix-cache blocks).
STATS_PERIOD_S = 1.0


def deployment_options(config: EngineConfig, options: ServerConfig) -> dict:
    """serve.deployment's options for the replicas: their number or autoscaling, resources, the router."""
    scale = options.autoscale_range()
    sizing: dict = {"num_replicas": options.replicas}
    if scale is not None:
        sizing = {
            "autoscaling_config": AutoscalingConfig(
                min_replicas=scale[0],
                max_replicas=scale[1],
                initial_replicas=scale[0],
                target_ongoing_requests=options.autoscale_target,
                upscale_delay_s=2.0,
                downscale_delay_s=10.0,
            )
        }
    return dict(
        name="engine",
        ray_actor_options={"num_cpus": options.replica_threads},
        # A replica queues past what it runs at once: its engine's scheduler, not Ray, orders the queue.
        max_ongoing_requests=config.scheduler.max_num_seqs + (options.max_queue or 0),
        # Scale-down and shutdown wait for the requests a replica holds (as ember's drain does).
        graceful_shutdown_timeout_s=options.shutdown_timeout,
        graceful_shutdown_wait_loop_s=0.5,
        health_check_period_s=5.0,
        health_check_timeout_s=30.0,
        request_router_config=RequestRouterConfig(
            request_router_class="ember.serve_ray.router:EmberRequestRouter",
            request_routing_stats_period_s=STATS_PERIOD_S,
            request_routing_stats_timeout_s=5.0,
        ),
        **sizing,
    )


def deployment(config: EngineConfig, options: ServerConfig):
    """The replicas' deployment, bound to its arguments (an application for serve.run)."""
    replica = serve.deployment(EngineReplica, **deployment_options(config, options))
    threads = options.replica_threads
    return replica.bind(config, dict(options.loras), options.max_queue, threads, options.health_stall_timeout)


def start(config: EngineConfig, options: ServerConfig) -> RayEngineClient:
    """Ray (started or joined), the replicas deployed (not waited for), and the client over them."""
    if not ray.is_initialized():
        if options.ray_address:
            ray.init(address=options.ray_address, log_to_driver=False)
        else:
            scale = options.autoscale_range()
            most = scale[1] if scale else options.replicas
            ray.init(num_cpus=max(os.cpu_count() or 1, most * options.replica_threads), log_to_driver=False)
    served = options.served_model_name or config.model
    # Converted once, here, before the replicas read it (a GGUF becomes a model directory).
    config = dataclasses.replace(config, model=str(resolve_model(config.model)))
    tokenizer = Tokenizer.from_dir(config.model, chat_template=config.chat_template)
    serve.start(http_options={"location": "NoServer"})
    handle = serve.run(deployment(config, options), name=APP_NAME, route_prefix=None, blocking=False)
    return RayEngineClient(handle, tokenizer, served)


def stop() -> None:
    """The application deleted (its replicas drained) and, if this process started Ray, Ray stopped."""
    try:
        serve.delete(APP_NAME)
    finally:
        ray.shutdown()
