"""A request's grammar checked before the engine compiles it: in a worker process, with a deadline.

llguidance is native code: an input past what it handles can crash the process that compiles it (a
segfault, which no `except` catches) or compile for a long time. The engine compiles grammars in its own
process, so a crash there would fail every request after it. Here the client side (the HTTP process, or
the caller of an offline engine) first converts and validates the grammar in a small worker process: a
crash kills only the worker, a compile past the deadline is killed, and either way only that request is
refused. The structural limits (ember/grammar_limits.py) run before, so the worker rarely sees anything
hostile. Results are cached by the constraint's text: a schema sent again costs a dictionary lookup.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import threading
from collections import OrderedDict
from pathlib import Path

from ember.errors import InvalidRequest
from ember.structured_outputs import StructuredOutputs, explain_error

log = logging.getLogger(__name__)

TIMEOUT_S = 5.0  # normal grammars validate in milliseconds (benchmarks/GRAMMAR_LIMITS.md)


class GrammarChecker:
    """`check(structured)` leaves the llguidance grammar on `structured` (what the engine compiles) or
    raises InvalidRequest. Thread-safe; up to `max_workers` checks run at once, each in its process."""

    def __init__(self, timeout_s: float = TIMEOUT_S, max_workers: int = 2, max_cached: int = 1024):
        self.timeout_s = timeout_s
        self.max_workers = max_workers
        self.max_cached = max_cached
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._live = 0  # workers started and not yet closed (idle or busy)
        self._closed = False
        self._cache: OrderedDict[tuple[str, str], tuple] = OrderedDict()

    def check(self, structured: StructuredOutputs) -> None:
        key = structured.checked_key()  # the structural limits, then the text to compile and cache by
        with self._cond:
            verdict = self._cache.get(key)
            if verdict is not None:
                self._cache.move_to_end(key)
        if verdict is None:
            verdict = self._run(key)
            with self._cond:
                self._cache[key] = verdict
                while len(self._cache) > self.max_cached:
                    self._cache.popitem(last=False)
        if verdict[0] != "ok":
            raise InvalidRequest(verdict[1], param=verdict[2], code=verdict[3])
        structured.set_grammar(verdict[1])

    def _run(self, key: tuple[str, str]) -> tuple:
        worker = self._acquire()
        try:
            verdict = worker.ask(key, self.timeout_s)
            if verdict is None:
                log.warning("a grammar took over %.0f s to compile: refused", self.timeout_s)
                why = f"the grammar is too complex: compiling it took over {self.timeout_s:.0f} s"
        except (EOFError, OSError, ValueError):  # the worker died under it: a crash in the grammar library
            log.warning("compiling a grammar crashed the grammar checker: refused")
            verdict = None
            why = "the grammar is too complex: the grammar compiler failed on it"
        except BaseException:
            worker.close()
            self._release(None)
            raise
        if verdict is None:
            worker.close()
            self._release(None)
            return ("refused", why, "response_format", "grammar_too_complex")
        self._release(worker)
        return verdict

    def _acquire(self) -> _Worker:
        with self._cond:
            while not self._idle and self._live >= self.max_workers:
                self._cond.wait()
            if self._closed:
                raise InvalidRequest("the server is shutting down", param=None)
            if self._idle:
                return self._idle.pop()
            self._live += 1
        try:
            return _Worker()
        except BaseException:
            with self._cond:
                self._live -= 1
                self._cond.notify()
            raise

    def _release(self, worker: _Worker | None) -> None:
        with self._cond:
            if worker is None:
                self._live -= 1
            elif self._closed:
                self._live -= 1
                worker.close()
            else:
                self._idle.append(worker)
            self._cond.notify()

    def close(self) -> None:
        """Stop the idle workers (a busy one stops when its check ends)."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._live -= len(idle)
            self._cond.notify_all()
        for worker in idle:
            worker.close()


class _Worker:
    """`python -m ember.grammar_check`, one JSON line each way. A plain subprocess rather than
    multiprocessing's spawn, which would import the caller's main module again (an offline script
    without a `__main__` guard would run twice)."""

    def __init__(self):
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)  # where this ember is imported from
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ember.grammar_check"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            encoding="utf-8",
        )

    def ask(self, key: tuple[str, str], timeout_s: float) -> tuple | None:
        """The worker's verdict; None past the deadline. EOFError or OSError if the worker died."""
        self.proc.stdin.write(json.dumps(key) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        if not line:
            raise EOFError("the grammar worker exited")
        return tuple(json.loads(line))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


def _serve() -> None:
    """The worker's loop: [kind, text] in; ["ok", grammar] or ["refused", message, param, code] out."""
    import llguidance

    for line in sys.stdin:
        try:
            kind, text = json.loads(line)
            grammar = _structured(kind, text).grammar_text()
            is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
            if is_error:
                reply = ["refused", explain_error("\n".join(messages)), "response_format", None]
            else:
                reply = ["ok", grammar]
        except InvalidRequest as exc:
            reply = ["refused", str(exc), exc.param, exc.code]
        except Exception as exc:  # RecursionError, MemoryError: this input is past what can be compiled
            reply = ["refused", f"the grammar is too complex: {type(exc).__name__}", "response_format", None]
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


def _structured(kind: str, text: str) -> StructuredOutputs:
    if kind == "json":
        return StructuredOutputs(json=text)
    if kind == "json_object":
        return StructuredOutputs(json_object=True)
    if kind == "choice":
        return StructuredOutputs(choice=json.loads(text))
    return StructuredOutputs(**{kind: text})


if __name__ == "__main__":
    _serve()
