"""The server-side tool loop against a client-driven loop: one task of three tool calls and an answer.

    PYTHONPATH=. .venv/bin/python benchmarks/responses_loop.py --rounds 3 --rtt-ms 0,50,150

One `ember serve --mcp calc=stdio:...` (the default model, its store in a temporary directory; this file
is also the MCP server, over stdio). Per task:
- server: one POST /v1/responses with the calc MCP tools, tool_choice required, max_tool_calls 3: the
  server runs the three calls and the answer turn itself;
- client: the same turns over /v1/chat/completions with the same tools as function tools (their schemas
  copied from the server's mcp_list_tools item): tool_choice required for three turns, then none; the
  client runs the same Python functions locally and re-sends the whole history each turn.
Both decode greedily under one output budget (--max-output-tokens for the task: the client's turns get
what is left), so they do the same turns. Rounds alternate the order (server first, then client first),
for each added client<->server round-trip time (--rtt-ms, slept by the client around each request: half
before sending, half after the answer). Reports the median end-to-end latency per task, the prompt
tokens computed (prompt - cached) per task, and per client turn how much of the prompt the prefix cache
served, against the most it could have (the previous turn's prompt and answer, whole KV blocks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent.parent
# Each task starts from its own number, so that no task's history is in the cache from an earlier one (the
# tools and the instructions before the number are, as they would be for any client).
TASK = "Start from {n}. Use the tools, one call at a time: add 2, then multiply by 2, then add 16. Then say the result."
BLOCK = 16  # KV block size: the prefix cache serves whole blocks


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


FUNCTIONS = {"add": add, "multiply": multiply}


def serve_tools() -> None:
    """This file as the MCP server (stdio) of the same functions the client runs."""
    from mcp.server.mcpserver import MCPServer

    server = MCPServer("calc", log_level="CRITICAL")
    for fn in FUNCTIONS.values():
        server.tool()(fn)
    server.run("stdio")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


class Client:
    """HTTP to the server with an injected round-trip time."""

    def __init__(self, url: str, rtt_s: float):
        self.http = httpx.Client(base_url=url, timeout=600)
        self.rtt_s = rtt_s
        self.requests = 0

    def post(self, path: str, body: dict) -> dict:
        time.sleep(self.rtt_s / 2)
        r = self.http.post(path, json=body)
        r.raise_for_status()
        time.sleep(self.rtt_s / 2)
        self.requests += 1
        return r.json()


def server_task(c: Client, model: str, budget: int, n: int) -> dict:
    body = {
        "model": model,
        "input": TASK.format(n=n),
        "tools": [{"type": "mcp", "server_label": "calc", "require_approval": "never"}],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_tool_calls": 3,
        "max_output_tokens": budget,
        "temperature": 0,
        "store": False,
    }
    r = c.post("/v1/responses", body)
    u = r["usage"]
    calls = [
        (o["name"], json.loads(o["arguments"]), o["output"]) for o in r["output"] if o["type"] == "mcp_call"
    ]
    text = "".join(p["text"] for o in r["output"] if o["type"] == "message" for p in o["content"])
    tools = next(o["tools"] for o in r["output"] if o["type"] == "mcp_list_tools")
    cached = u["input_tokens_details"]["cached_tokens"]
    return {
        "prompt": u["input_tokens"],
        "cached": cached,
        "computed": u["input_tokens"] - cached,
        "output": u["output_tokens"],
        "calls": calls,
        "answer": text,
        "tools": tools,
    }


def client_task(c: Client, model: str, budget: int, n: int, tools: list[dict]) -> dict:
    chat_tools = [
        {
            "type": "function",
            "function": {"name": t["name"], "description": t["description"], "parameters": t["input_schema"]},
        }
        for t in tools
    ]
    messages: list[dict] = [{"role": "user", "content": TASK.format(n=n)}]
    turns, calls, used, answer = [], [], 0, ""
    for turn in range(4):
        body = {
            "model": model,
            "messages": messages,
            "tools": chat_tools,
            "tool_choice": "required" if turn < 3 else "none",
            "parallel_tool_calls": False,
            "max_tokens": budget - used,
            "temperature": 0,
        }
        r = c.post("/v1/chat/completions", body)
        u = r["usage"]
        cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        turns.append({"prompt": u["prompt_tokens"], "cached": cached, "output": u["completion_tokens"]})
        used += u["completion_tokens"]
        message = r["choices"][0]["message"]
        if turn == 3 or not message.get("tool_calls"):
            answer = message.get("content") or ""
            break
        messages.append({"role": "assistant", "content": None, "tool_calls": message["tool_calls"]})
        for call in message["tool_calls"]:
            arguments = json.loads(call["function"]["arguments"])
            output = str(FUNCTIONS[call["function"]["name"]](**arguments))
            calls.append((call["function"]["name"], arguments, output))
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": output})
        if used >= budget:
            break
    # What the cache could serve of each turn: the previous turn's prompt and answer, in whole blocks.
    for prev, cur in zip(turns, turns[1:], strict=False):
        cur["cacheable"] = min(cur["prompt"], (prev["prompt"] + prev["output"]) // BLOCK * BLOCK)
    prompt = sum(t["prompt"] for t in turns)
    cached = sum(t["cached"] for t in turns)
    return {
        "prompt": prompt,
        "cached": cached,
        "computed": prompt - cached,
        "output": used,
        "calls": calls,
        "answer": answer,
        "turns": turns,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve-tools", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=3, help="tasks per mode and RTT (orders alternating)")
    ap.add_argument("--rtt-ms", default="0,50,150", help="client<->server round-trip times to add")
    ap.add_argument("--max-output-tokens", type=int, default=160, help="the task's output budget")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--engine-mode", default="process", choices=("process", "thread"))
    ap.add_argument("--out", default=str(HERE / "benchmarks" / "results" / "responses-loop.json"))
    args = ap.parse_args()
    if args.serve_tools:
        return serve_tools()
    rtts = [float(x) / 1000 for x in args.rtt_ms.split(",")]
    port = _port()
    data = Path(tempfile.mkdtemp(prefix="ember-responses-bench-"))
    tools = f"calc=stdio:{sys.executable} {Path(__file__).resolve()} --serve-tools"
    cmd = [sys.executable, "-m", "ember.cli", "serve", "--model", args.model, "--port", str(port),
           "--embedding-model", "none", "--log-level", "warning", "--data-dir", str(data),
           "--engine-mode", args.engine_mode, "--mcp", tools]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    rows: list[dict] = []
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server did not get ready")
            time.sleep(0.5)
        warm = Client(url, 0.0)
        listed = server_task(warm, args.model, args.max_output_tokens, 10)["tools"]  # and a warm-up
        client_task(warm, args.model, args.max_output_tokens, 11, listed)
        n = 20
        for i, rtt in enumerate(rtts):
            for r in range(args.rounds):
                order = ("server", "client") if (i + r) % 2 == 0 else ("client", "server")
                for mode in order:
                    c = Client(url, rtt)
                    start = time.perf_counter()
                    n += 1
                    if mode == "server":
                        got = server_task(c, args.model, args.max_output_tokens, n)
                        got.pop("tools")
                    else:
                        got = client_task(c, args.model, args.max_output_tokens, n, listed)
                    got.update(mode=mode, start=n, rtt_ms=rtt * 1000, round=r, seconds=time.perf_counter() - start,
                               requests=c.requests)  # fmt: skip
                    rows.append(got)
                    print(f"rtt {rtt * 1000:.0f} ms  {mode:6}  {got['seconds']:.2f} s  computed {got['computed']}"
                          f"  cached {got['cached']}  calls {[n for n, _, _ in got['calls']]}  answer {got['answer']!r:.40}",
                          flush=True)  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=60)
    summary = []
    for rtt in rtts:

        def med(mode: str, key: str, rtt: float = rtt) -> float:
            return statistics.median(x[key] for x in rows if x["mode"] == mode and x["rtt_ms"] == rtt * 1000)

        line = {
            "rtt_ms": rtt * 1000,
            "server_s": med("server", "seconds"),
            "client_s": med("client", "seconds"),
            "server_computed": med("server", "computed"),
            "client_computed": med("client", "computed"),
        }
        line["speedup"] = line["client_s"] / line["server_s"]
        line["computed_ratio"] = line["client_computed"] / max(line["server_computed"], 1)
        summary.append(line)
        print(f"rtt {line['rtt_ms']:.0f} ms: server {line['server_s']:.2f} s, client {line['client_s']:.2f} s "
              f"({line['speedup']:.2f}x); prompt tokens computed: server {line['server_computed']:.0f}, "
              f"client {line['client_computed']:.0f} ({line['computed_ratio']:.2f}x)")  # fmt: skip
    out = {"cpu": _cpu(), "cores": os.cpu_count(), "model": args.model, "args": vars(args), "summary": summary,
           "rows": rows}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"cpu: {out['cpu']} ({out['cores']} cores); rows in {args.out}")


if __name__ == "__main__":
    main()
