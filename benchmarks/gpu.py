"""The GPU checks and measurements of the CUDA backend, in one run of under 8 minutes on an H200.

    python3 benchmarks/gpu.py --out $OUT            # on the GPU machine (random-weight models, no downloads)
    python benchmarks/gpu.py --dry-run --out /tmp/g  # anywhere: tiny shapes, kernels under Triton's interpreter

Sections, each recorded as it finishes (results.json and results.md under --out, rewritten after every
section, so a run cut short still reports what it measured):
  ceilings   device-to-device copy bandwidth (bytes read + written) and a bf16 matmul's TFLOP/s
  kernels    every Triton kernel vs a float64 reference on fresh random inputs, outputs poisoned first
  hf         greedy tokens and first-step logits of ember vs HF transformers on a random-weight Llama
  decode     Llama-3-8B-shaped random model in bf16: ms per decode step at batch 1/8/32/64, with and
             without CUDA graphs, against the floor (weight + KV bytes) / measured copy bandwidth
  throughput prefill 512 + decode 256 at batch 1/8/32/128: ember's runner loop vs HF `generate`
  lora       decode at batch 32 with 32 distinct rank-16 adapters (all seven projections) vs the base

Everything needed is in the repo: the models are random-weight, built on the device from their shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ember.backends.registry import cuda_backend  # noqa: E402
from ember.engine.model_runner import ModelRunner  # noqa: E402
from ember.models.attention import AttentionMetadata, PrefillChunk, _prefill, decode_reference  # noqa: E402
from ember.models.config import ModelConfig  # noqa: E402
from ember.models.llama import LlamaForCausalLM  # noqa: E402
from ember.models.lora import enable_lora  # noqa: E402

BS = 16


@dataclass
class Shapes:
    """The sizes of one run: the real ones on a GPU, tiny ones for --dry-run."""

    model: dict  # HF LlamaConfig fields of the measured model
    small: dict  # of the model compared with HF token for token
    decode_batches: tuple[int, ...]
    decode_context: int
    decode_steps: int
    tput_batches: tuple[int, ...]
    tput_input: int
    tput_output: int
    lora_batch: int
    lora_rank: int
    copy_bytes: int
    matmul: int


LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    rope_theta=500000.0,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
)
SMALL = dict(
    vocab_size=2048,
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=512,
)
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=128,
)
GPU = Shapes(LLAMA3_8B, SMALL, (1, 8, 32, 64), 512, 64, (1, 8, 32, 128), 512, 256, 32, 16, 2**32, 8192)
DRY = Shapes(TINY, TINY, (1, 3), 40, 2, (1, 2), 20, 3, 3, 8, 2**20, 64)


class Report:
    """Results as they come: JSON for machines, markdown for people, both rewritten after each section."""

    def __init__(self, out: Path, meta: dict):
        self.out, self.data = out, {"meta": meta, "sections": {}}
        out.mkdir(parents=True, exist_ok=True)

    def section(self, name: str, fn, *args) -> dict | None:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            result = fn(*args)
            entry = {"ok": True, **result}
        except Exception as exc:  # one failed section must not cost the others' numbers
            traceback.print_exc()
            entry, result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}, None
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        self.data["sections"][name] = entry
        print(json.dumps(entry, indent=1, default=str), flush=True)
        self.write()
        return result

    def write(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.data, indent=1, default=str))
        lines = ["# ember on the GPU: benchmarks/gpu.py", ""]
        lines += [f"- {k}: {v}" for k, v in self.data["meta"].items()]
        for name, entry in self.data["sections"].items():
            lines += ["", f"## {name} ({entry['seconds']} s)", ""]
            for key, value in entry.items():
                if isinstance(value, list) and value and isinstance(value[0], dict):
                    cols = list(value[0])
                    lines += ["", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
                    lines += ["| " + " | ".join(str(row.get(c, "")) for c in cols) + " |" for row in value]
                    lines.append("")
                elif key != "seconds":
                    lines.append(f"- {key}: {value}")
        (self.out / "results.md").write_text("\n".join(lines) + "\n")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, reps: int) -> float:
    """Mean seconds of fn() over reps runs, after one warm-up."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps


# ---------------------------------------------------------------------------------------------- ceilings


