"""The CUDA backend end to end on a tiny random Llama: its Triton kernels (under the interpreter on a
machine without a GPU) against the reference backend through the model runner, over prefill, chunked
prefill after a cached prefix and decode; the decode-graph path (persistent buffers, padded batch sizes)
against the plain eager step; and the LoRA kernel against the reference loop over adapter slots."""

from __future__ import annotations

import pytest
import torch

from ember.backends import REFERENCE
from ember.backends.registry import cuda_backend
from ember.engine.cuda_graphs import batch_sizes
from ember.engine.model_runner import ModelRunner
from ember.kernels.triton import unavailable_reason
from ember.models.config import ModelConfig
from ember.models.llama import LlamaForCausalLM
from ember.models.lora import enable_lora, load_slot

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BS = 16
# GQA 4, head_dim 16 (the smallest dot operand), 2 layers: the interpreter's time grows with every launch.
CFG = ModelConfig(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=128,
)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    m = LlamaForCausalLM(CFG).to(DEVICE)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # not all ones, so a norm kernel that drops the weight shows
    m.rope.to(DEVICE)
    return m.eval()


def run_steps(runner: ModelRunner, steps, lora_slots=None) -> list[torch.Tensor]:
    return [runner.execute(work, list(range(len(work))), lora_slots) for work in steps]


# Two sequences: A (21-token prompt in chunks of 13 and 8, the second over the cached first), B (9 tokens
# at once), then two decode steps of both.
TOKENS = torch.randint(0, CFG.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).tolist()
TABLE_A, TABLE_B = [3, 0, 5], [1, 4]
STEPS = [
    [(TOKENS[:13], 0, 13, TABLE_A), (TOKENS[20:29], 0, 9, TABLE_B)],
    [(TOKENS[13:21], 13, 8, TABLE_A)],
    [([TOKENS[30]], 21, 1, TABLE_A), ([TOKENS[31]], 9, 1, TABLE_B)],
    [([TOKENS[32]], 22, 1, TABLE_A), ([TOKENS[33]], 10, 1, TABLE_B)],
]


def runner_on(model, backend) -> ModelRunner:
    model.set_backend(backend)
    return ModelRunner(model, num_blocks=8, block_size=BS, device=DEVICE)


def test_cuda_backend_matches_the_reference_through_the_model(model):
    ref = run_steps(runner_on(model, REFERENCE), STEPS)
    out = run_steps(runner_on(model, cuda_backend()), STEPS)
    model.set_backend(REFERENCE)
    for r, o in zip(ref, out, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)
        assert torch.equal(o.argmax(-1), r.argmax(-1))


def test_decode_graph_path_pads_batches_and_writes_only_real_rows(model):
    """3 sequences run in the size-4 buffers; the spare row must neither change the logits nor write KV."""
    assert batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    eager = runner_on(model, cuda_backend())
    padded = runner_on(model, cuda_backend())
    padded.enable_decode_graphs(max_batch=5, max_model_len=64, use_graphs=False)
    assert padded.decode_graphs.sizes == [1, 2, 4, 5]
    prompt = [[(TOKENS[:13], 0, 13, TABLE_A), (TOKENS[20:29], 0, 9, TABLE_B), (TOKENS[5:7], 0, 2, [2])]]
    decode = [[([TOKENS[30]], 13, 1, TABLE_A), ([TOKENS[31]], 9, 1, TABLE_B), ([TOKENS[32]], 2, 1, [2])]]
    for runner in (eager, padded):
        run_steps(runner, prompt)
    want, got = run_steps(eager, decode)[0], run_steps(padded, decode)[0]
    model.set_backend(REFERENCE)
    # Equal up to float order: a matmul of 4 rows may round differently from one of 3.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for (ke, ve), (kp, vp) in zip(eager.kv_caches, padded.kv_caches, strict=True):
        torch.testing.assert_close(kp, ke, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vp, ve, rtol=1e-5, atol=1e-5)
        # Blocks 0 (A's, past its context so far) and 7 (no one's) stay as allocated: the spare row's
        # slot -1 wrote nothing, not even to slot 0.
        assert not kp[:, [0, 7]].any() and not vp[:, [0, 7]].any()


