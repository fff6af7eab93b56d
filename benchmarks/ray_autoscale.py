"""Autoscaling end to end: `ember serve --ray --autoscale 1:2`, load rises, a second replica starts and
takes traffic; load stops, it scales back to one, and no request fails on the way.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/ray_autoscale.py [--burst 8 --seconds 60]

Phases: a trickle (one request at a time) throughout; a burst of --burst concurrent requests for
--seconds on top; then the trickle alone until the replica count is back to one. Replicas are counted by
their process title under this server's process. Prints a timeline (replicas, requests done, failures) and
exits non-zero if a request failed or either scaling step did not happen.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

HERE = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
TITLE = "ServeReplica:ember:engine"


def replicas(server: subprocess.Popen) -> int:
    kids = psutil.Process(server.pid).children(recursive=True)
    return sum(1 for p in kids if TITLE in " ".join(p.cmdline()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--burst", type=int, default=8, help="concurrent requests while the load is high")
    ap.add_argument("--seconds", type=float, default=60.0, help="how long the load stays high")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for each scaling step")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(HERE), "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [
        sys.executable,
        "-m",
        "ember.cli",
        "serve",
        "--ray",
        "--autoscale",
        "1:2",
        "--autoscale-target",
        "2",
    ]
    cmd += ["--port", str(port), "--embedding-model", "none", "--log-level", "warning"]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    done, failed, stop = [0], [], threading.Event()
    high = threading.Event()

    def worker(burst: bool) -> None:
        with httpx.Client(base_url=url, timeout=300) as client:
            while not stop.is_set():
                if burst and not high.is_set():
                    return
                body = {"model": MODEL, "prompt": "Count:", "max_tokens": 32, "ignore_eos": True}
                r = client.post("/v1/completions", json=body)
                if r.status_code == 200:
                    done[0] += 1
                else:
                    failed.append(f"{r.status_code} {r.text[:200]}")

    ok = True
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        start = time.monotonic()

        def log(what: str) -> None:
            print(
                f"{time.monotonic() - start:6.1f}s replicas={replicas(server)} done={done[0]} "
                f"failed={len(failed)} {what}",
                flush=True,
            )

        trickle = threading.Thread(target=worker, args=(False,))
        trickle.start()
        high.set()
        burst = [threading.Thread(target=worker, args=(True,)) for _ in range(args.burst)]
        for t in burst:
            t.start()
        log("load high")
        up_at = None
        while time.monotonic() - start < max(args.seconds, 1.0) or (
            up_at is None and time.monotonic() - start < args.timeout
        ):
            time.sleep(2)
            if up_at is None and replicas(server) >= 2:
                up_at = time.monotonic() - start
                log("scaled up")
        high.clear()
        for t in burst:
            t.join()
        log("load low (the trickle goes on)")
        down_at = None
        low_start = time.monotonic()
        while time.monotonic() - low_start < args.timeout:
            time.sleep(2)
            if replicas(server) == 1:
                down_at = time.monotonic() - start
                log("scaled down")
                break
        stop.set()
        trickle.join()
        log("end")
        print(f"scaled up at {up_at}, down at {down_at}; {done[0]} requests, {len(failed)} failed")
        for f in failed[:5]:
            print("failed:", f)
        ok = up_at is not None and down_at is not None and not failed
    finally:
        stop.set()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
