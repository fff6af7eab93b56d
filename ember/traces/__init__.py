"""Stored chat completions (issue 20's capture): the recorder the chat route captures through, the
redaction applied before a trace is written, and `select`, what datasets are built from.

    recorder = TraceRecorder(store, TraceSettings(always=True))  # ServerState.recorder
    await recorder.flush()  # everything captured so far is committed
    rows = select(store, tenant, metadata={"task": "support"}, min_score=0.5)

Names are imported on first use, so that the server's config can check trace settings without loading
the server.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "Redactor": "ember.traces.redact",
    "Retention": "ember.traces.query",
    "select": "ember.traces.query",
    "TraceRecorder": "ember.traces.recorder",
    "TraceSettings": "ember.traces.recorder",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'ember.traces' has no attribute '{name}'")
    return getattr(importlib.import_module(_WHERE[name]), name)
