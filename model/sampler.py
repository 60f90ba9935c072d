"""Batched sampling on the device, for every parameter of SamplingParams.

Order, as vLLM: logprobs from the raw logits; then repetition / frequency / presence penalties;
min_tokens (stop tokens masked); greedy rows take the argmax; the rest are divided by their
temperature, filtered by min_p, top_k and top_p, and sampled with the exponential race
(argmax of p / q with q ~ Exp(1)), whose noise for a seeded request comes from that request's
own generator, so its tokens do not depend on the rest of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.batch import SampledToken, SequenceData
from model.sampling_params import SamplingParams
from model.transfer import to_device


@dataclass
class SampledBatch:
    """One step's samples, still on the device; `to_host` waits for this step alone."""

    tokens: torch.Tensor  # [B] int64, on the device
    params: list[SamplingParams]
    logprobs: torch.Tensor | None  # [B, V] raw log-softmax, when a row asks for logprobs
    host_tokens: torch.Tensor | None = None  # CUDA: pinned copy of tokens, written after `ready`
    ready: torch.cuda.Event | None = None

    @staticmethod
    def start_copy(tokens: torch.Tensor, params: list[SamplingParams], logprobs: torch.Tensor | None) -> SampledBatch:
        if not tokens.is_cuda:
            return SampledBatch(tokens, params, logprobs)
        # NOTE: a plain .tolist() would wait for everything queued, the next step included
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return SampledBatch(tokens, params, logprobs, host, ready)

    def to_host(self) -> list[SampledToken]:
        if self.ready is not None:
            self.ready.synchronize()
            tokens = self.host_tokens.tolist()
        else:
            tokens = self.tokens.tolist()
        out = []
        for i, (token, p) in enumerate(zip(tokens, self.params, strict=True)):
            result = SampledToken(token_id=token)
            if p.logprobs is not None:
                result.logprob = float(self.logprobs[i, token])
                if p.logprobs:
                    top = self.logprobs[i].topk(p.logprobs)
                    result.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
            out.append(result)
        return out


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...]):
        self.eos_token_ids = eos_token_ids
        self.generators: dict[str, torch.Generator] = {}  # seeded requests' own generators

    def forget(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    def __call__(self, logits: torch.Tensor, seqs: list[SequenceData]) -> list[SampledToken]:
        """logits: [B, vocab] fp32, one row per sequence that samples this step."""
        return self.sample(logits, seqs).to_host()

    def sample(self, logits: torch.Tensor, seqs: list[SequenceData]) -> SampledBatch:
        """Everything on the device, nothing read back: the host may queue the next step first."""
        device = logits.device
        params = [s.params for s in seqs]
        logprobs = torch.log_softmax(logits, dim=-1) if any(p.logprobs is not None for p in params) else None
        logits = logits.clone()
        self._apply_penalties(logits, seqs)
        self._mask_stop_tokens(logits, seqs)

        greedy = [p.is_greedy for p in params]
        tokens = logits.argmax(dim=-1)
        if not all(greedy):
            tokens = torch.where(to_device(greedy, device), tokens, self._sample(logits, seqs))
        return SampledBatch.start_copy(tokens, params, logprobs)

    def _sample(self, logits: torch.Tensor, seqs: list[SequenceData]) -> torch.Tensor:  # [B] token ids
        params = [s.params for s in seqs]
        vocab = logits.shape[1]
        temperature = to_device([p.temperature if p.temperature > 0 else 1.0 for p in params], logits.device)
        probs = self._filtered_probs(logits / temperature[:, None], params)
        noise = torch.empty_like(probs)
        unseeded = [i for i, p in enumerate(params) if p.seed is None]
        if unseeded:
            rows = to_device(unseeded, logits.device)
            noise[rows] = torch.empty(len(unseeded), vocab, device=logits.device).exponential_()
        for i, seq in enumerate(seqs):
            if seq.params.seed is not None:
                noise[i] = torch.empty(vocab, device=logits.device).exponential_(
                    generator=self._generator(seq, logits.device)
                )
        return (probs / noise).argmax(dim=-1)

    def _generator(self, seq: SequenceData, device: torch.device) -> torch.Generator:
        gen = self.generators.get(seq.request_id)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(seq.params.seed)
            self.generators[seq.request_id] = gen
        return gen

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, seqs: list[SequenceData]) -> None:
        vocab = logits.shape[1]
        for i, seq in enumerate(seqs):
            p = seq.params
            if p.repetition_penalty != 1.0:
                seen = to_device(seq.prompt.input_ids + seq.output_token_ids, logits.device)
                seen = seen[seen < vocab].unique()
                row = logits[i, seen]
                logits[i, seen] = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            if (p.frequency_penalty or p.presence_penalty) and seq.output_token_ids:
                out_ids = to_device(seq.output_token_ids, logits.device)
                counts = torch.bincount(out_ids, minlength=vocab)[:vocab].to(logits.dtype)
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)

    def _mask_stop_tokens(self, logits: torch.Tensor, seqs: list[SequenceData]) -> None:
        for i, seq in enumerate(seqs):
            p = seq.params
            if len(seq.output_token_ids) < p.min_tokens:
                stop_ids = list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_token_ids))
                stop_ids = [t for t in stop_ids if t < logits.shape[1]]
                logits[i, to_device(stop_ids, logits.device, torch.long)] = float("-inf")

    @staticmethod
    def _filtered_probs(scaled: torch.Tensor, params) -> torch.Tensor:  # [B, V] -> [B, V] probabilities
        probs = torch.softmax(scaled, dim=-1)
        if any(p.min_p > 0 for p in params):  # decided on the host: a device .any() would wait
            min_p = to_device([p.min_p for p in params], scaled.device)
            probs = torch.where(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0, probs)
        top_k = [p.effective_top_k for p in params]
        top_p = [p.top_p for p in params]
        if any(top_k) or any(tp < 1.0 for tp in top_p):
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            ranks = torch.arange(probs.shape[1], device=probs.device)[None, :]
            k = to_device([k or probs.shape[1] for k in top_k], probs.device)[:, None]
            sorted_probs = torch.where(ranks < k, sorted_probs, 0.0)
            # top_p over what top_k kept: the smallest prefix whose mass reaches top_p (>= 1 token)
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            total = sorted_probs.sum(dim=-1, keepdim=True)
            keep = mass_before < to_device(top_p, probs.device)[:, None] * total
            sorted_probs = torch.where(keep, sorted_probs, 0.0)
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
        return probs
