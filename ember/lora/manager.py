"""The adapters an engine knows, and which of them sit in the model's slots right now.

Registered adapters (any number) wait in host memory. A sequence that needs one acquires it when the
scheduler admits it: an adapter already in a slot just gains a user; otherwise it is copied into a free
slot, or into the least recently used slot nobody is using. When every slot is in use by running
sequences, the sequence waits; sequences of resident adapters are never held up by it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

from torch import nn

from ember.errors import InvalidRequest
from ember.lora.adapter import AdapterError, LoRAAdapter
from ember.models.config import ModelConfig
from ember.models.lora import load_slot

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def content_id(adapter: LoRAAdapter) -> str:
    """A digest of what the adapter computes (its weights, scaling folded in): the prefix cache keys on
    it, so a new version under an old name never reuses the old one's KV, and identical adapters share."""
    digest = hashlib.sha256()
    for (layer, module), (a, b) in sorted(adapter.weights.items()):
        digest.update(f"{layer}.{module}:{tuple(a.shape)}:{tuple(b.shape)}".encode())
        digest.update(a.contiguous().numpy().tobytes())
        digest.update(b.contiguous().numpy().tobytes())
    return "sha256:" + digest.hexdigest()


class LoRAManager:
    def __init__(self, model: nn.Module, cfg: ModelConfig, max_loras: int, max_rank: int, max_adapters: int):
        self.model = model
        self.cfg = cfg
        self.max_rank = max_rank
        self.max_adapters = max_adapters
        self.adapters: dict[str, LoRAAdapter] = {}
        self.slot_of: dict[str, int] = {}
        self.users = [0] * max_loras  # running sequences per slot
        self.holder: list[str | None] = [None] * max_loras
        self._idle: OrderedDict[int, None] = OrderedDict((s, None) for s in range(max_loras))  # LRU first
        self.num_loads = 0  # copies into a slot

    # -- registry -----------------------------------------------------------------------------------

    def add(self, name: str, path: str | Path) -> LoRAAdapter:
        # ':' only in the fine-tuned models' own names, ft:BASE:SUFFIX:ID (the API's job names them).
        if not name or set(name) - _NAME_CHARS - (set(":") if name.startswith("ft:") else set()):
            raise AdapterError(f"adapter name '{name}' must be letters, digits, '-', '_' or '.'")
        if name in self.adapters:
            raise AdapterError(f"an adapter named '{name}' is already loaded")
        if len(self.adapters) >= self.max_adapters:
            raise AdapterError(f"{len(self.adapters)} adapters are loaded, the most this server holds")
        adapter = LoRAAdapter.load(name, path, self.cfg, self.max_rank)
        adapter.uid = content_id(adapter)
        self.adapters[name] = adapter
        return adapter

    def remove(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(name)
        slot = self.slot_of.get(name)
        if slot is not None and self.users[slot]:
            raise AdapterError(f"adapter '{name}' is in use by {self.users[slot]} running sequences")
        if slot is not None:
            del self.slot_of[name]
            self.holder[slot] = None
            self.model.lora.present[slot] = set()
            self.model.lora.ranks[slot] = 0
            self._idle.move_to_end(slot, last=False)  # empty: the first to reuse
        del self.adapters[name]

    def check(self, name: str) -> None:
        if name not in self.adapters:
            raise InvalidRequest(
                f"no LoRA adapter named '{name}' is loaded", param="model", code="model_not_found"
            )

    # -- slots ----------------------------------------------------------------------------------------

    def acquire(self, name: str) -> int | None:
        """The slot holding `name`, loading it if needed; None when every slot is busy."""
        slot = self.slot_of.get(name)
        if slot is None:
            if not self._idle:
                return None
            slot, _ = self._idle.popitem(last=False)
            old = self.holder[slot]
            if old is not None:
                del self.slot_of[old]
            load_slot(self.model, slot, self.adapters[name].weights)
            self.holder[slot] = name
            self.slot_of[name] = slot
            self.num_loads += 1
        elif self.users[slot] == 0:
            del self._idle[slot]
        self.users[slot] += 1
        return slot

    def release(self, name: str) -> None:
        slot = self.slot_of[name]
        self.users[slot] -= 1
        if self.users[slot] == 0:
            self._idle[slot] = None  # most recently used: evicted last
