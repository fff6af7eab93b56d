"""What a setting (quantization, dtype) costs in output quality, measured against the float32 reference:
`measure` and `reference` in ember.quality.fidelity, the prompt sets in .prompts, the report in .report,
`ember quality` in .cli.

The names are imported on first use (PEP 562), as in ember/__init__.py: `ember --help` imports .cli,
which must not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ember.quality.fidelity import Fidelity as Fidelity
    from ember.quality.fidelity import Reference as Reference
    from ember.quality.fidelity import measure as measure
    from ember.quality.fidelity import reference as reference

__all__ = ["Fidelity", "Reference", "measure", "reference"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'ember.quality' has no attribute '{name}'")
    value = getattr(importlib.import_module("ember.quality.fidelity"), name)
    globals()[name] = value
    return value
