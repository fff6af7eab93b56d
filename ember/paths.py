"""Where ember keeps what it builds or converts on first use (GGUF conversions, compiled kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def ember_cache_dir() -> Path:
    """`$EMBER_CACHE_DIR`, else ~/.cache/ember."""
    return Path(os.environ.get("EMBER_CACHE_DIR") or "~/.cache/ember").expanduser()


def ember_adapter_dir() -> Path:
    """Where ember's own LoRA adapters live (tuned ones, downloads): always an adapter root of a server."""
    return ember_cache_dir() / "adapters"


def ember_data_dir() -> Path:
    """What ember keeps for its users (uploaded files, fine-tuning jobs, their adapters): `$EMBER_DATA_DIR`,
    else a `data` directory in the cache dir."""
    return Path(os.environ.get("EMBER_DATA_DIR") or ember_cache_dir() / "data").expanduser()
