"""The offline engine: requests in, one `step()` at a time, outputs out.

A step is five visible calls: `scheduler.schedule()` -> `runner.forward()` and `runner.sample()`
(queue the step on the device) -> `scheduler.launched()` -> `scheduler.update()` (reads the
sampled tokens), then detokenization and stop strings. `generate()` loops steps until every
request is done; the HTTP server drives `step()` from its own loop.

Look-ahead (async scheduling, on by default with CUDA): the host work of a step (reading the
tokens, stop checks, detokenization, scheduling and building the next batch) otherwise leaves
the GPU idle: on an H200 (CogVLM-17B, CUDA graphs) 0.6 ms of a 5.05 ms step at batch 1 and 1.7
ms of a 7.1 ms step at batch 64. So while step N runs, step N + 1 is scheduled and queued with
each decode's newest token read on the device (`Scheduler.schedule(ahead=True)`), and only then
are step N's tokens read and processed: 4.48 and 5.45 ms a step, the graph replay's own time.
Prefill chunks and admissions plan ahead the same way (their tokens are the prompt's), and the
sampler counts a token in flight for penalties and min_tokens on the device. A request that step
N finishes wastes its look-ahead token, which is dropped. A step that would preempt waits for
the tokens first (a preempted request recomputes from them).

Structured output (server/grammars.py): a constrained request's mask for a step comes from its
matcher on the host, which must first see the request's newest token. A look-ahead step that
holds such a row queues its forward, reads the tokens in flight while the forward runs, and only
then fills the masks and queues its sampling.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import torch

from model.batch import PromptLogprob, RunnerOutput, SampledToken, SchedulerOutput, SequenceData
from model.cogvlm import CogVLMForCausalLM
from model.decode_graphs import MAX_GRAPH_BATCH
from model.paged_attention import PagedKVCache
from model.processor import Processor, PromptInputs
from model.runner import GrammarMask, ModelRunner, RunnerConfig
from model.sampling_params import ParamError, SamplingParams
from server.detokenizer import IncrementalDetokenizer
from server.grammars import Grammars
from server.kv_blocks import KVCacheManager
from server.request import Request
from server.scheduler import Scheduler, SchedulerConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 256  # running requests at most
    max_num_batched_tokens: int = 2048  # tokens per step (prefill chunks + decodes)
    max_model_len: int | None = None  # default: the checkpoint's max_position_embeddings
    block_size: int = 16  # tokens per KV block
    kv_cache_gb: float = 0.25  # CPU: KV pool size (the pool is zeroed at start: keep it to what CPU serving uses)
    gpu_memory_fraction: float = 0.8  # CUDA: share of the free memory after loading that the KV pool takes
    num_kv_blocks: int | None = None  # overrides both budgets (tests: a tiny pool forces preemption)
    enable_prefix_caching: bool = True
    encoder_cache_size: int = 64  # images whose vision features are kept
    attention_backend: str = "auto"  # auto (triton on CUDA, torch on CPU) | torch | triton | flash_attn
    cuda_graphs: bool = True  # CUDA: decode steps replay CUDA graphs (model/decode_graphs.py)
    async_scheduling: bool | None = None  # look-ahead steps (module docstring); None: on with CUDA
    # CUDA: batch-1 text decodes through kernels/gemv.py, norms and silu*up fused into the GEMVs.
    # With pdl, a CogVLM-17B batch-1 step on an H200: 3.87 ms against cuBLAS's 4.41 (1.25x the HBM
    # floor against 1.42x; benchmarks/bench_decode.py, RESULTS.md, eighth session).
    one_row_gemv: bool = True
    # CUDA sm_90+: our decode kernels launch as programmatic dependent launches (kernels/pdl.py);
    # a no-op elsewhere. With the GEMVs above: 3.87 ms a step against 3.96 without.
    pdl: bool = True
    # CUDA: autotune the routed expert kernels at start for every row bucket the token budget
    # reaches (4 buckets x 4 shapes at the default budget, about a second each), not on the first
    # image step of each bucket, where it would stall every running request.
    tune_expert_kernels: bool = True
    # CUDA, with one_row_gemv: choose each batch-1 GEMV's config by its time in a CUDA-graph chain
    # over the layers (model/gemv_tuning.py) instead of Triton's autotuner timing each alone; a few
    # seconds at start. Off: on an H200 its 17B steps read 3.72 ms twice, steady but slower than
    # the pinned table's 3.60 (it picks dense's config alone in a chain, not after attention).
    tune_gemv_in_graph: bool = False
    # CUDA, with one_row_gemv: the batch-1 GEMV shapes kernels/gemv.py's TUNED table holds for this
    # card launch its configs, not the autotuner's pick: on an H200 a 17B batch-1 step read 3.60
    # to 3.64 ms pinned (six times, three processes), 3.60 to 3.77 with the autotuner's picks
    # (RESULTS.md, nineteenth session). Tuning in a graph, when asked, replaces it.
    pin_tuned_gemvs: bool = True
    # Steps with image rows: "gathered" keeps the batch's row order, and kernels/expert_linear.py
    # gathers the rows of each tile through the routing; "grouped" carries the rows through the
    # layers in the routing's slot order (CogVLMForCausalLM.use_grouped_expert_rows), where every
    # tile is one run of rows (CUDA: sm_90 or later). Untimed end to end so far:
    # benchmarks/bench_expert_layers.py compares the two.
    expert_rows: str = "gathered"


@dataclass
class RequestOutput:
    """Progress of one completion (request_id, index) in one step."""

    request_id: str  # the id the caller gave
    index: int  # which of the n completions
    new_token_ids: list[int]
    new_text: str
    # NOTE: the whole completion only on the finished output (empty before): copying it every
    # token made each step O(output length) per request; streaming reads the deltas.
    text: str
    token_ids: list[int]
    num_prompt_tokens: int
    finished: bool = False
    finish_reason: str | None = None
    new_logprobs: list[SampledToken] = field(default_factory=list)
    queue_time_s: float | None = None  # set on a completion's first output: arrival to first scheduled
    # on a completion's first output, where asked: per prompt position, its token's logprob given the
    # ones before (None at position 0, which nothing predicts, and on image slots, which hold placeholders)
    prompt_logprobs: list[PromptLogprob | None] | None = None


@dataclass
class _Tracked:
    request_id: str
    index: int
    detokenizer: IncrementalDetokenizer


class Engine:
    def __init__(self, model: CogVLMForCausalLM, processor: Processor, config: EngineConfig = EngineConfig()):
        cfg = model.config
        self.model = model
        self.processor = processor
        self.config = config
        self.max_model_len = config.max_model_len or cfg.max_position_embeddings
        if self.max_model_len > cfg.max_position_embeddings:
            raise ValueError(f"--max-model-len {self.max_model_len} exceeds the checkpoint's "
                             f"max_position_embeddings ({cfg.max_position_embeddings}): the model was not trained "
                             "on longer sequences")  # fmt: skip
        num_blocks = self._num_blocks(model, config)
        if num_blocks * config.block_size < self.max_model_len:
            # a request longer than the whole pool would wait forever: nothing it could preempt frees enough
            raise ValueError(
                f"the KV pool holds {num_blocks * config.block_size} tokens ({num_blocks} blocks of "
                f"{config.block_size}), less than one sequence of max_model_len {self.max_model_len}: give it more "
                "memory (--kv-cache-gb on CPU, --gpu-memory-fraction on CUDA) or lower --max-model-len"
            )
        runner_config = RunnerConfig(num_blocks, config.block_size, config.encoder_cache_size, config.attention_backend,
                                     config.one_row_gemv, config.pdl, config.expert_rows == "grouped")  # fmt: skip
        self.runner = ModelRunner(model, runner_config)
        if config.tune_gemv_in_graph and config.one_row_gemv and model.device.type == "cuda":
            start = time.perf_counter()  # before the decode graphs capture the configs it pins
            chosen = self.runner.tune_one_row_gemvs()
            logger.info("one-row GEMVs tuned in a graph in %.1f s: %s", time.perf_counter() - start, chosen)
        elif config.pin_tuned_gemvs and config.one_row_gemv and model.device.type == "cuda":
            logger.info("one-row GEMVs: %d call shapes pinned from the tuned table", self.runner.pin_tuned_gemvs())
        if config.cuda_graphs and model.device.type == "cuda":
            self.runner.enable_decode_graphs(min(config.max_num_seqs, MAX_GRAPH_BATCH), self.max_model_len)
        if config.tune_expert_kernels and model.device.type == "cuda":
            start = time.perf_counter()
            rows = self.runner.tune_expert_kernels(config.max_num_batched_tokens)
            logger.info("expert kernels (%s rows) tuned for steps of %s rows in %.1f s", config.expert_rows, rows,
                        time.perf_counter() - start)  # fmt: skip
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len), self.kv
        )
        self.tracked: dict[str, _Tracked] = {}  # internal id -> caller's id, index, detokenizer
        self.grammars = Grammars(processor.tokenizer, model.config.vocab_size, model.config.eos_token_ids)
        self.matchers: dict[str, object] = {}  # internal id -> its xgrammar matcher (constrained requests)
        self.prompt_logprobs: dict[str, dict[int, PromptLogprob]] = {}  # internal id -> those read so far
        async_scheduling = config.async_scheduling
        self.async_scheduling = model.device.type == "cuda" if async_scheduling is None else async_scheduling
        self.in_flight: tuple[SchedulerOutput, RunnerOutput] | None = None  # queued, tokens not yet read
        self.num_lookahead_steps = 0
        logger.info("KV pool: %d blocks of %d tokens", num_blocks, config.block_size)

    def _num_blocks(self, model: CogVLMForCausalLM, config: EngineConfig) -> int:
        cfg = model.config
        if config.num_kv_blocks is not None:
            return config.num_kv_blocks
        per_block = PagedKVCache.bytes_per_block(cfg.num_layers, config.block_size, cfg.num_kv_heads, cfg.head_dim,
                                                 model.dtype)  # fmt: skip
        if model.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(model.device)
            budget = free * config.gpu_memory_fraction
        else:
            budget = config.kv_cache_gb * 2**30
        # never more than every running sequence at full length could use
        most = config.max_num_seqs * -(-self.max_model_len // config.block_size)
        return max(1, min(int(budget // per_block), most))

    def add_request(self, request_id: str, prompt: PromptInputs, params: SamplingParams) -> None:
        """Queue a request; n > 1 becomes n sequences sharing the prompt (and, once computed, its blocks)."""
        if prompt.num_tokens >= self.max_model_len:
            raise ParamError(
                f"prompt of {prompt.num_tokens} tokens (image slots included) leaves no room for output "
                f"within max_model_len {self.max_model_len}"
            )
        params.check_model(self.model.config.vocab_size, self.model.config.eos_token_ids)
        if any(f"{request_id}#{i}" in self.tracked for i in range(params.n)):
            raise ParamError(f"request id {request_id!r} is already in use")
        if params.constraint is not None:
            self.grammars.compile(params.constraint)  # an invalid spec fails here, before any sequence is added
        room = self.max_model_len - prompt.num_tokens
        max_tokens = min(params.max_tokens or room, room)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= set(self.model.config.eos_token_ids)
        for index in range(params.n):
            internal_id = f"{request_id}#{index}"
            child = params
            if params.n > 1 and params.seed is not None:
                child = replace(params, seed=params.child_seed(index))
            seq = SequenceData(internal_id, prompt, child)
            self.scheduler.add(Request(seq, max_tokens, frozenset(stop_ids)))
            detokenizer = IncrementalDetokenizer(self.processor.tokenizer, params.stop, params.min_tokens,
                                                 params.include_stop_str_in_output,
                                                 params.skip_special_tokens)  # fmt: skip
            self.tracked[internal_id] = _Tracked(request_id, index, detokenizer)
            if params.constraint is not None:
                self.matchers[internal_id] = self.grammars.matcher(params.constraint)

    def abort(self, request_id: str) -> None:
        for internal_id in [i for i, t in self.tracked.items() if t.request_id == request_id]:
            self.scheduler.finish(internal_id, "abort")
            del self.tracked[internal_id]
            self.matchers.pop(internal_id, None)
            self.prompt_logprobs.pop(internal_id, None)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished or self.in_flight is not None

    def step(self) -> list[RequestOutput]:
        """Queue one step and return the outputs whose tokens were read during the call: this
        step's, or with async scheduling the previous step's (this one stays in flight)."""
        outputs: list[RequestOutput] = []
        in_flight, self.in_flight = self.in_flight, None
        if in_flight is not None:
            ahead = self.scheduler.schedule(ahead=True)
            if ahead is not None:  # schedule(ahead=True) returns None rather than an empty step
                step = self.runner.forward(ahead, feed=in_flight[1])
                self.scheduler.launched(ahead)
                self.num_lookahead_steps += 1
                if self.matchers and any(s.seq.request_id in self.matchers for s in ahead.scheduled):
                    outputs = self._process(*in_flight)  # the matchers take the tokens in flight first
                    result = self.runner.sample(step, self._grammar_mask(ahead))
                else:
                    result = self.runner.sample(step)
                    outputs = self._process(*in_flight)  # waits for the earlier step only
                self.in_flight = (ahead, result)
                return outputs
            outputs = self._process(*in_flight)
        out = self.scheduler.schedule()
        result = self.runner.sample(self.runner.forward(out), self._grammar_mask(out))
        self.scheduler.launched(out)
        if self.async_scheduling and result.pending is not None:
            self.in_flight = (out, result)
            return outputs
        return outputs + self._process(out, result)

    def _grammar_mask(self, out: SchedulerOutput) -> GrammarMask | None:
        """The allowed tokens of the constrained rows that sample this step, from their matchers."""
        if not self.matchers:
            return None
        where, matchers = {}, []
        for s in out.scheduled:
            matcher = self.matchers.get(s.seq.request_id)
            if matcher is not None and s.needs_sample:
                where[s.seq.request_id] = len(matchers)
                matchers.append(matcher)
        return (self.grammars.bitmask(matchers), where) if matchers else None

    def _process(self, out: SchedulerOutput, result: RunnerOutput) -> list[RequestOutput]:
        """Read a step's tokens; stop checks, detokenization, one output per new token."""
        events = self.scheduler.update(out, result)
        for request_id, positions in result.prompt_logprobs.items():
            if request_id in self.tracked:  # not aborted meanwhile
                self.prompt_logprobs.setdefault(request_id, {}).update(positions)
        outputs = []
        for event in events:
            request = event.request
            tracked = self.tracked[request.request_id]
            detok = tracked.detokenizer
            finish_reason = event.finish_reason
            token_id = event.token.token_id
            matcher = self.matchers.get(request.request_id)
            if matcher is not None and not matcher.accept_token(token_id) and finish_reason is None:
                # only where allowed_token_ids or bad_words left the grammar no token to sample
                logger.warning("request %s: token %d breaks its structured output; stopped", tracked.request_id,
                               token_id)  # fmt: skip
                finish_reason = "stop"
                self.scheduler.finish(request.request_id, "stop")
            stop_token = finish_reason == "stop" and token_id in request.stop_token_ids
            if not stop_token or request.seq.params.include_stop_str_in_output:
                detok.add([token_id])  # the stop token is text only when asked, as in vLLM
            if detok.stopped and finish_reason is None:
                finish_reason = "stop"
                self.scheduler.finish(request.request_id, "stop")
            finished = finish_reason is not None
            if finished:
                detok.flush()
                del self.tracked[request.request_id]
                self.matchers.pop(request.request_id, None)
            outputs.append(RequestOutput(
                request_id=tracked.request_id, index=tracked.index, new_token_ids=[token_id],
                new_text=detok.take_delta(finished), text=detok.text if finished else "",
                token_ids=list(request.output_token_ids) if finished else [],
                num_prompt_tokens=request.seq.num_prompt_tokens, finished=finished, finish_reason=finish_reason,
                new_logprobs=[event.token] if request.seq.params.logprobs is not None else [],
                queue_time_s=(request.first_scheduled_time - request.arrival_time
                              if len(request.output_token_ids) == 1 and request.first_scheduled_time else None),
                prompt_logprobs=self._take_prompt_logprobs(request) if len(request.output_token_ids) == 1 else None,
            ))  # fmt: skip
        return outputs

    def _take_prompt_logprobs(self, request: Request) -> list[PromptLogprob | None] | None:
        if request.seq.params.prompt_logprobs is None:
            return None
        got = self.prompt_logprobs.pop(request.request_id, {})
        return [None] + [got.get(position) for position in range(1, len(request.seq.prompt.input_ids))]

    def generate(self, requests: list[tuple[PromptInputs, SamplingParams]]) -> list[list[RequestOutput]]:
        """Run to completion. Returns, per request in order, its n final outputs (index order)
        with the complete text, token ids, logprobs and prompt logprobs."""
        for i, (prompt, params) in enumerate(requests):
            self.add_request(f"generate-{i}", prompt, params)
        finals: dict[tuple[str, int], RequestOutput] = {}
        logprobs: dict[tuple[str, int], list[SampledToken]] = {}
        prompt_logprobs: dict[tuple[str, int], list[PromptLogprob | None]] = {}
        while self.has_unfinished:
            for output in self.step():
                key = (output.request_id, output.index)
                logprobs.setdefault(key, []).extend(output.new_logprobs)
                if output.prompt_logprobs is not None:
                    prompt_logprobs[key] = output.prompt_logprobs
                if output.finished:
                    output.new_logprobs = logprobs.pop(key)
                    output.prompt_logprobs = prompt_logprobs.pop(key, None)
                    finals[key] = output
        return [[finals[(f"generate-{i}", j)] for j in range(params.n)] for i, (_, params) in enumerate(requests)]
