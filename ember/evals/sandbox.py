"""The `python` grader's sandbox: the user's `grade(sample, item) -> float` runs in a child process.

What is enforced on the child:
- wall time: the parent kills it after `timeout_s`; RLIMIT_CPU, a second later, is the backstop (at the
  same bound a busy loop could reach the CPU limit first and die by SIGKILL, unreported as a time limit);
- memory: RLIMIT_AS (address space) of `memory_bytes`, hard limit too, so the code cannot raise it;
- files: RLIMIT_FSIZE 0 (it cannot write a byte to a file), RLIMIT_CORE 0;
- network: where unprivileged user namespaces exist (`unshare --net --map-root-user`), the child runs in
  a network namespace of its own with no interface up, so no socket reaches anything; everywhere, before
  the user's code runs, `socket.socket` and friends are replaced by functions that refuse. The second is
  a Python-level guard only (ctypes could go around it); the first is the kernel's.
- interpreter: `python -I` (no user site, no PYTHON* variables), an empty environment, cwd a fresh
  temporary directory.
Not enforced: reading files the server's user can read. Run untrusted graders only on a server whose
user can read nothing secret, or in a container.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

TIMEOUT_S = 5.0
MEMORY_BYTES = 512 << 20
MAX_OUTPUT = 1 << 20  # what the child may write back

# Runs in the child: limits, the network guard, then the user's source and its grade().
_BOOT = r"""
import json, resource, socket, sys
limits = json.loads(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limits["memory"], limits["memory"]))
resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu"], limits["cpu"]))
resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
def _refused(*a, **k):
    raise PermissionError("network access is not allowed in a python grader")
class _NoSocket(socket.socket):
    def __init__(self, *a, **k):
        _refused()
socket.socket = _NoSocket
for _name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
    setattr(socket, _name, _refused)
job = json.loads(sys.stdin.read())
out = sys.stdout
sys.stdout = sys.stderr  # the user's prints do not corrupt the answer
try:
    scope = {"__name__": "grader"}
    exec(compile(job["source"], "<grader>", "exec"), scope)
    if not callable(scope.get("grade")):
        raise NameError("the source defines no function grade(sample, item)")
    score = scope["grade"](job["sample"], job["item"])
    answer = {"score": float(score)}
except MemoryError:
    answer = {"error": "MemoryError: the grader went over its memory limit"}
except BaseException as exc:
    answer = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
out.write(json.dumps(answer))
out.flush()
"""


@dataclass
class Outcome:
    score: float | None
    error: str | None = None


@functools.cache
def network_isolation() -> list[str]:
    """The command prefix that puts the child in an empty network namespace, or [] where the kernel does
    not let this user make one."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return []
    prefix = [unshare, "--net", "--map-root-user"]
    try:
        ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return prefix if ok else []


async def run_grader(
    source: str, sample: dict, item: dict, timeout_s: float = TIMEOUT_S, memory_bytes: int = MEMORY_BYTES
) -> Outcome:
    """The score `grade(sample, item)` returns, or why there is none (an exception, a limit)."""
    limits = json.dumps({"memory": int(memory_bytes), "cpu": int(timeout_s + 0.999) + 1})
    job = json.dumps({"source": source, "sample": sample, "item": item}).encode()
    isolation = await asyncio.to_thread(network_isolation)  # probed once, off the event loop
    with tempfile.TemporaryDirectory(prefix="ember-grader-") as cwd:
        proc = await asyncio.create_subprocess_exec(
            *isolation,
            sys.executable,
            "-I",
            "-c",
            _BOOT,
            limits,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            cwd=cwd,
            env={},
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(job), timeout_s)
        except TimeoutError:
            return Outcome(None, f"the grader ran past its time limit of {timeout_s:g} s")
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
    if not out:
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
        return Outcome(None, f"the grader process died ({how}) without an answer")
    try:
        answer = json.loads(out[:MAX_OUTPUT])
    except ValueError:
        return Outcome(None, "the grader process wrote something that is not its answer")
    if "error" in answer:
        return Outcome(None, answer["error"])
    return Outcome(answer["score"])
