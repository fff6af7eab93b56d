"""One-stream CPU decode speed: the default model, a 256-token prompt, greedy tokens with EOS ignored.

    PYTHONPATH=. .venv/bin/python benchmarks/cpu_decode.py --threads 2 --quantization q4_1

Prints, per round, decode tokens/s (wall) and CPU milliseconds per token (the process's CPU time: on a
shared machine it moves far less than the wall clock, so A/B pairs compare it). The prefill is taken out by
subtracting a one-token run of the same prompt. `EMBER_CPU_ISA=avx2` runs the AVX2 block kernels on an
AVX-512 CPU.
"""

from __future__ import annotations

import argparse
import time

import torch

from ember.llm import LLM
from ember.sampling_params import SamplingParams

PROMPT = list(range(1000, 1256))


def _timed(llm: LLM, tokens: int) -> tuple[float, float, int]:
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    cpu, wall = time.process_time(), time.perf_counter()
    out = llm.generate(PROMPT, params)
    return time.process_time() - cpu, time.perf_counter() - wall, len(out[0].outputs[0].token_ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quantization", default="q4_1")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(quantization=args.quantization, seed=0)
    _timed(llm, 4)  # warm-up: kernels built and loaded, caches touched
    for _ in range(args.rounds):
        cpu1, wall1, _ = _timed(llm, 1)
        cpu, wall, n = _timed(llm, args.tokens)
        steps = n - 1
        print(
            f"decode {steps / (wall - wall1):.1f} tok/s  cpu {1000 * (cpu - cpu1) / steps:.2f} ms/token",
            flush=True,
        )


if __name__ == "__main__":
    main()
