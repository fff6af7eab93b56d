"""Decode steps replayed from CUDA graphs captured at padded batch sizes, with persistent input buffers.

A decode step of a small model is mostly kernel launches: ~10 per layer, each a few microseconds of CPU
time, which at batch 1 is more than the GPU's time to read the weights. A CUDA graph records the whole
step once per batch size and replays it as one launch. Its inputs must live at fixed addresses, so the
step's token ids, positions, KV slots, block tables and context lengths are copied into buffers made
once, and a batch of n runs in the graph of the smallest captured size >= n: the spare rows carry slot
-1 (the KV write skips them), context length 1 and block 0, and their logits are dropped. Everything in
the step reads only shapes from the host (the attention kernel's grid comes from the table's width, not
the lengths), so a replay computes exactly what the eager step does.

With `use_graphs=False` the same buffers and padding run eagerly: that is how the capture logic is tested
on CPU (under Triton's interpreter), and what --enforce-eager gives on a GPU.
"""

from __future__ import annotations

import torch

from ember.models.attention import AttentionMetadata
from ember.models.llama import LlamaForCausalLM


def batch_sizes(max_batch: int) -> list[int]:
    """The batch sizes captured, up to the scheduler's max_num_seqs: 1, 2, 4, then steps of 8 (vLLM's)."""
    sizes = [1, 2, 4] + list(range(8, max_batch + 8, 8))
    return sorted({s for s in sizes if s < max_batch} | {max_batch})


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        max_batch: int,
        max_blocks_per_seq: int,
        device: torch.device,
        use_graphs: bool = True,
    ):
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.device, self.use_graphs = device, use_graphs
        self.sizes = batch_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        long = {"dtype": torch.long, "device": device}
        # The graphs' inputs: written before every replay, never reallocated.
        self.input_ids = torch.zeros(self.max_batch, **long)
        self.positions = torch.zeros(self.max_batch, **long)
        self.slots = torch.full((self.max_batch,), -1, **long)
        self.block_tables = torch.zeros(self.max_batch, max_blocks_per_seq, **long)
        self.context_lens = torch.ones(self.max_batch, **long)
        # Staged on the host in one tensor (pinned on CUDA), so a step costs one host-to-device copy.
        self._host = torch.zeros(
            self.max_batch, 4 + max_blocks_per_seq, dtype=torch.long, pin_memory=device.type == "cuda"
        )
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}  # per size: the output the graph writes
        self._pool = None

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:b],
            num_decode_tokens=b,
            decode_block_tables=self.block_tables[:b],
            decode_context_lens=self.context_lens[:b],
            prefills=[],
            block_size=self.block_size,
            sliding_window=self.model.config.sliding_window,
            max_decode_len=self.block_tables.shape[1] * self.block_size,
        )

    def _forward(self, b: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:b], self.positions[:b], self.kv_caches, self._meta(b))
        return self.model.compute_logits(hidden)  # [b, vocab] fp32

    @torch.inference_mode()
    def capture(self) -> None:
        """Record one graph per batch size, largest first so the smaller ones reuse its memory pool. The
        padding values are in the buffers already (slot -1 everywhere): capturing writes no KV."""
        if not self.use_graphs:
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for b in reversed(self.sizes):
                self._forward(b)  # warm-up: Triton compiles, cuBLAS picks its kernels, outside the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                    self._logits[b] = self._forward(b)
                self._pool = graph.pool()
                self._graphs[b] = graph
        torch.cuda.current_stream().wait_stream(stream)

    def size_for(self, n: int) -> int | None:
        """The captured batch size a batch of n runs at; None when n is past the largest."""
        return next((s for s in self.sizes if s >= n), None)

    @torch.inference_mode()
    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        slots: list[int],
        block_tables: list[list[int]],
        context_lens: list[int],
    ) -> torch.Tensor:
        """One decode step of n = len(input_ids) sequences -> logits [n, vocab] fp32."""
        n = len(input_ids)
        b = self.size_for(n)
        if b is None:
            raise ValueError(f"a decode batch of {n} is past the largest captured size {self.max_batch}")
        width = self._host.shape[1] - 4
        host = self._host[:b]
        host[n:] = 0
        host[n:, 2] = -1  # spare rows: no KV slot, a context of 1 (block 0 is read, the result dropped)
        host[n:, 3] = 1
        host[:n] = torch.tensor(
            [
                [tok, pos, slot, ctx, *table, *[0] * (width - len(table))]
                for tok, pos, slot, ctx, table in zip(
                    input_ids, positions, slots, context_lens, block_tables, strict=True
                )
            ]
        )
        staged = host.to(self.device, non_blocking=True)
        self.input_ids[:b] = staged[:, 0]
        self.positions[:b] = staged[:, 1]
        self.slots[:b] = staged[:, 2]
        self.context_lens[:b] = staged[:, 3]
        self.block_tables[:b] = staged[:, 4:]
        if self.use_graphs:
            self._graphs[b].replay()
            logits = self._logits[b]
        else:
            logits = self._forward(b)
        return logits[:n]
