"""The prefix cache keys an adapter's KV by its content: a new version under the same name never shares
KV with the old one; the same weights under any name do."""

from __future__ import annotations

import torch

from ember.engine.kv_cache import root_hash
from ember.lora.adapter import LoRAAdapter
from ember.lora.manager import content_id


def adapter(name: str, seed: int) -> LoRAAdapter:
    g = torch.Generator().manual_seed(seed)
    weights = {(0, "q_proj"): (torch.randn(4, 16, generator=g), torch.randn(16, 4, generator=g))}
    return LoRAAdapter(name, "/nowhere", 4, 2.0, weights)


def test_the_cache_key_follows_the_weights_not_the_name():
    old, new, same = adapter("ft:m::1", 0), adapter("ft:m::1", 1), adapter("other", 0)
    assert content_id(old) != content_id(new)
    assert content_id(old) == content_id(same)
    assert root_hash(b"ns", content_id(old)) != root_hash(b"ns", content_id(new))
