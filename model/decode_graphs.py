"""Decode steps replayed from CUDA graphs, one graph per padded batch size.

Why: a decode step is launch-bound. Measured on an H200 (CogVLM-17B architecture, Triton
attention, bf16): eager, 15.7 ms per step at batch 1 (41 ms before the small ops were fused),
where reading the language weights takes 3.1 ms; replayed, 4.89 ms. A graph records the whole
step (embedding, 32 layers, lm_head) once per batch size and replays it with one launch.

A step takes this path when every scheduled sequence adds exactly one text token (the vision
experts and image features never enter a decode) and the batch fits the largest graph; all
else runs eagerly. The graph reads static buffers that `run` refills in place:
- rows past the real batch are padding: they write K/V to the cache's scratch block, attend to
  that one key only, and their logits are dropped;
- block-table columns past a row's last block are never read (the kernel stops at seq_len), so
  only the columns in use are copied each step.

`capture=False` runs the same padded, static-buffer computation without recording it: the CPU
tests check the padding and the buffer plumbing that way (Triton attention in the interpreter).
"""

from __future__ import annotations

import torch

from model.cogvlm import CogVLMForCausalLM
from model.paged_attention import PagedKVCache, TritonPagedAttention

# Larger decode batches run eagerly: at 256 rows the GEMMs' own time hides the launches, and each
# graph size costs a capture at start-up.
MAX_GRAPH_BATCH = 256


def capture_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, then multiples of 8 (vLLM's spacing): padding wastes at most 7 rows of a batch
    over 8, and a decode GEMM at 64 rows costs what it costs at 57."""
    sizes = [s for s in (1, 2, 4) if s < max_batch] + list(range(8, max_batch + 8, 8))
    return sorted({min(s, max_batch) for s in sizes})


class DecodeGraphs:
    def __init__(self, model: CogVLMForCausalLM, kv_cache: PagedKVCache, max_batch: int, max_blocks_per_seq: int,
                 capture: bool = True, pdl: bool = False):  # fmt: skip
        device = model.device
        self.model = model
        self.kv_cache = kv_cache
        self.sizes = capture_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        self.max_blocks_per_seq = max_blocks_per_seq
        self.pdl = pdl  # the attention kernels as programmatic dependent launches (kernels/pdl.py)
        n, scratch = self.max_batch, kv_cache.scratch_block
        self.scratch_slot = scratch * kv_cache.block_size
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), self.scratch_slot, dtype=torch.long, device=device)
        self.block_tables = torch.full((n, max_blocks_per_seq), scratch, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)  # one token per row
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # [size, vocab] fp32, written by each replay
        self.num_runs = 0  # steps that took this path (the tests check it)
        if capture:
            self._capture()

    def fits(self, batch_size: int, max_blocks: int) -> bool:
        return batch_size <= self.max_batch and max_blocks <= self.max_blocks_per_seq

    @torch.inference_mode()
    def run(
        self,
        input_ids: list[int],  # [B]: each sequence's newest token
        positions: list[int],  # [B]
        slots: list[int],  # [B]: where each new token's K/V goes
        block_tables: list[list[int]],  # B rows of block ids
        seq_lens: list[int],  # [B]: tokens in the cache after this step
        fed: tuple[torch.Tensor | None, torch.Tensor] | None = None,  # ([F] rows or None: all; [F] tokens), on device
    ) -> torch.Tensor:  # [B, vocab] fp32 logits
        batch = len(input_ids)
        self.num_runs += 1
        size = next(s for s in self.sizes if s >= batch)
        width, scratch = max(len(t) for t in block_tables), self.kv_cache.scratch_block
        table = torch.tensor([t + [scratch] * (width - len(t)) for t in block_tables], dtype=torch.int32)
        # NOTE: host -> device copies into the buffers the graph reads; padding rows are reset in
        # case a larger batch left real values there.
        if fed is not None and fed[0] is None:  # every row's input is a token the step in flight sampled
            self.input_ids[:batch].copy_(fed[1])
        else:
            self.input_ids[:batch].copy_(torch.tensor(input_ids), non_blocking=True)
            if fed is not None:  # look-ahead rows: the step in flight sampled their input tokens
                self.input_ids[fed[0]] = fed[1]
        self.positions[:batch].copy_(torch.tensor(positions), non_blocking=True)
        self.slot_mapping[:batch].copy_(torch.tensor(slots), non_blocking=True)
        self.seq_lens[:batch].copy_(torch.tensor(seq_lens, dtype=torch.int32), non_blocking=True)
        self.block_tables[:batch, :width].copy_(table, non_blocking=True)
        self.slot_mapping[batch:size].fill_(self.scratch_slot)
        self.seq_lens[batch:size].fill_(1)
        self.block_tables[batch:size, 0].fill_(scratch)
        if size in self.graphs:
            self.graphs[size].replay()
            return self.logits[size][:batch]
        return self._forward(size)[:batch]

    def _forward(self, size: int) -> torch.Tensor:  # [size, vocab]: the step a graph records
        attention = TritonPagedAttention(self.kv_cache, self.pdl)
        attention.bind(self.slot_mapping[:size], self.block_tables[:size], self.seq_lens[:size],
                       self.query_start_loc[: size + 1], max_query_len=1)  # fmt: skip
        model = self.model
        return model.forward_logits(model.embed(self.input_ids[:size]), self.positions[:size], None, attention)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None  # one memory pool for all graphs: they never run at the same time
        for size in reversed(self.sizes):  # largest first, so the pool is sized once
            self._forward(size)  # compiles the Triton kernels and lets cuBLAS pick before recording
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[size] = self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()
