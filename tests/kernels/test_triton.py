"""Every Triton kernel against the PyTorch reference on odd sizes: on CUDA where there is a GPU, else on
CPU tensors through Triton's interpreter (tests/kernels/conftest.py), which is slow, hence tiny shapes.

Inputs are fresh random draws, never zeros, and outputs are poisoned with NaN first, so an element a
kernel fails to write shows. Tolerances: ||out - ref|| / ||ref|| against a float64 reference, ~1e-6 in
float32 and under 1e-2 for bfloat16 operands.
"""

from __future__ import annotations

import pytest
import torch

from ember.backends import reference
from ember.kernels.triton import unavailable_reason
from ember.models.attention import AttentionMetadata, PrefillChunk, _prefill, decode_reference

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

if unavailable_reason() is None:
    from ember.kernels.triton import attention, cache, lora, norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BS = 16  # tokens per KV block
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "an output element was not written"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def kv(hkv: int, d: int, num_blocks: int, dtype: torch.dtype, gen: torch.Generator):
    shape = (hkv, num_blocks, BS, d)
    return (
        torch.randn(shape, generator=gen).to(DEVICE, dtype),
        torch.randn(shape, generator=gen).to(DEVICE, dtype),
    )


@pytest.mark.parametrize(
    ("group", "dtype", "window", "splits"),
    [(1, torch.float32, None, None), (4, torch.bfloat16, None, 2), (8, torch.bfloat16, 20, None)],
)
def test_decode_attention(group, dtype, window, splits):
    gen = torch.Generator().manual_seed(group)
    hkv, d, num_blocks = 2, 32, 24
    k_cache, v_cache = kv(hkv, d, num_blocks, dtype, gen)
    lens = torch.tensor([1, 17, 16, 70], device=DEVICE)  # one token, past a block, exactly one, several
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:5] for _ in lens]).to(DEVICE)
    q = torch.randn(len(lens), hkv * group, d, generator=gen).to(DEVICE, dtype)
    meta = AttentionMetadata(torch.empty(0), len(lens), tables, lens, [], BS, window, int(lens.max()))
    ref = decode_reference(q.double(), k_cache.double(), v_cache.double(), meta, d**-0.5)
    out = torch.full_like(q, float("nan"))
    attention.decode_attention(q, k_cache, v_cache, tables, lens, d**-0.5, out, window, splits)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize(
    ("group", "dtype", "window"),
    [(1, torch.float32, None), (4, torch.bfloat16, 9), (8, torch.bfloat16, None)],
)
def test_prefill_attention_over_cached_prefix(group, dtype, window):
    gen = torch.Generator().manual_seed(10 + group)
    hkv, d, num_blocks = 2, 32, 24
    k_cache, v_cache = kv(hkv, d, num_blocks, dtype, gen)
    # (new tokens, context once written): a chunk after a cached prefix, a whole prompt of 17, a chunk
    # of 3 deep in a 40-token context.
    chunks = [(5, 21), (17, 17), (3, 40)]
    starts = torch.tensor([0, 5, 22], device=DEVICE)
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:3] for _ in chunks]).to(DEVICE)
    q = torch.randn(sum(n for n, _ in chunks), hkv * group, d, generator=gen).to(DEVICE, dtype)
    out = torch.full_like(q, float("nan"))
    qlens = torch.tensor([n for n, _ in chunks], device=DEVICE)
    ctx = torch.tensor([c for _, c in chunks], device=DEVICE)
    attention.prefill_attention(q, k_cache, v_cache, starts, qlens, ctx, tables, 17, d**-0.5, out, window)
    ref = torch.cat(
        [
            _prefill(
                q[s : s + n].double(),
                k_cache.double(),
                v_cache.double(),
                PrefillChunk(s, n, c, tables[i], window),
                d**-0.5,
            )
            for i, (s, (n, c)) in enumerate(zip(starts.tolist(), chunks, strict=True))
        ]
    )
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize(("group", "dtype"), [(1, torch.float32), (4, torch.bfloat16), (8, torch.bfloat16)])
def test_rope_write_kv(group, dtype):
    gen = torch.Generator().manual_seed(20 + group)
    hkv, d, t, num_blocks = 2, 32, 7, 4
    hq = hkv * group
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=gen).to(DEVICE, dtype)
    angles = torch.rand(t, d // 2, generator=gen) * 6
    cos = torch.cat([angles.cos()] * 2, -1).to(DEVICE, dtype)
    sin = torch.cat([angles.sin()] * 2, -1).to(DEVICE, dtype)
    slots = torch.randperm(num_blocks * BS, generator=gen)[:t].to(DEVICE)
    k_ref, v_ref = kv(hkv, d, num_blocks, dtype, gen)
    k_out, v_out = k_ref.clone(), v_ref.clone()
    q_ref = reference.rope_write_kv(
        qkv.double(), cos.double(), sin.double(), slots, k_ref.double(), v_ref.double(), hq
    )
    k64, v64 = k_ref.double(), v_ref.double()
    reference.rope_write_kv(qkv.double(), cos.double(), sin.double(), slots, k64, v64, hq)
    q = cache.rope_write_kv(qkv, cos, sin, slots, k_out, v_out, hq)
    assert rel_err(q, q_ref) < TOL[dtype]
    assert rel_err(k_out, k64) < TOL[dtype] and rel_err(v_out, v64) < TOL[dtype]
    # A padded row (slot -1, as a CUDA graph's spare rows carry) writes nothing.
    before = k_out.clone()
    cache.rope_write_kv(qkv[:1], cos[:1], sin[:1], torch.tensor([-1], device=DEVICE), k_out, v_out, hq)
    assert torch.equal(k_out, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_and_residual(dtype):
    gen = torch.Generator().manual_seed(30)
    x = torch.randn(5, 72, generator=gen).to(DEVICE, dtype)  # hidden not a power of two
    res = torch.randn(5, 72, generator=gen).to(DEVICE, dtype)
    w = torch.randn(72, generator=gen).to(DEVICE, dtype)
    assert rel_err(norm.rms_norm(x, w, 1e-5), reference.rms_norm(x.double(), w.double(), 1e-5)) < TOL[dtype]
    summed = res + x
    residual = res.clone()
    out = norm.add_rms_norm(x, residual, w, 1e-5)
    assert rel_err(residual, summed) < TOL[dtype]  # one rounding (the interpreter truncates, the GPU rounds)
    assert rel_err(out, reference.rms_norm(summed.double(), w.double(), 1e-5)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(dtype):
    gen = torch.Generator().manual_seed(31)
    gate_up = torch.randn(3, 2 * 1100, generator=gen).to(DEVICE, dtype)  # two column tiles, the last ragged
    g, u = gate_up.double().chunk(2, dim=-1)
    assert rel_err(norm.silu_and_mul(gate_up), torch.nn.functional.silu(g) * u) < TOL[dtype]


@pytest.mark.parametrize(("rank", "dtype"), [(8, torch.float32), (16, torch.bfloat16)])
def test_lora_mixed_adapters(rank, dtype):
    """Four slots (ranks up to `rank`, zero-padded), tokens of three adapters interleaved with base-model
    rows, a 20-row segment spanning two row tiles; y is a column slice of a wider output, as qkv's is."""
    gen = torch.Generator().manual_seed(40 + rank)
    t, k, w, slots = 27, 48, 40, 4
    x = torch.randn(t, k, generator=gen).to(DEVICE, dtype)
    a = torch.randn(slots, rank, k, generator=gen).to(DEVICE, dtype)
    b = torch.randn(slots, w, rank, generator=gen).to(DEVICE, dtype)
    a[2, rank // 2 :] = 0  # slot 2: an adapter of half the rank
    b[2, :, rank // 2 :] = 0
    slot_of = [3] * 20 + [None, 0, None, 2, 0, None, 2]
    segments: dict[int, list[int]] = {}
    for row, s in enumerate(slot_of):
        if s is not None:
            segments.setdefault(s, []).append(row)
    rows = torch.tensor([r for s in segments for r in segments[s]], device=DEVICE)
    starts = torch.tensor(
        [0, *torch.tensor([len(v) for v in segments.values()]).cumsum(0).tolist()], device=DEVICE
    )
    wide = torch.randn(t, w + 24, generator=gen).to(DEVICE, dtype)
    ref = wide.double().clone()
    for s, rs in segments.items():
        ref[rs, 8 : 8 + w] += (x[rs].double() @ a[s].double().T) @ b[s].double().T
    lora.lora_delta(x, wide[:, 8 : 8 + w], a, b, rows, starts, torch.tensor(list(segments), device=DEVICE))
    assert rel_err(wide, ref) < TOL[dtype]
    base_rows = [i for i, s in enumerate(slot_of) if s is None]
    assert rel_err(wide[base_rows], ref[base_rows]) < TOL[dtype] / 10  # base rows only rounded, nothing added
