"""The default model's tokenizer (SmolLM2: byte-level BPE, ChatML template), built without a hub.

Test modules wrap it in a fixture of their own: `@pytest.fixture(scope="module") def tok(): return
smollm2_tokenizer()`. (Importing a fixture function into a module trips ruff's F811 on every test.)
"""

from __future__ import annotations

import functools

from ember.models.catalog import DEFAULT_MODEL, resolve_model
from ember.tokenizer import Tokenizer


@functools.cache
def smollm2_tokenizer() -> Tokenizer:
    """From the catalog's converted copy of the default model (converted once, then cached on disk)."""
    return Tokenizer.from_dir(resolve_model(DEFAULT_MODEL))
