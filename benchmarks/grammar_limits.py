"""Where hostile grammars start to crash or stall llguidance: the measurements behind ember/grammar_limits.py.

Each probe compiles one generated input in a fresh process with a deadline and reports how it ended (ok,
refused, crashed, timed out) and how long it took, per stage: `grammar` (the JSON schema -> grammar
conversion), `validate` (LLMatcher.validate_grammar, no tokenizer), `matcher` (compiling against the
default model's vocabulary, what the engine does). Run: `python benchmarks/grammar_limits.py [stage]`.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
import time


def ref_chain(n: int) -> dict:
    defs = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(n)}
    defs[f"d{n}"] = {"type": "string"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


def items_nested(n: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(n):
        schema = {"type": "array", "items": schema}
    return schema


def properties_nested(n: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(n):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def lark_chain(n: int) -> str:
    return "start: r0\n" + "".join(f"r{i}: r{i + 1}\n" for i in range(n)) + f'r{n}: "x"\n'


def _probe(kind: str, n: int, stage: str, out) -> None:
    import llguidance

    t = time.perf_counter()
    if kind == "lark":
        grammar = llguidance.LLMatcher.grammar_from_lark(lark_chain(n))
    else:
        schema = {"ref": ref_chain, "items": items_nested, "properties": properties_nested}[kind](n)
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
    if stage == "validate":
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
        verdict = "refused: " + " ".join(messages)[:80] if is_error else "ok"
    elif stage == "matcher":
        import llguidance.hf

        from ember.models.catalog import DEFAULT_MODEL, resolve_model
        from ember.tokenizer import Tokenizer

        tok = Tokenizer.from_dir(resolve_model(DEFAULT_MODEL))
        llt = llguidance.hf.from_tokenizer(tok.hf, n_vocab=49152)
        t = time.perf_counter()
        m = llguidance.LLMatcher(llt, grammar, log_level=0)
        verdict = "refused: " + m.get_error()[:80] if m.is_error() else "ok"
        if not m.is_error():
            m.compute_bitmask()
    else:
        verdict = "ok"
    out.put((verdict, time.perf_counter() - t))


def probe(kind: str, n: int, stage: str, timeout: float = 60.0) -> str:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_probe, args=(kind, n, stage, q))
    start = time.perf_counter()
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        return f"timed out after {timeout:.0f} s"
    if p.exitcode != 0:
        return f"crashed (exit {p.exitcode}) after {time.perf_counter() - start:.1f} s"
    verdict, took = q.get()
    return f"{verdict} in {took:.3f} s"


if __name__ == "__main__":
    stage = sys.argv[1] if len(sys.argv) > 1 else "validate"
    kinds = sys.argv[2].split(",") if len(sys.argv) > 2 else ["ref", "lark", "items", "properties"]
    sizes = (
        [int(s) for s in sys.argv[3].split(",")] if len(sys.argv) > 3 else [100, 500, 1000, 2000, 3000, 5000]
    )
    for kind in kinds:
        for n in sizes:
            size = (
                len(lark_chain(n))
                if kind == "lark"
                else len(
                    json.dumps(
                        globals()[
                            {"ref": "ref_chain", "items": "items_nested", "properties": "properties_nested"}[
                                kind
                            ]
                        ](n)
                    )
                )
            )
            print(f"{kind:10} n={n:5} ({size / 1024:.0f} KiB) {stage}: {probe(kind, n, stage)}", flush=True)
