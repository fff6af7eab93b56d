"""Turns a scheduled step into one flat forward pass over the paged KV cache.

The runner knows tokens, positions, block tables and context lengths; nothing of requests, strings or
sampling. Decode tokens (one query each) go first in the flat batch, prefill chunks after, which is the
order the attention code expects.
"""

from __future__ import annotations

import torch

from ember.backends import REFERENCE, Backend, select_backend
from ember.engine.cuda_graphs import DecodeGraphs
from ember.models.attention import AttentionMetadata, PrefillChunk
from ember.models.llama import LlamaForCausalLM
from ember.models.lora import LoRABatch


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, device: torch.device):
        cfg = model.config
        self.model = model
        self.device = device
        self.block_size = block_size
        dtype = next(model.parameters()).dtype
        # The backend the model was built with owns the KV layout its kernels read.
        self.backend: Backend = getattr(model, "backend", None) or select_backend(device, dtype)
        self.kv_layout = self.backend.kv_cache_layout(cfg, block_size, dtype)
        self.kv_caches = self.kv_layout.allocate(num_blocks, device)  # per layer (K, V)
        self.decode_graphs: DecodeGraphs | None = None

    def enable_decode_graphs(self, max_batch: int, max_model_len: int, use_graphs: bool = True) -> None:
        """Run decode-only steps of up to `max_batch` sequences through persistent buffers, replayed from
        CUDA graphs (eagerly with use_graphs=False). Needs a backend whose KV write skips slot -1 and
        whose ops read no lengths on the host: the CUDA backend's."""
        if self.backend.name != "cuda":
            raise ValueError(
                f"decode graphs need the CUDA backend (this model runs on '{self.backend.name}')"
            )
        max_blocks = -(-max_model_len // self.block_size)
        graphs = DecodeGraphs(
            self.model, self.kv_caches, self.block_size, max_batch, max_blocks, self.device, use_graphs
        )
        graphs.capture()
        self.decode_graphs = graphs

    @staticmethod
    def bytes_per_block(model_cfg, block_size: int, dtype: torch.dtype, backend: Backend = REFERENCE) -> int:
        return backend.kv_cache_layout(model_cfg, block_size, dtype).bytes_per_block

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        self.kv_layout.copy_blocks(self.kv_caches, src, dst)

    @torch.inference_mode()
    def execute(
        self,
        work: list[tuple[list[int], int, int, list[int]]],
        sample_rows: list[int],
        lora_slots: list[int | None] | None = None,
        num_logits: list[int] | None = None,
    ) -> torch.Tensor:
        """Run one step.

        work: per sequence (new_token_ids, num_computed_tokens, num_new_tokens, block_table), decodes
        first (ember.engine.work): the tokens computed now, not the sequence's history.
        sample_rows: indices into `work` of the sequences whose last new token is to be sampled from.
        lora_slots: per sequence, the adapter slot its tokens run with (None: the base model).
        num_logits: per sample row, how many of its last new tokens want logits (default 1; speculative
        decoding scores every proposed token).
        Returns logits [sum(num_logits), vocab] in fp32, sample row by sample row, in token order.
        """
        bs = self.block_size
        graphs = self.decode_graphs
        lora = getattr(self.model, "lora", None)
        if (
            graphs is not None
            and all(n == 1 for _, _, n, _ in work)
            and (num_logits is None or all(m == 1 for m in num_logits))
            and graphs.size_for(len(work)) is not None
            and (lora is None or self._lora_batch(work, lora_slots) is None)  # adapters: eager (shapes vary)
        ):
            if lora is not None:
                lora.batch = None
            logits = graphs.run(
                [tokens[0] for tokens, _, _, _ in work],
                [start for _, start, _, _ in work],
                [table[start // bs] * bs + start % bs for _, start, _, table in work],
                [table for _, _, _, table in work],
                [start + 1 for _, start, _, _ in work],
            )
            return logits[torch.tensor(sample_rows, dtype=torch.long, device=self.device)]
        window = self.model.config.sliding_window
        ids: list[int] = []
        positions: list[int] = []
        num_decodes = 0
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        last_token_of: list[int] = []
        for tokens, start, n, table in work:
            ctx = start + n
            if n == 1 and not prefills:
                num_decodes += 1
                decode_tables.append(table)
                decode_lens.append(ctx)
            else:
                table_t = torch.tensor(table, device=self.device)
                prefills.append(PrefillChunk(len(ids), n, ctx, table_t, window))
            ids.extend(tokens)
            positions.extend(range(start, ctx))
            last_token_of.append(len(ids) - 1)
        pos = torch.tensor(positions, device=self.device)
        slots = self._slots(work, pos, bs)
        width = max((len(t) for t in decode_tables), default=0)
        meta = AttentionMetadata(
            slot_mapping=slots,
            num_decode_tokens=num_decodes,
            decode_block_tables=torch.tensor(
                [t + [0] * (width - len(t)) for t in decode_tables], dtype=torch.long, device=self.device
            ).view(num_decodes, width),
            decode_context_lens=torch.tensor(decode_lens, dtype=torch.long, device=self.device),
            max_decode_len=max(decode_lens, default=0),
            prefills=prefills,
            block_size=bs,
            sliding_window=window,
        )
        if lora is not None:
            lora.batch = self._lora_batch(work, lora_slots)
        hidden = self.model(torch.tensor(ids, device=self.device), pos, self.kv_caches, meta)
        if num_logits is None:
            wanted = [last_token_of[i] for i in sample_rows]
        else:
            wanted = [
                t
                for i, m in zip(sample_rows, num_logits, strict=True)
                for t in range(last_token_of[i] - m + 1, last_token_of[i] + 1)
            ]
        rows = torch.tensor(wanted, dtype=torch.long, device=self.device)
        return self.model.compute_logits(hidden[rows])

    def _lora_batch(self, work, lora_slots: list[int | None] | None) -> LoRABatch | None:
        """The step's token rows grouped by adapter slot; None when no token runs with an adapter."""
        if not lora_slots or all(s is None for s in lora_slots):
            return None
        rows: dict[int, list[int]] = {}
        offset = 0
        for (_, _, n, _), slot in zip(work, lora_slots, strict=True):
            if slot is not None:
                rows.setdefault(slot, []).extend(range(offset, offset + n))
            offset += n
        return LoRABatch([(slot, torch.tensor(r, device=self.device)) for slot, r in rows.items()])

    def _slots(self, work, pos: torch.Tensor, bs: int) -> torch.Tensor:
        # slot of position p of a sequence = block_table[p // bs] * bs + p % bs
        pos_cpu = pos.cpu()
        blocks = torch.empty_like(pos_cpu)
        offset = 0
        for _, _, n, table in work:
            p = pos_cpu[offset : offset + n]
            blocks[offset : offset + n] = torch.tensor(table, dtype=torch.long)[p // bs]
            offset += n
        return (blocks * bs + pos_cpu % bs).to(self.device)