def test_lora_kernel_matches_the_reference_loop(model):
    """Two adapters of ranks 8 and 16 and a base-model row in one batch, prefill then decode."""
    torch.manual_seed(2)
    lora_model = LlamaForCausalLM(CFG).to(DEVICE)
    lora_model.load_state_dict(model.state_dict())
    lora_model.rope.to(DEVICE)
    lora_model.set_backend(cuda_backend())
    ctx = enable_lora(lora_model, num_slots=3, max_rank=16)
    assert ctx.kernel is not None
    for slot, rank in ((0, 8), (2, 16)):
        weights = {}
        for layer in range(CFG.num_hidden_layers):
            for module, (n_in, n_out) in {
                "q_proj": (64, 64),
                "v_proj": (64, 16),
                "down_proj": (80, 64),
            }.items():
                weights[(layer, module)] = (torch.randn(rank, n_in) * 0.3, torch.randn(n_out, rank) * 0.3)
        load_slot(lora_model, slot, weights)
    steps = [
        [(TOKENS[:13], 0, 13, TABLE_A), (TOKENS[20:29], 0, 9, TABLE_B), (TOKENS[5:7], 0, 2, [2])],
        [([TOKENS[30]], 13, 1, TABLE_A), ([TOKENS[31]], 9, 1, TABLE_B), ([TOKENS[32]], 2, 1, [2])],
    ]
    slots = [0, None, 2]
    out = run_steps(ModelRunner(lora_model, 8, BS, DEVICE), steps, slots)
    ctx.kernel = None
    ref = run_steps(ModelRunner(lora_model, 8, BS, DEVICE), steps, slots)
    for r, o in zip(ref, out, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)
    base = run_steps(runner_on(model, cuda_backend()), steps)
    model.set_backend(REFERENCE)
    torch.testing.assert_close(out[1][1], base[1][1], rtol=1e-4, atol=1e-4)  # the base row: no delta
    assert not torch.allclose(out[1][0], base[1][0], atol=1e-2)  # the adapters' rows: changed


def test_registry_picks_the_cuda_backend_where_it_runs(monkeypatch):
    from ember.backends import registry

    monkeypatch.delenv("EMBER_CPU_KERNELS", raising=False)
    monkeypatch.setattr(registry, "cuda_unavailable_reason", lambda: None)
    assert registry.select_backend("cuda", torch.bfloat16) is cuda_backend()
    monkeypatch.setattr(registry, "cuda_unavailable_reason", lambda: "no CUDA device")
    assert registry.select_backend("cuda", torch.bfloat16) is REFERENCE


def test_cuda_layout_and_memory_settings_refuse_what_cannot_run():
    from ember.config.engine import CacheConfig
    from ember.config.schema import ConfigError

    with pytest.raises(ValueError, match="--block-size 16, 32, 64"):
        cuda_backend().kv_cache_layout(CFG, 8, torch.bfloat16)
    with pytest.raises(ConfigError, match="fraction of the GPU's memory"):
        CacheConfig(gpu_memory_utilization=1.5)
    assert CacheConfig(kv_cache_memory="1GiB").kv_budget(torch.device("cpu")) == 2**30  # the CPU: as given


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device: captures and replays CUDA graphs"
)
def test_decode_graph_replay_matches_eager(model):
    """The same decode steps replayed from captured graphs and run eagerly, at a batch the graphs pad."""
    eager = runner_on(model, cuda_backend())
    graphed = runner_on(model, cuda_backend())
    graphed.enable_decode_graphs(max_batch=5, max_model_len=64)
    prompt = [[(TOKENS[:13], 0, 13, TABLE_A), (TOKENS[20:29], 0, 9, TABLE_B), (TOKENS[5:7], 0, 2, [2])]]
    for runner in (eager, graphed):
        run_steps(runner, prompt)
    for step in range(3):
        work = [
            ([TOKENS[30 + step]], 13 + step, 1, TABLE_A),
            ([TOKENS[31]], 9 + step, 1, TABLE_B),
            ([TOKENS[32]], 2 + step, 1, [2]),
        ]
        torch.testing.assert_close(
            run_steps(graphed, [work])[0], run_steps(eager, [work])[0], rtol=1e-4, atol=1e-4
        )
    model.set_backend(REFERENCE)
