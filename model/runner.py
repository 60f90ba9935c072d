"""Turns a SchedulerOutput into flat tensors, runs the model over the paged cache, samples.

Batches are flat and unpadded: the tokens of every scheduled sequence one after another. Per
token: id, position, the vision-expert mask (the shifted rule of COGVLM.md section 4, taken over
the whole sequence, so a chunk that ends inside an image still routes its last token by the
sequence's next token), and the KV slot. Images are encoded once, batched over the images this
step needs, and kept in an encoder cache keyed by content hash, so a prefill split into chunks
or a second request with the same image never runs the vision tower again.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

import kernels.gemv as gemv_module
import model.cogvlm as cogvlm_module
from kernels.expert_routing import tuning_row_counts
from model.batch import PromptLogprob, RunnerOutput, ScheduledSequence, SchedulerOutput
from model.cogvlm import CogVLMForCausalLM
from model.decode_graphs import DecodeGraphs
from model.experts import routed_linear, routing_for
from model.gemv_tuning import tune_one_row_gemvs
from model.paged_attention import PagedAttentionMetadata, PagedKVCache, make_attention_backend
from model.processor import VISION_TOKEN_TYPE
from model.sampler import Sampler
from model.transfer import to_device, to_host_later

# Structured output's masks for a step: [G, ceil(V / 32)] int32 allowed-token bits on the host,
# and the row of each constrained request (server/grammars.py)
GrammarMask = tuple[torch.Tensor, dict[str, int]]


@dataclass
class StepLogits:
    """A forward's output, waiting for its sampling (ModelRunner.forward -> ModelRunner.sample)."""

    logits: torch.Tensor | None  # [B_sample, V] fp32, one row per sequence that samples (None: none does)
    sampling: list[ScheduledSequence]  # those sequences, in row order
    in_flight: list[bool]  # per row: its newest token is the look-ahead token still on the device
    fed: tuple | None  # (rows or None, [F] tokens in flight): look-ahead inputs, as forward took them
    prompt: Callable | None = None  # reads the step's prompt logprobs (ModelRunner._prompt_logprobs)


@dataclass(frozen=True)
class RunnerConfig:
    num_blocks: int  # KV blocks in the pool (from the memory budget)
    block_size: int = 16  # tokens per KV block
    encoder_cache_size: int = 64  # images whose features are kept (LRU)
    attention_backend: str = "auto"  # auto (triton on CUDA, torch on CPU) | torch | triton | flash_attn
    one_row_gemv: bool = False  # CUDA: batch-1 text decodes through kernels/gemv.py (norms fused in)
    pdl: bool = False  # CUDA sm_90+: our decode kernels as programmatic dependent launches (kernels/pdl.py)
    # steps with image rows carry them in the routing's slot order (CogVLMForCausalLM.use_grouped_expert_rows)
    grouped_expert_rows: bool = False