def ceilings(device: torch.device, s: Shapes) -> dict:
    src = torch.randn(s.copy_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    sec = timed(lambda: dst.copy_(src), device, 10)
    n = s.matmul
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    mm = timed(lambda: a @ b, device, 10)
    return {
        "copy_GBps": round(2 * src.numel() * 2 / sec / 1e9, 1),
        "bf16_matmul_TFLOPs": round(2 * n**3 / mm / 1e12, 1),
    }


# ----------------------------------------------------------------------------------------------- kernels


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.isnan().any():
        return float("nan")  # an element left unwritten (the output was poisoned with NaN)
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def kernels(device: torch.device, s: Shapes) -> dict:
    from ember.backends import reference
    from ember.kernels.triton import attention, cache, lora, norm

    dt = torch.bfloat16
    d = s.model["head_dim"]
    hidden, inter = s.model["hidden_size"], s.model["intermediate_size"]
    rows = []
    g = torch.Generator(device=device).manual_seed(int(time.time()))

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dt)

    num_blocks = 256
    for group in (1, 4, 8):
        hkv = 8 if device.type == "cuda" else 1
        kc, vc = rand(hkv, num_blocks, BS, d), rand(hkv, num_blocks, BS, d)
        lens = torch.tensor([1, 17, 300, 1000] if device.type == "cuda" else [1, 17, 33], device=device)
        width = -(-int(lens.max()) // BS)
        tables = torch.stack([torch.randperm(num_blocks, device=device)[:width] for _ in lens])
        q = rand(len(lens), hkv * group, d)
        meta = AttentionMetadata(torch.empty(0), len(lens), tables, lens, [], BS, None, int(lens.max()))
        ref = decode_reference(q.double(), kc.double(), vc.double(), meta, d**-0.5)
        out = torch.full_like(q, float("nan"))
        attention.decode_attention(q, kc, vc, tables, lens, d**-0.5, out)
        rows.append({"kernel": f"decode_attention GQA {group}", "rel_err": rel(out, ref)})
        chunks = [(5, 21), (37, 37), (3, int(lens.max()))]
        starts = torch.tensor([0, 5, 42], device=device)
        qq = rand(45, hkv * group, d)
        out = torch.full_like(qq, float("nan"))
        attention.prefill_attention(
            qq, kc, vc, starts, torch.tensor([c[0] for c in chunks], device=device),
            torch.tensor([c[1] for c in chunks], device=device), tables[[0, 2, 3 % len(lens)]], 37, d**-0.5, out,
        )  # fmt: skip
        ref = torch.cat(
            [
                _prefill(
                    qq[st : st + n].double(),
                    kc.double(),
                    vc.double(),
                    PrefillChunk(st, n, c, tables[[0, 2, 3 % len(lens)]][i]),
                    d**-0.5,
                )
                for i, (st, (n, c)) in enumerate(zip(starts.tolist(), chunks, strict=True))
            ]
        )
        rows.append({"kernel": f"prefill_attention GQA {group}", "rel_err": rel(out, ref)})
    hq, hkv = s.model["num_attention_heads"], s.model["num_key_value_heads"]
    t = 37
    qkv = rand(t, (hq + 2 * hkv) * d)
    ang = torch.rand(t, d // 2, device=device) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dt), torch.cat([ang.sin()] * 2, -1).to(dt)
    slots = torch.randperm(8 * BS, device=device)[:t]
    k0, v0 = rand(hkv, 8, BS, d), rand(hkv, 8, BS, d)
    k1, v1, k64, v64 = k0.clone(), v0.clone(), k0.double(), v0.double()
    q_ref = reference.rope_write_kv(qkv.double(), cos.double(), sin.double(), slots, k64, v64, hq)
    q_out = cache.rope_write_kv(qkv, cos, sin, slots, k1, v1, hq)
    rows.append({"kernel": "rope_write_kv", "rel_err": max(rel(q_out, q_ref), rel(k1, k64), rel(v1, v64))})
    x, res, w = rand(t, hidden), rand(t, hidden), rand(hidden)
    rows.append(
        {
            "kernel": "rms_norm",
            "rel_err": rel(norm.rms_norm(x, w, 1e-5), reference.rms_norm(x.double(), w.double(), 1e-5)),
        }
    )
    summed, r2 = (res + x), res.clone()
    out = norm.add_rms_norm(x, r2, w, 1e-5)
    rows.append(
        {
            "kernel": "add_rms_norm",
            "rel_err": max(rel(out, reference.rms_norm(summed.double(), w.double(), 1e-5)), rel(r2, summed)),
        }
    )
    gu = rand(t, 2 * inter)
    gate, up = gu.double().chunk(2, -1)
    rows.append(
        {"kernel": "silu_and_mul", "rel_err": rel(norm.silu_and_mul(gu), torch.nn.functional.silu(gate) * up)}
    )
    for rank in (8, 16):
        slots_n, w_out = 6, hidden
        a, b = rand(slots_n, rank, hidden) * 0.1, rand(slots_n, w_out, rank) * 0.1
        slot_of = [i % (slots_n + 1) for i in range(t)]  # slot 6: no adapter
        seg = {sl: [i for i, x_ in enumerate(slot_of) if x_ == sl] for sl in range(slots_n)}
        flat = torch.tensor([i for sl in seg for i in seg[sl]], device=device)
        st = torch.tensor(
            [0, *torch.tensor([len(v) for v in seg.values()]).cumsum(0).tolist()], device=device
        )
        y = rand(t, w_out)
        ref = y.double().clone()
        for sl, rs in seg.items():
            ref[rs] += (x[rs].double() @ a[sl].double().T) @ b[sl].double().T
        lora.lora_delta(x, y, a, b, flat, st, torch.tensor(list(seg), device=device))
        rows.append({"kernel": f"lora_delta rank {rank}", "rel_err": rel(y, ref)})
    for r in rows:
        r["rel_err"] = float(f"{r['rel_err']:.2e}")
        r["pass"] = r["rel_err"] < 1e-2
    return {"all_pass": all(r["pass"] for r in rows), "checks": rows}


# ------------------------------------------------------------------------------------------------ models


def hf_model(fields: dict, device: torch.device, dtype: torch.dtype, std: float):
    """A random-weight HF Llama built on the device (no download), weights drawn with `std`."""
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM as HFLlama

    config = LlamaConfig(**fields, attention_bias=False, tie_word_embeddings=False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = HFLlama(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0, std)
    return model.eval(), config


def ember_from(hf, config, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    cfg = ModelConfig.from_hf_dict(config.to_dict())
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg, backend=cuda_backend())
    finally:
        torch.set_default_dtype(previous)
    model.rope.to(device)
    with torch.no_grad():
        model.load_hf_state_dict(hf.state_dict())
    return model.eval()


class Loop:
    """Greedy generation through the model runner, without the scheduler: sequences get contiguous block
    ranges, prefills go in chunks of at most `budget` tokens, then one decode step per token."""

    def __init__(self, runner: ModelRunner, budget: int = 8192):
        self.runner, self.budget, self.next_block = runner, budget, 0

    def table(self, tokens: int) -> list[int]:
        n = -(-tokens // BS)
        table = list(range(self.next_block, self.next_block + n))
        self.next_block += n
        return table

    def prefill(self, prompts: list[list[int]], tables: list[list[int]]) -> torch.Tensor:
        last = [None] * len(prompts)
        done = [0] * len(prompts)
        while any(d < len(p) for d, p in zip(done, prompts, strict=True)):
            work, who, used = [], [], 0
            for i, p in enumerate(prompts):
                n = min(len(p) - done[i], self.budget - used)
                if n <= 0:
                    continue
                work.append((p[done[i] : done[i] + n], done[i], n, tables[i]))
                who.append(i)
                used += n
                done[i] += n
            logits = self.runner.execute(work, list(range(len(work))))
            for row, i in enumerate(who):
                if done[i] == len(prompts[i]):
                    last[i] = logits[row]
        return torch.stack(last)

    def decode(
        self, first: list[int], starts: list[int], tables: list[list[int]], steps: int
    ) -> list[list[int]]:
        out = [[t] for t in first]
        for step in range(steps):
            work = [([out[i][-1]], starts[i] + step, 1, tables[i]) for i in range(len(first))]
            nxt = self.runner.execute(work, list(range(len(work)))).argmax(-1).tolist()  # the one host sync
            for i, t in enumerate(nxt):
                out[i].append(t)
        return out


def runner_for(model, blocks: int, max_batch: int, max_len: int, graphs: bool, device) -> ModelRunner:
    runner = ModelRunner(model, blocks, BS, device)
    if graphs:
        runner.enable_decode_graphs(max_batch, max_len, use_graphs=device.type == "cuda")
    return runner


def hf_equality(device: torch.device, s: Shapes) -> dict:
    dtype = torch.bfloat16
    hf, config = hf_model(s.small, device, dtype, std=0.05)
    model = ember_from(hf, config, device, dtype)
    gen = torch.Generator().manual_seed(7)
    lengths = [3, 17, 31, 64, 5, 100, 48, 16] if device.type == "cuda" else [3, 17]
    prompts = [torch.randint(0, s.small["vocab_size"], (n,), generator=gen).tolist() for n in lengths]
    new = 16 if device.type == "cuda" else 3
    runner = runner_for(model, 256, 8, 256, True, device)
    loop = Loop(runner)
    tables = [loop.table(len(p) + new) for p in prompts]
    last = loop.prefill(prompts, tables)
    ours = loop.decode(last.argmax(-1).tolist(), [len(p) for p in prompts], tables, new - 1)
    same, worst = 0, 0.0
    for p, o, first_logits in zip(prompts, ours, last, strict=True):
        ids = torch.tensor([p], device=device)
        with torch.no_grad():
            ref_logits = hf(ids).logits[0, -1].float()
            ref = hf.generate(ids, max_new_tokens=new, do_sample=False, min_new_tokens=new)[
                0, len(p) :
            ].tolist()
        same += ref == o
        worst = max(worst, rel(first_logits, ref_logits))
    return {
        "prompts": len(prompts),
        "identical_greedy": same,
        "first_logits_rel_err_max": float(f"{worst:.2e}"),
    }


def measured_models(device: torch.device, s: Shapes):
    """The measured model twice over the same random weights: HF's and ember's (CUDA backend)."""
    dtype = torch.bfloat16
    hf, config = hf_model(s.model, device, dtype, std=0.02)
    return hf, ember_from(hf, config, device, dtype)


def decode_speed(device: torch.device, s: Shapes, copy_gbps: float | None, model: LlamaForCausalLM) -> dict:
    dtype = model.embed_tokens.weight.dtype
    cfg = model.config
    # What a decode step reads: every weight but the embedding table, of which it reads b rows.
    embed = model.embed_tokens.weight
    weight_bytes = (
        sum(p.numel() * p.element_size() for p in model.parameters()) - embed.numel() * embed.element_size()
    )
    kv_per_token = (
        2
        * cfg.num_hidden_layers
        * cfg.num_key_value_heads
        * cfg.head_dim
        * torch.empty((), dtype=dtype).element_size()
    )
    max_batch = max(s.decode_batches)
    max_len = s.decode_context + s.decode_steps + 2 * BS
    per_seq = -(-max_len // BS)
    rows = []
    for graphs in (True, False):
        runner = runner_for(model, max_batch * per_seq, max_batch, max_len, graphs, device)
        for k, v in runner.kv_caches:  # the context's KV: random, as a prefill would leave it
            k.normal_()
            v.normal_()
        for b in s.decode_batches:
            tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(b)]
            ctx = s.decode_context

            def step(n=[0], b=b, ctx=ctx, tables=tables, runner=runner):  # noqa: B006 (a counter kept across calls)
                work = [([1], ctx + n[0] % s.decode_steps, 1, tables[i]) for i in range(b)]
                runner.execute(work, list(range(b))).argmax(-1).tolist()  # the one host sync, as serving has
                n[0] += 1

            sec = timed(step, device, s.decode_steps)
            kv_bytes = b * (ctx + s.decode_steps // 2) * kv_per_token
            floor = (weight_bytes + kv_bytes) / (copy_gbps * 1e9) if copy_gbps else None
            rows.append(
                {
                    "batch": b,
                    "cuda_graphs": graphs,
                    "ms_per_step": round(sec * 1e3, 3),
                    "tok_per_s": round(b / sec, 1),
                    "floor_ms": round(floor * 1e3, 3) if floor else None,
                    "of_floor": round(floor / sec, 3) if floor else None,
                    "GBps_achieved": round((weight_bytes + kv_bytes) / sec / 1e9, 1),
                }
            )
        del runner
    return {
        "dtype": str(dtype),
        "weight_GB": round(weight_bytes / 1e9, 2),
        "context": s.decode_context,
        "steps": rows,
    }


def throughput(device: torch.device, s: Shapes, hf, model: LlamaForCausalLM) -> dict:
    gen = torch.Generator().manual_seed(3)
    total = s.tput_input + s.tput_output
    per_seq = -(-total // BS)
    rows = []
    for b in s.tput_batches:
        prompts = torch.randint(0, s.model["vocab_size"], (b, s.tput_input), generator=gen)
        runner = runner_for(model, b * per_seq, b, total, True, device)
        loop = Loop(runner)
        sync(device)
        t0 = time.perf_counter()
        tables = [loop.table(total) for _ in range(b)]
        last = loop.prefill(prompts.tolist(), tables)
        loop.decode(last.argmax(-1).tolist(), [s.tput_input] * b, tables, s.tput_output - 1)
        sync(device)
        ember_s = time.perf_counter() - t0
        del runner, loop
        ids = prompts.to(device)
        with torch.no_grad():
            warm = ids[:, :8]
            hf.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=2, do_sample=False)
            sync(device)
            t0 = time.perf_counter()
            hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=s.tput_output,
                min_new_tokens=s.tput_output,
                do_sample=False,
            )
            sync(device)
        hf_s = time.perf_counter() - t0
        out_tokens = b * s.tput_output
        rows.append(
            {
                "batch": b,
                "ember_s": round(ember_s, 2),
                "ember_out_tok_per_s": round(out_tokens / ember_s, 1),
                "hf_s": round(hf_s, 2),
                "hf_out_tok_per_s": round(out_tokens / hf_s, 1),
                "ember_over_hf": round(hf_s / ember_s, 2),
            }
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"input": s.tput_input, "output": s.tput_output, "runs": rows}


def lora_speed(device: torch.device, s: Shapes, model: LlamaForCausalLM) -> dict:
    """Decode at batch `lora_batch`, every row its own adapter, against the same batch on the base model
    (eager both: LoRA steps are not captured in graphs)."""
    b, rank = s.lora_batch, s.lora_rank
    ctx = enable_lora(model, num_slots=b, max_rank=rank)
    with torch.no_grad():
        for module in model.modules():
            for name, buf in module.named_buffers(recurse=False):
                if name.startswith(("A_", "B_")):
                    buf.normal_(0, 0.01)
    parts = {n for m in model.modules() for n, _ in m.named_buffers(recurse=False) if n.startswith("A_")}
    ctx.present = [{p[2:] for p in parts} for _ in range(b)]
    ctx.ranks = [rank] * b
    max_len = s.decode_context + s.decode_steps + 2 * BS
    per_seq = -(-max_len // BS)
    runner = ModelRunner(model, b * per_seq, BS, device)
    for k, v in runner.kv_caches:
        k.normal_()
        v.normal_()
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(b)]
    res = {}
    for label, slots in (("base", None), ("lora", list(range(b)))):

        def step(n=[0], slots=slots):  # noqa: B006
            work = [([1], s.decode_context + n[0] % s.decode_steps, 1, tables[i]) for i in range(b)]
            runner.execute(work, list(range(b)), slots).argmax(-1).tolist()
            n[0] += 1

        res[label] = timed(step, device, s.decode_steps)
    return {
        "batch": b,
        "adapters": b,
        "rank": rank,
        "base_eager_tok_per_s": round(b / res["base"], 1),
        "lora_eager_tok_per_s": round(b / res["lora"], 1),
        "lora_over_base": round(res["base"] / res["lora"], 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results/gpu")))
    ap.add_argument(
        "--dry-run", action="store_true", help="tiny shapes; runs on CPU under Triton's interpreter"
    )
    ap.add_argument("--only", nargs="*", help="run only these sections")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.dry_run:
        sys.exit(
            "no CUDA device here: pass --dry-run to run the script's path on CPU under Triton's interpreter"
        )
    shapes = DRY if args.dry_run else GPU
    import triton

    meta = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}), Triton interpreter",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dry_run": args.dry_run,
    }
    report = Report(args.out, meta)
    want = set(args.only or ["ceilings", "kernels", "hf", "decode", "throughput", "lora"])
    copy = None
    if "ceilings" in want:
        copy = (report.section("ceilings", ceilings, device, shapes) or {}).get("copy_GBps")
    if "kernels" in want:
        report.section("kernels", kernels, device, shapes)
    if "hf" in want:
        report.section("hf", hf_equality, device, shapes)
    if want & {"decode", "throughput", "lora"}:
        hf, model = measured_models(device, shapes)  # Llama-3-8B-shaped, random weights
        report.data["meta"]["measured_model"] = (
            f"Llama-3-8B shape ({shapes.model['num_hidden_layers']} layers), random weights"
        )
        if "decode" in want:
            report.section("decode", decode_speed, device, shapes, copy, model)
        if "throughput" in want:
            report.section("throughput", throughput, device, shapes, hf, model)
        del hf
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if "lora" in want:  # last: it wraps the model's projections for good
            report.section("lora", lora_speed, device, shapes, model)
    print(f"results: {args.out / 'results.md'}")


if __name__ == "__main__":
    main()
