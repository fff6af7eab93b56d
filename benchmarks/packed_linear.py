"""float32 projections on the CPU: F.linear (MKL sgemm) against oneDNN on reordered weights, one run.

    .venv/bin/python benchmarks/packed_linear.py

Per projection shape of the default model, microseconds per call at several row counts; then a whole
model step (one decode token, and a 5-token chunk as speculative verification scores) with the dense and
the packed projections, same process, same weights.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ember import LLM
from ember.models.packed import PackedLinear, unpack_model

ROWS = (1, 2, 5, 16, 256)


def per_call_us(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e6


def step_ms(runner, n: int, reps: int = 10) -> float:
    tokens, table = list(range(1000, 1300)), list(range(20))
    work = [(tokens[250 : 250 + n], 250, n, table)]  # n new tokens after 250 in the cache
    return per_call_us(lambda: runner.execute(work, [0], None, [n]), reps) / 1e3


@torch.inference_mode()
def main() -> None:
    torch.manual_seed(0)
    print("| weight | rows | F.linear us | packed us | speed-up |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, (out_f, in_f) in {
        "qkv 960 x 576": (960, 576),
        "gate_up 3072 x 576": (3072, 576),
        "down 576 x 1536": (576, 1536),
        "LM head 49152 x 576": (49152, 576),
    }.items():
        linear = torch.nn.Linear(in_f, out_f, bias=False)
        packed = PackedLinear(linear)
        for rows in ROWS:
            x = torch.randn(rows, in_f)
            reps = max(5, 2000 // rows if out_f < 10000 else 200 // rows)
            dense = per_call_us(lambda x=x, linear=linear: F.linear(x, linear.weight), reps)
            fast = per_call_us(lambda x=x, packed=packed: packed(x), reps)
            print(f"| {name} | {rows} | {dense:.0f} | {fast:.0f} | {dense / fast:.2f}x |")
    llm = LLM(kv_cache_memory="64MiB")
    runner = llm.engine.runner
    packed_steps = {n: step_ms(runner, n) for n in (1, 5)}
    unpack_model(llm.engine.model)
    dense_steps = {n: step_ms(runner, n) for n in (1, 5)}
    print("\n| default model step | F.linear ms | packed ms | speed-up |")
    print("| --- | ---: | ---: | ---: |")
    for n, label in ((1, "decode, 1 token"), (5, "verify, 5 tokens")):
        d, p = dense_steps[n], packed_steps[n]
        print(f"| {label} | {d:.1f} | {p:.1f} | {d / p:.2f}x |")


if __name__ == "__main__":
    main()
