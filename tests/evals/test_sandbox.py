"""The python grader's sandbox: a score comes back; a busy loop, a memory hog, a network call, a crash
and a grader with no grade() each give an error (and the server's process is untouched)."""

from __future__ import annotations

import asyncio
import time

import pytest

from ember.evals.criteria import check_criteria
from ember.evals.graders import grade
from ember.evals.sandbox import network_isolation, run_grader


def sandboxed(source: str, **kw):
    return asyncio.run(run_grader(source, {"output_text": "4"}, {"answer": "4"}, **kw))


def test_a_grader_scores_the_sample_against_the_item():
    source = "def grade(sample, item):\n    print('noise')\n    return float(sample['output_text'] == item['answer'])"
    grader = {"type": "python", "name": "p", "source": source, "pass_threshold": 0.5}
    got = asyncio.run(grade(check_criteria([grader])[0], {"answer": "4"}, {"output_text": "4"}, None))
    assert (got.score, got.passed, got.error) == (1.0, True, None)


def test_the_time_limit_stops_a_busy_loop():
    start = time.monotonic()
    got = sandboxed("def grade(s, i):\n    while True:\n        pass", timeout_s=1.0)
    assert got.score is None and "time limit" in got.error
    assert time.monotonic() - start < 5


def test_the_memory_limit_stops_a_hog():
    got = sandboxed("def grade(s, i):\n    x = bytearray(1 << 30)\n    return 1.0", memory_bytes=256 << 20)
    assert got.score is None and "memory" in got.error


@pytest.mark.parametrize(
    "source",
    [
        "def grade(s, i):\n    import socket\n    socket.create_connection(('127.0.0.1', 9))",
        "def grade(s, i):\n    import urllib.request\n    urllib.request.urlopen('http://127.0.0.1:9')",
    ],
)
def test_sockets_are_refused(source):
    got = sandboxed(source)
    assert got.score is None and "network access is not allowed" in got.error


def test_the_raw_socket_module_reaches_no_network_where_namespaces_exist():
    if not network_isolation():
        pytest.skip("this kernel does not give unprivileged users a network namespace")
    got = sandboxed("def grade(s, i):\n    import _socket\n    _socket.socket().connect(('127.0.0.1', 9))")
    assert got.score is None and "unreachable" in got.error.lower()


def test_writing_files_is_refused():
    got = sandboxed(
        "def grade(s, i):\n    with open('x', 'w') as f:\n        f.write('a' * 10)\n    return 1.0"
    )
    assert got.score is None and "File too large" in got.error


@pytest.mark.parametrize(
    "source,error",
    [
        ("def grade(s, i):\n    raise ValueError('bad item')", "ValueError: bad item"),
        ("def grade(s, i):\n    import os\n    os._exit(3)", "exit status 3"),
        ("def grade(s, i):\n    import os, signal\n    os.kill(os.getpid(), signal.SIGSEGV)", "signal"),
        ("def grade(s, i):\n    return 'high'", "ValueError"),
        ("x = 1", "no function grade"),
    ],
)
def test_a_crashing_grader_is_an_error(source, error):
    got = sandboxed(source)
    assert got.score is None and error in got.error
