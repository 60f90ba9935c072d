"""Batched sampling on the device, for every parameter of SamplingParams.

Order, as vLLM: structured output's mask (the tokens a request's grammar rules out, from a host
bitmask); logprobs, from those logits; then repetition / frequency / presence penalties,
logit_bias, allowed_token_ids (every other token masked), bad words, min_tokens (stop tokens
masked, unless the grammar allows nothing else); greedy rows take the argmax; the rest are
divided by their temperature, filtered by min_p, top_k and top_p, and sampled with the
exponential race (argmax of p / q with q ~ Exp(1)), whose noise for a seeded request comes from
that request's own generator, so its tokens do not depend on the rest of the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.batch import SampledToken, SequenceData
from model.sampling_params import SamplingParams
from model.transfer import to_device, to_host_later

_READ_BACK = ("tokens", "logprobs", "top_values", "top_indices")  # SampledBatch's tensors


@dataclass
class SampledBatch:
    """One step's samples, on the device; `to_host` waits for this step alone and reads them
    from one pinned copy (per-row reads would each wait for everything queued)."""

    params: list[SamplingParams]
    tokens: torch.Tensor  # [B] int64: also the next look-ahead step's inputs
    logprobs: torch.Tensor | None = None  # [B] fp32: each sampled token's logprob, when a row asks
    top_values: torch.Tensor | None = None  # [B, K] fp32: the K best logprobs, K the most a row asks
    top_indices: torch.Tensor | None = None  # [B, K] int64
    read_back: Callable[[], list[torch.Tensor | None]] | None = None  # set by start_copy

    def start_copy(self) -> SampledBatch:
        self.read_back = to_host_later([getattr(self, name) for name in _READ_BACK])
        return self

    def to_host(self) -> list[SampledToken]:
        tensors = dict(zip(_READ_BACK, self.read_back(), strict=True))
        read = {name: t.tolist() for name, t in tensors.items() if t is not None}
        out = []
        for i, (token, p) in enumerate(zip(read["tokens"], self.params, strict=True)):
            result = SampledToken(token_id=token)
            if p.logprobs is not None:
                result.logprob = read["logprobs"][i]
                if p.logprobs:
                    k = p.logprobs
                    result.top_logprobs = list(zip(read["top_indices"][i][:k], read["top_values"][i][:k], strict=True))
            out.append(result)
        return out


def _token_counts(ids: list[int], in_flight: torch.Tensor | None, vocab: int, device) -> torch.Tensor:
    """[V] fp32 occurrences of each token id among ids (and the token in flight, -1 for none).
    Fixed-size scatter: bincount and unique would read the ids' range back from the device."""
    ids_t = to_device(ids, device, torch.long)
    if in_flight is not None:
        ids_t = torch.cat([ids_t, in_flight])
    valid = ((ids_t >= 0) & (ids_t < vocab)).to(torch.float32)  # ids past the vocab (none expected) count 0
    return torch.zeros(vocab, device=device).index_add_(0, ids_t.clamp(0, vocab - 1), valid)


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...]):
        self.eos_token_ids = eos_token_ids
        self.generators: dict[str, torch.Generator] = {}  # seeded requests' own generators
        # allowed_token_ids as a [V] bool mask of the tokens it rules out, built on the device once
        # a request (its ids, the key, are the request's own tuple): not an upload of them every step
        self.disallowed: dict[str, tuple[tuple[int, ...], torch.Tensor]] = {}

    def forget(self, request_id: str) -> None:
        self.generators.pop(request_id, None)
        self.disallowed.pop(request_id, None)

    def __call__(self, logits: torch.Tensor, seqs: list[SequenceData]) -> list[SampledToken]:
        """logits: [B, vocab] fp32, one row per sequence that samples this step."""
        return self.sample(logits, seqs).to_host()

    def sample(
        self,
        logits: torch.Tensor,  # [B, V] fp32
        seqs: list[SequenceData],
        in_flight: list[bool] | None = None,  # rows whose newest token is in flight, not in output_token_ids
        in_flight_tokens: torch.Tensor | None = None,  # [B] int64 on the device: those tokens, -1 elsewhere
        grammar_mask: tuple[list[int], torch.Tensor] | None = None,  # rows, [G, ceil(V/32)] int32 allowed bits
    ) -> SampledBatch:
        """Everything on the device, nothing read back: the host may queue the next step first.
        A look-ahead row counts its token in flight as generated (min_tokens, penalties)."""
        device = logits.device
        params = [s.params for s in seqs]
        in_flight = in_flight or [False] * len(seqs)
        masked = [self._masks_stop_tokens(s, fed) for s, fed in zip(seqs, in_flight, strict=True)]
        edits = any(p.counts_tokens or p.logit_bias or p.allowed_token_ids or p.bad_word_ids for p in params)
        edits = edits or any(masked)
        if edits or grammar_mask is not None:
            # NOTE: edited in place below; otherwise read as they are (a decode graph's output buffer,
            # which the next replay overwrites only after this step's reads, in stream order)
            logits = logits.clone()
        constrained = set(grammar_mask[0]) if grammar_mask is not None else set()
        if grammar_mask is not None:  # before the logprobs, as vLLM's: over the tokens the grammar allows
            self._mask_by_grammar(logits, *grammar_mask)
        logprobs = torch.log_softmax(logits, dim=-1) if any(p.logprobs is not None for p in params) else None
        if edits:
            self._apply_penalties(logits, seqs, in_flight_tokens)
            self._apply_logit_bias(logits, params)
            self._mask_disallowed(logits, seqs)
            self._mask_bad_words(logits, seqs, in_flight, in_flight_tokens)
            self._mask_stop_tokens(logits, seqs, masked, constrained)

        greedy = [p.is_greedy for p in params]
        tokens = logits.argmax(dim=-1)
        if not all(greedy):
            tokens = torch.where(to_device(greedy, device), tokens, self._sample(logits, seqs))
        batch = SampledBatch(params, tokens)
        if logprobs is not None:  # [B, V] -> what the rows asked for, gathered for the whole batch
            batch.logprobs = logprobs.gather(1, tokens[:, None])[:, 0]
            most = max(p.logprobs or 0 for p in params)
            if most:
                batch.top_values, batch.top_indices = logprobs.topk(most, dim=-1)
        return batch.start_copy()

    def _sample(self, logits: torch.Tensor, seqs: list[SequenceData]) -> torch.Tensor:  # [B] token ids
        params = [s.params for s in seqs]
        vocab = logits.shape[1]
        temperature = to_device([p.effective_temperature for p in params], logits.device)
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
    def _apply_penalties(
        logits: torch.Tensor, seqs: list[SequenceData], in_flight_tokens: torch.Tensor | None = None
    ) -> None:
        vocab = logits.shape[1]
        for i, seq in enumerate(seqs):
            p = seq.params
            if not p.counts_tokens:
                continue
            in_flight = in_flight_tokens[i : i + 1] if in_flight_tokens is not None else None
            counts = _token_counts(seq.output_token_ids, in_flight, vocab, logits.device)  # [V]
            if p.has_repetition_penalty:
                seen = (counts + _token_counts(seq.prompt.input_ids, None, vocab, logits.device)) > 0
                row = logits[i]
                logits[i] = torch.where(seen, torch.where(row > 0, row / p.repetition_penalty,
                                                          row * p.repetition_penalty), row)  # fmt: skip
            if p.has_additive_penalties:
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)

    @staticmethod
    def _apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> None:
        """OpenAI's logit_bias: added to the logits (after the penalties, before min_tokens' mask),
        so it steers greedy rows too; logprobs stay those of the raw logits, as vLLM's."""
        vocab = logits.shape[1]
        for i, p in enumerate(params):
            # ids past the vocabulary are refused by the engine; here they are dropped before int64
            bias = [(t, b) for t, b in p.logit_bias if t < vocab]
            if bias:
                ids, biases = zip(*bias, strict=True)
                ids_t = to_device(list(ids), logits.device, torch.long)
                logits[i].index_add_(0, ids_t, to_device(list(biases), logits.device, logits.dtype))

    def _mask_disallowed(self, logits: torch.Tensor, seqs: list[SequenceData]) -> None:
        """vLLM's allowed_token_ids: every other token's logit is -inf, so greedy and sampled rows
        pick among them (logprobs stay those of the raw logits). SamplingParams.check_model makes
        sure min_tokens leaves one of them."""
        vocab = logits.shape[1]
        for i, seq in enumerate(seqs):
            allowed = seq.params.allowed_token_ids
            if allowed is None:
                continue
            cached = self.disallowed.get(seq.request_id)
            if cached is None or cached[0] is not allowed:
                ids = to_device([t for t in allowed if t < vocab], logits.device, torch.long)  # ids past it: refused
                mask = torch.ones(vocab, dtype=torch.bool, device=logits.device).index_fill_(0, ids, False)
                cached = self.disallowed[seq.request_id] = (allowed, mask)
            logits[i].masked_fill_(cached[1], float("-inf"))

    @staticmethod
    def _mask_bad_words(
        logits: torch.Tensor, seqs: list[SequenceData], in_flight: list[bool], in_flight_tokens: torch.Tensor | None
    ) -> None:
        """vLLM's bad_words: a word's last token is masked where the output so far ends with the
        rest of the word. A look-ahead row's newest token is still on the device: the host checks
        the word up to its second-to-last token, and the device compares that one with the token
        in flight (no read back)."""
        vocab = logits.shape[1]
        rows, ids = [], []  # masked outright
        fed_rows, fed_ids, fed_newest = [], [], []  # masked where the row's token in flight is fed_newest
        for i, seq in enumerate(seqs):
            out = seq.output_token_ids
            for word in seq.params.bad_word_ids:
                if max(word) >= vocab:  # refused by the engine; dropped here before int64
                    continue
                *rest, last = word
                newest = rest.pop() if rest and in_flight[i] else None
                if len(rest) > len(out) or out[len(out) - len(rest) :] != rest:
                    continue
                if newest is None:
                    rows.append(i)
                    ids.append(last)
                else:
                    fed_rows.append(i)
                    fed_ids.append(last)
                    fed_newest.append(newest)
        device = logits.device
        if rows:
            logits[to_device(rows, device, torch.long), to_device(ids, device, torch.long)] = float("-inf")
        if fed_rows:
            rows_t = to_device(fed_rows, device, torch.long)
            hit = in_flight_tokens[rows_t] == to_device(fed_newest, device, torch.long)
            # accumulate: two words may end in the same token after different ones (a plain write
            # of both would keep either)
            logits.index_put_((rows_t, to_device(fed_ids, device, torch.long)),
                              torch.where(hit, float("-inf"), 0.0), accumulate=True)  # fmt: skip

    @staticmethod
    def _mask_by_grammar(logits: torch.Tensor, rows: list[int], bits: torch.Tensor) -> None:
        """Structured output (server/grammars.py): the tokens each row's grammar rules out are -inf.
        bits: [G, ceil(V / 32)] int32 from the host, bit t of word w set where token 32 w + t is allowed."""
        device, vocab = logits.device, logits.shape[1]
        words = bits.to(device, non_blocking=True)
        shifts = torch.arange(32, dtype=torch.int32, device=device)
        # an arithmetic shift keeps bit 31's sign: (-1 & 1) is still 1, the bit
        allowed = ((words[:, :, None] >> shifts) & 1).bool().flatten(1)[:, :vocab]  # [G, V]
        rows_t = to_device(rows, device, torch.long)
        logits[rows_t] = logits[rows_t].masked_fill(~allowed, float("-inf"))

    @staticmethod
    def _masks_stop_tokens(seq: SequenceData, in_flight: bool) -> bool:
        """min_tokens: the row may not stop yet."""
        return len(seq.output_token_ids) + in_flight < seq.params.min_tokens

    def _mask_stop_tokens(
        self, logits: torch.Tensor, seqs: list[SequenceData], masked: list[bool], constrained: set[int]
    ) -> None:
        for i, seq in enumerate(seqs):
            p = seq.params
            if masked[i]:
                stop_ids = list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_token_ids))
                stop_ids = [t for t in stop_ids if t < logits.shape[1]]  # before int64: ids may be any size
                stop_t = to_device(stop_ids, logits.device, torch.long)
                if i in constrained:
                    # a complete text (the grammar allows only stop tokens) stops even before
                    # min_tokens: decided on the device, where the row is (no read back)
                    row = logits[i].index_fill(0, stop_t, float("-inf"))
                    logits[i] = torch.where(row.amax() > float("-inf"), row, logits[i])
                else:
                    logits[i, stop_t] = float("-inf")

    @staticmethod
    def _filtered_probs(scaled: torch.Tensor, params) -> torch.Tensor:  # [B, V] -> [B, V] probabilities
        probs = torch.softmax(scaled, dim=-1)
        if any(p.min_p > 0 for p in params):  # decided on the host: a device .any() would wait
            min_p = to_device([p.min_p for p in params], scaled.device)
            probs = torch.where(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0, probs)
        vocab = scaled.shape[1]
        top_k = [p.effective_top_k for p in params]  # a top_k past the vocabulary keeps every token
        top_p = [p.top_p for p in params]
        if any(top_k) or any(tp < 1.0 for tp in top_p):
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            ranks = torch.arange(probs.shape[1], device=probs.device)[None, :]
            k = to_device([min(k or vocab, vocab) for k in top_k], probs.device)[:, None]
            sorted_probs = torch.where(ranks < k, sorted_probs, 0.0)
            # top_p over what top_k kept: the smallest prefix whose mass reaches top_p (>= 1 token)
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            total = sorted_probs.sum(dim=-1, keepdim=True)
            keep = mass_before < to_device(top_p, probs.device)[:, None] * total
            sorted_probs = torch.where(keep, sorted_probs, 0.0)
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
        return probs
