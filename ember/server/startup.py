"""What `ember serve` checks before it loads anything, and what it says once it is up.

The listening socket is bound first, so a port in use or out of range fails in a second rather than after
the model has loaded; the socket is then handed to uvicorn as it is, leaving no window for another
process to take the port. A device the installed torch cannot drive fails as fast.
"""

from __future__ import annotations

import errno
import socket

from ember.config import EngineConfig, ServerConfig
from ember.engine.messages import EngineInfo
from ember.models.catalog import describe_source

CUDA_HELP = (
    "install a CUDA build of torch, e.g. `pip install torch --index-url https://download.pytorch.org/whl/cu128` "
    "(pick the CUDA version of your driver), or serve with --device cpu"
)


class StartupError(ValueError):
    """ember serve cannot start as configured; the message says what to change."""


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (not yet listening), or StartupError naming the fix."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise StartupError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart reuses the port
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(
                f"port {port} on {host} is already in use (another server?); stop it or pick another --port"
            ) from None
        if exc.errno == errno.EACCES:
            raise StartupError(
                f"no permission to listen on port {port}; pick one above 1023 with --port"
            ) from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise StartupError(f"--host {host} is not an address of this machine") from None
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def check_device(device: str) -> None:
    """StartupError at once when `device` needs what the installed torch lacks."""
    if not device.startswith("cuda"):
        return
    import torch

    if torch.version.cuda is None:
        raise StartupError(
            f"--device {device}: this torch ({torch.__version__}) is built without CUDA; {CUDA_HELP}"
        )
    if not torch.cuda.is_available():
        raise StartupError(
            f"--device {device}: torch {torch.__version__} has CUDA {torch.version.cuda} but sees no GPU "
            "(check the driver and CUDA_VISIBLE_DEVICES), or serve with --device cpu"
        )


def summary(
    config: EngineConfig, options: ServerConfig, info: EngineInfo, served_name: str, url: str
) -> list[str]:
    """The start-up report: what is served, from where, on what, with how much room; then the ready line."""
    spec = config.speculative
    if spec.method is None:
        speculative = "off"
    else:
        speculative = spec.method if spec.method == "ngram" else f"draft model {spec.draft_model}"
        speculative += f", k={spec.num_speculative_tokens}"
    lines = [
        f"model: {served_name} ({describe_source(config.model)})",
        f"device: {config.device}, dtype: {config.dtype}, quantization: {config.quantization or 'none'}"
        + (f" (auto: {config.auto_choice.reason})" if config.auto_choice is not None else ""),
        f"context length: {info.max_model_len} tokens",
        f"KV cache: {info.num_blocks} blocks x {info.block_size} tokens = {info.pool_tokens} tokens"
        f"{', prefix caching on' if config.cache.enable_prefix_caching else ''}",
        f"batching: up to {config.scheduler.max_num_seqs} sequences, "
        f"{config.scheduler.max_num_batched_tokens} tokens per step; queue {options.max_queue}",
        f"embeddings: {options.embedding_model or 'off'}",
        f"speculative decoding: {speculative}",
        f"LoRA: {', '.join(options.loras) or ('on' if config.lora.enabled else 'off')}",
        f"API keys: {len(options.api_keys) or 'none (open)'}; admin key: {'set' if options.admin_key else 'none'}",
        f"ready on {url} (OpenAI API at {url}/v1)",
    ]
    return lines


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