class ModelRunner:
    def __init__(self, model: CogVLMForCausalLM, config: RunnerConfig):
        cfg = model.config
        self.model = model
        self.config = config
        if model.device.type == "cuda":
            model.fuse_for_inference(config.one_row_gemv, config.pdl)
        model.use_grouped_expert_rows(config.grouped_expert_rows)
        self.kv_cache = PagedKVCache(cfg.num_layers, config.num_blocks, config.block_size, cfg.num_kv_heads,
                                     cfg.head_dim, model.dtype, model.device)  # fmt: skip
        self.attention = make_attention_backend(config.attention_backend, self.kv_cache, model.device, config.pdl)
        self.sampler = Sampler(cfg.eos_token_ids)
        self.encoder_cache: OrderedDict[str, torch.Tensor] = OrderedDict()  # image hash -> [N_img, hidden]
        self.num_images_encoded = 0  # for tests and metrics: vision tower runs, one per image
        self.num_encoder_cache_hits = 0  # images a step needed that were already encoded
        self._encode_seconds: list[float] = []  # vision-tower calls timed, not yet drained
        self._encode_timers: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # CUDA: start, end
        self.decode_graphs: DecodeGraphs | None = None  # see enable_decode_graphs

    def enable_decode_graphs(self, max_batch: int, max_model_len: int, capture: bool = True) -> None:
        """Pure decode steps of up to max_batch sequences replay CUDA graphs (model/decode_graphs.py).
        They read the cache through the Triton attention kernel, whatever the eager backend is."""
        max_blocks = -(-max_model_len // self.config.block_size)
        self.decode_graphs = DecodeGraphs(self.model, self.kv_cache, max_batch, max_blocks, capture, self.config.pdl)

    def tune_one_row_gemvs(self) -> dict:
        """Pin each batch-1 GEMV's config by its time in a graph chain (model/gemv_tuning.py);
        before the decode graphs are captured, which then launch those configs."""
        return tune_one_row_gemvs(self.model.model.layers, self.config.pdl, cogvlm_module.EARLY_TRIGGER,
                                  prefetch=cogvlm_module.L2_PREFETCH)  # fmt: skip

    def pin_tuned_gemvs(self) -> int:
        """Pin the batch-1 GEMV configs kernels/gemv.py's TUNED table holds for this card and the
        model's dtype, before the decode graphs are captured; returns how many shapes it pinned."""
        return gemv_module.pin_tuned(torch.cuda.get_device_name(self.model.device), self.model.dtype)

    @torch.inference_mode()
    def tune_expert_kernels(self, max_rows: int) -> list[int]:
        """Run the routed expert projections once for each autotuning bucket (kernels/expert_linear.py)
        a step of up to max_rows tokens falls in, so the autotuner benchmarks its configs now: on
        the first image step of each bucket it would take about a second a projection shape,
        stalling every running request. All layers share the shapes: layer 0's weights serve.
        With grouped expert rows it tunes kernels/grouped_expert_linear.py's kernel instead (the same
        shapes and row buckets). Returns the row counts run."""
        layer, cfg = self.model.model.layers[0], self.model.config
        device, dtype = self.model.device, self.model.dtype
        attn = layer.self_attn
        row_counts = tuning_row_counts(max_rows)
        for rows in row_counts:
            routing = routing_for(torch.arange(rows, device=device) >= rows // 2, self.model.grouped_expert_rows)
            num = routing.num_slots if routing.in_slots else rows  # the projections' rows
            hidden = torch.zeros(num, cfg.hidden_size, dtype=dtype, device=device)
            ctx = torch.zeros(num, cfg.num_heads * cfg.head_dim, dtype=dtype, device=device)
            routed_linear(hidden, routing, attn.language_expert_query_key_value, attn.vision_expert_query_key_value)
            routed_linear(ctx, routing, attn.language_expert_dense, attn.vision_expert_dense)
            layer.mlp(hidden, routing)  # gate_up with silu * up, then down
        return row_counts

    def execute(
        self, out: SchedulerOutput, feed: RunnerOutput | None = None, grammar_mask: GrammarMask | None = None
    ) -> RunnerOutput:
        """Queue the step on the device and return at once: the sampled tokens are read when the
        caller resolves the output. `feed`: the output of the step still in flight, whose
        sampled tokens are the inputs of this step's look-ahead ("fed") rows: rows that start at
        the sequence's known token count, whose input is the token still in flight."""
        return self.sample(self.forward(out, feed), grammar_mask)

    @torch.inference_mode()
    def forward(self, out: SchedulerOutput, feed: RunnerOutput | None = None) -> StepLogits | None:
        """The model's half of `execute`, queued: the logits of the rows that sample, and the
        prompt logprobs asked for (None where there are neither). The engine samples separately
        where a grammar's mask needs the tokens of the step in flight first (server/engine.py)."""
        for request_id in out.finished_request_ids:
            self.sampler.forget(request_id)
        if not out.scheduled:
            return None
        device, block_size = self.model.device, self.config.block_size
        input_ids, positions, vision_mask, slots = [], [], [], []
        image_rows, image_features = [], []
        fed_rows, fed_from = [], []  # rows whose token is on the device, and where it is there
        self._encode_missing_images(out)
        sampling, last_rows, in_flight = [], [], []  # per sampling sequence: it, its row, is it fed
        prompt_rows = ([], [], [], [])  # prompt_logprobs: rows, the prompt token each predicts, (id, position), K
        for s in out.scheduled:
            seq, start, end = s.seq, s.start, s.end
            row0 = len(input_ids)
            prompt = seq.prompt
            num_prompt = len(prompt.input_ids)
            num_tokens = num_prompt + len(seq.output_token_ids)  # seq.num_tokens, read once
            is_fed = start == num_tokens  # a look-ahead row (always one token past the prompt)
            # NOTE: one text token past the prompt (a decode, or a recompute after preemption) is
            # most rows of most steps: the general path's list building cost ~3 us a row on CPU
            one_text_token = end - start == 1 and start >= num_prompt
            if is_fed:
                fed_rows.append(row0)
                fed_from.append(feed.feed[1][seq.request_id])
                input_ids.append(0)  # replaced on the device
            elif one_text_token:
                input_ids.append(seq.output_token_ids[start - num_prompt])
            else:
                input_ids += seq.token_ids(start, end)
            if one_text_token:
                positions.append(prompt.position_ids[-1] + 1 + start - num_prompt)  # as seq.positions
                vision_mask.append(False)
                slots.append(s.block_ids[start // block_size] * block_size + start % block_size)
            else:
                positions += seq.positions(start, end)
                if start + 1 >= len(prompt.token_type_ids):  # past the prompt: text, on the language expert
                    vision_mask += [False] * (end - start)
                else:
                    vision_mask += [
                        seq.token_type(i) == VISION_TOKEN_TYPE and seq.token_type(i + 1) == VISION_TOKEN_TYPE
                        for i in range(start, end)
                    ]
                slots += [s.block_ids[i // block_size] * block_size + i % block_size for i in range(start, end)]
                if prompt.image_slots:
                    first, last = prompt.image_slots[0], prompt.image_slots[-1] + 1
                    lo, hi = max(start, first), min(end, last)
                    if lo < hi:  # this chunk holds image slots lo..hi-1
                        image_rows += range(row0 + lo - start, row0 + hi - start)
                        image_features.append(self.encoder_cache[prompt.image_hash][lo - first : hi - first])
            # NOTE: once a token exists the prompt logprobs went out with it: a recompute after
            # preemption computes none again
            if seq.params.prompt_logprobs is not None and not seq.output_token_ids:
                self._prompt_rows(s, row0, num_prompt, prompt_rows)
            if end >= num_tokens:  # s.needs_sample: not a chunk, nor a recompute row, short of the end
                sampling.append(s)
                last_rows.append(len(input_ids) - 1)
                in_flight.append(is_fed)  # its newest token is the one in flight
        fed = None
        if fed_rows:  # ([F] rows of this batch, or None: every row, in order; [F] their tokens in flight)
            # NOTE: a steady decode batch is the step in flight's batch again, in its order: its
            # tokens are this step's inputs as they are, with no index copies or gathers (on an
            # H200 each queued op costs a batch-1 step 1 to 3 us between graph replays)
            tokens = feed.feed[0]
            if fed_from != list(range(tokens.shape[0])):
                tokens = tokens[to_device(fed_from, device, torch.long)]
            every_row = fed_rows == list(range(len(input_ids)))
            fed = (None if every_row else to_device(fed_rows, device, torch.long), tokens)
        # NOTE: a fed row is a one-token decode, so it samples: the sampler sees fed[1] too

        max_blocks = max(len(s.block_ids) for s in out.scheduled)
        graphs = self.decode_graphs
        # NOTE: no image rows means no vision-expert row either (the mask is only ever true on image slots)
        if graphs is not None and len(input_ids) == len(out.scheduled) and not image_rows \
                and graphs.fits(len(input_ids), max_blocks):  # fmt: skip
            # one text token per sequence: replay (logits for every row; the sampled ones kept)
            logits = graphs.run(input_ids, positions, slots, [s.block_ids for s in out.scheduled],
                                [s.end for s in out.scheduled], fed)  # fmt: skip
            every_row = logits
            prompt = self._prompt_logprobs(lambda rows: every_row[rows], *prompt_rows) if prompt_rows[0] else None
            if len(last_rows) < len(out.scheduled):
                logits = logits[to_device(last_rows, device, torch.long)]
        else:
            if fed is not None and fed[0] is None:
                ids = fed[1]
            else:
                ids = to_device(input_ids, device, torch.long)
                if fed is not None:
                    ids[fed[0]] = fed[1]
            features = torch.cat(image_features) if image_features else None
            rows = to_device(image_rows, device, torch.long) if image_rows else None
            embeds = self.model.embed(ids, features, rows)
            block_tables = to_device([s.block_ids + [0] * (max_blocks - len(s.block_ids)) for s in out.scheduled],
                                     device, torch.long)  # fmt: skip
            self.attention.prepare(PagedAttentionMetadata(
                slot_mapping=to_device(slots, device, torch.long),
                query_lens=[s.num_new_tokens for s in out.scheduled],
                seq_lens=[s.end for s in out.scheduled],
                block_tables=block_tables,
            ))  # fmt: skip
            mask = to_device(vision_mask, device) if any(vision_mask) else None
            hidden = self.model(embeds, to_device(positions, device, torch.long), mask, self.attention)
            sample_rows = to_device(last_rows, device, torch.long)  # may be empty
            logits = self.model.compute_logits(hidden[sample_rows])  # [B_sample, V] fp32
            prompt = None
            if prompt_rows[0]:
                prompt = self._prompt_logprobs(lambda rows: self.model.compute_logits(hidden[rows]), *prompt_rows)
        if not sampling:
            return StepLogits(None, [], [], None, prompt) if prompt is not None else None
        return StepLogits(logits, sampling, in_flight, fed, prompt)

    @staticmethod
    def _prompt_rows(s: ScheduledSequence, row0: int, num_prompt: int, into: tuple) -> None:
        """The rows of this chunk whose next token is a prompt token (vLLM's prompt_logprobs),
        image slots left out: their token is a placeholder the vision features replace."""
        seq = s.seq
        slots = seq.prompt.image_slots
        first, last = (slots[0], slots[-1]) if slots else (-1, -2)
        rows, targets, keys, ks = into
        for position in range(s.start, min(s.end, num_prompt - 1)):
            if not first <= position + 1 <= last:
                rows.append(row0 + position - s.start)
                targets.append(seq.prompt.input_ids[position + 1])
                keys.append((seq.request_id, position + 1))
                ks.append(seq.params.prompt_logprobs)

    def _prompt_logprobs(
        self, logits_of: Callable, rows: list[int], targets: list[int], keys: list[tuple[str, int]], ks: list[int]
    ) -> Callable[[], dict[str, dict[int, PromptLogprob]]]:
        """Queue the prompt logprobs of `rows` (logits_of(rows) -> [R, V] fp32) and return what reads
        them: {request_id: {position: PromptLogprob}}."""
        device, most = self.model.device, max(ks)
        rows_t, targets_t = to_device(rows, device, torch.long), to_device(targets, device, torch.long)
        parts = []
        # NOTE: 256 rows at a time: a 2048-token chunk's fp32 logits at CogVLM2's 128k vocabulary are 1 GiB
        for i in range(0, len(rows), 256):
            logprobs = torch.log_softmax(logits_of(rows_t[i : i + 256]), dim=-1)  # [R, V]
            own = logprobs.gather(1, targets_t[i : i + 256, None])  # [R, 1]
            rank = (logprobs > own).sum(dim=-1) + 1  # [R]
            top = logprobs.topk(most, dim=-1) if most else None
            parts.append((own[:, 0], rank, top.values if top else None, top.indices if top else None))
        tensors = [torch.cat(column) if column[0] is not None else None for column in zip(*parts, strict=True)]
        copied = to_host_later(tensors)

        def read() -> dict[str, dict[int, PromptLogprob]]:
            own, rank, values, indices = (t.tolist() if t is not None else None for t in copied())
            result: dict[str, dict[int, PromptLogprob]] = {}
            for j, ((request_id, position), k) in enumerate(zip(keys, ks, strict=True)):
                top = list(zip(indices[j][:k], values[j][:k], strict=True)) if k else []
                result.setdefault(request_id, {})[position] = PromptLogprob(targets[j], own[j], rank[j], top)
            return result

        return read

    @torch.inference_mode()
    def sample(self, step: StepLogits | None, grammar_mask: GrammarMask | None = None) -> RunnerOutput:
        """Queue the sampling of a forward's rows; `grammar_mask`: structured output's allowed
        tokens for the rows whose request has a constraint."""
        if step is None:
            return RunnerOutput()
        if not step.sampling:  # a prompt chunk short of its end, whose prompt logprobs were asked for
            return RunnerOutput(pending_prompt=step.prompt)
        logits, sampling, in_flight, fed = step.logits, step.sampling, step.in_flight, step.fed
        device = logits.device
        rows_bits = None
        if grammar_mask is not None:
            bits, where = grammar_mask
            picks = [(row, where[s.seq.request_id]) for row, s in enumerate(sampling) if s.seq.request_id in where]
            if picks:
                rows, taken = zip(*picks, strict=True)
                rows_bits = (list(rows), bits[list(taken)])
        in_flight_tokens = None  # [B_sample] int64: the token in flight on the device, -1 elsewhere
        if fed is not None and any(s.seq.params.reads_newest_token for s in sampling):  # penalties, bad words
            if fed[0] is None:  # every row fed, and each samples: in batch order
                in_flight_tokens = fed[1]
            else:
                in_flight_tokens = torch.full((len(sampling),), -1, dtype=torch.long, device=device)
                rows = [j for j, is_fed in enumerate(in_flight) if is_fed]  # fed rows, in batch order as fed[1]
                in_flight_tokens[to_device(rows, device, torch.long)] = fed[1]
        batch = self.sampler.sample(logits, [s.seq for s in sampling], in_flight, in_flight_tokens, rows_bits)
        request_ids = [s.seq.request_id for s in sampling]
        return RunnerOutput(
            pending=lambda: dict(zip(request_ids, batch.to_host(), strict=True)),
            feed=(batch.tokens, {request_id: i for i, request_id in enumerate(request_ids)}),
            pending_prompt=step.prompt,
        )

    def drain_encode_seconds(self) -> list[float]:
        """Seconds of each vision-tower call finished since the last drain (the metrics')."""
        while self._encode_timers and self._encode_timers[0][1].query():
            begin, end = self._encode_timers.pop(0)
            self._encode_seconds.append(begin.elapsed_time(end) / 1e3)
        drained, self._encode_seconds = self._encode_seconds, []
        return drained

    def _encode_missing_images(self, out: SchedulerOutput) -> None:
        """One batched vision-tower call for the images this step needs that are not cached."""
        needed: dict[str, torch.Tensor] = {}
        used: set[str] = set()
        for s in out.scheduled:
            prompt = s.seq.prompt
            if not prompt.image_slots or s.start > prompt.image_slots[-1] or s.end <= prompt.image_slots[0]:
                continue
            used.add(prompt.image_hash)
            if prompt.image_hash in self.encoder_cache:
                self.encoder_cache.move_to_end(prompt.image_hash)
                self.num_encoder_cache_hits += 1
            else:
                needed[prompt.image_hash] = prompt.pixels
        if not needed:
            return
        start = time.perf_counter()
        pixels = torch.stack(list(needed.values())).to(self.model.device, non_blocking=True)
        if pixels.is_cuda:  # timed by events, read once done: a sync here would stall look-ahead
            events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            events[0].record()
        features = self.model.encode_images(pixels)  # [N, num_image_tokens, hidden]
        if pixels.is_cuda:
            events[1].record()
            self._encode_timers.append(events)
        else:
            self._encode_seconds.append(time.perf_counter() - start)
        self.num_images_encoded += len(needed)
        for image_hash, feats in zip(needed, features, strict=True):
            self.encoder_cache[image_hash] = feats
        # NOTE: images this step uses were just moved to the LRU end: eviction never reaches them.
        while len(self.encoder_cache) > max(self.config.encoder_cache_size, len(used)):
            self.encoder_cache.popitem(last=False)
