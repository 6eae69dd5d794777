"""The batched sampler: logits of a batch (one row per request) -> next tokens and their logprobs."""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain
from typing import Sequence

import torch

from server.engine.request import Request
from server.engine.sampling import SamplingParams


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float                    # log_softmax of the raw logits; -inf where the model gave -inf
    rank: int                         # 1 + number of tokens with a strictly higher logprob
    top: list[tuple[int, float]]      # the requested top-k (id, logprob), logprob descending; may be empty


@dataclass
class SamplerOutput:
    token_ids: list[int]                      # one per row
    logprobs: list[TokenLogprobs | None]      # one per row; None where the request asked for no logprobs


# Rows of log_softmax computed at once: bounds the temporary to 32M floats (128 MB) even for a 256000-token vocab
# over a long prompt.
_LOGPROB_CHUNK_ELEMENTS = 1 << 25


class Sampler:
    """Turns one row of logits per request into one token per request (plus logprobs when asked).

    Seeded requests draw from their own `torch.Generator`, kept here by request id until `free()`, so the same
    request gives the same tokens whatever else shares the batch. Unseeded rows share one generator; pass
    `seed` to make those reproducible too (tests, benchmarks).
    """

    def __init__(self, seed: int | None = None):
        self._seed = seed
        self._shared: dict[torch.device, torch.Generator] = {}
        self._per_request: dict[str, torch.Generator] = {}

    def free(self, request_id: str) -> None:
        """Forget a finished request's generator; a no-op for requests that had none."""
        self._per_request.pop(request_id, None)

    def __call__(self, logits: torch.Tensor, requests: Sequence[Request]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(f"expected logits [{len(requests)}, V], got {list(logits.shape)}")
        logits = logits.float()                                       # [B, V]; a no-op for float32
        processed = process_logits(logits, requests)                  # [B, V]
        tokens = self._choose_tokens(processed, requests)             # [B]
        # Logprobs describe the model's raw distribution (vLLM v1's default), not the processed one.
        return SamplerOutput(tokens.tolist(), _sampled_logprobs(logits, requests, tokens))

    def _choose_tokens(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        sampled_rows = [i for i, r in enumerate(requests) if not r.sampling_params.greedy]
        if not sampled_rows:
            return logits.argmax(dim=-1)                              # [B]
        if len(sampled_rows) == len(requests):
            return self._sample(logits, requests)                     # [B]
        tokens = logits.argmax(dim=-1)                                # [B]; sampled rows are overwritten below
        rows = torch.tensor(sampled_rows, device=logits.device)       # [R]
        tokens[rows] = self._sample(logits[rows], [requests[i] for i in sampled_rows])
        return tokens

    def _sample(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """Temperature, top-k, min-p, top-p, then one draw per row. logits [R, V] -> token ids [R]."""
        params = [r.sampling_params for r in requests]
        x = _apply_min_p(_apply_temperature(logits, params), params)  # [R, V]
        gumbel = self._gumbel_noise(requests, x.shape[1], x.device)   # [R, V], indexed by token id
        filtered = [i for i, p in enumerate(params) if p.top_k_enabled or p.top_p < 1.0]
        if len(filtered) == len(params):
            return _sample_top_k_top_p(x, gumbel, params)             # [R]
        # Gumbel-max: argmax(x + G) is a draw from softmax(x), with no softmax and no sort.
        tokens = (x + gumbel).argmax(dim=-1)                          # [R]
        if filtered:
            rows = torch.tensor(filtered, device=x.device)            # [F]
            tokens[rows] = _sample_top_k_top_p(x[rows], gumbel[rows], [params[i] for i in filtered])
        return tokens

    def _gumbel_noise(self, requests: Sequence[Request], vocab: int, device: torch.device) -> torch.Tensor:
        """Gumbel noise -log(-log U) [R, V]: unseeded rows from the shared generator, seeded rows from their own.

        From uniform_ rather than exponential_: on the CPU exponential_ costs 6x more (157 vs 26 us for 8 x 1000).
        """
        uniform = torch.empty(len(requests), vocab, device=device)    # [R, V]
        seeded = [(i, r) for i, r in enumerate(requests) if r.sampling_params.seed is not None]
        if len(seeded) < len(requests):
            uniform.uniform_(generator=self._shared_generator(device))
        for i, request in seeded:
            # A fresh [V] draw each step, so what a seeded row gets never depends on its place in the batch.
            generator = self._request_generator(request, device)
            uniform[i] = torch.empty(vocab, device=device).uniform_(generator=generator)
        # Clamp the Exp(1) value away from 0 (U = 1; uniform_ should never return it, but some backends have):
        # its +inf noise on a masked -inf logit would be NaN, which argmax picks.
        exponential = uniform.log_().neg_().clamp_min_(torch.finfo(uniform.dtype).tiny)       # [R, V]
        return exponential.log_().neg_()

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        generator = self._shared.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            if self._seed is None:
                generator.seed()                                      # nondeterministic
            else:
                generator.manual_seed(self._seed)
            self._shared[device] = generator
        return generator

    def _request_generator(self, request: Request, device: torch.device) -> torch.Generator:
        generator = self._per_request.get(request.request_id)
        if generator is None:
            generator = torch.Generator(device=device)
            # manual_seed takes 64 bits; any other int (negative, huge) is folded in rather than crashing the step.
            generator.manual_seed(request.sampling_params.seed % (1 << 64))
            self._per_request[request.request_id] = generator
        return generator


# --- logits processing before the greedy / sampled split (order as in vLLM v1) ---------------------------------

def process_logits(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """logit_bias, min_tokens, repetition penalty, then frequency/presence penalties. [B, V] -> [B, V].

    Out of place: the caller's tensor stays the raw distribution (logprobs are read from it). Returns `logits`
    itself when no row needs any of these, so the common case costs a few passes over the request list.
    """
    logits = _apply_logit_bias(logits, requests)
    logits = _apply_min_tokens(logits, requests)
    logits = _apply_repetition_penalty(logits, requests)
    return _apply_frequency_presence_penalties(logits, requests)


def _apply_logit_bias(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    rows = [i for i, r in enumerate(requests) if r.sampling_params.logit_bias]
    if not rows:
        return logits
    biases = [requests[i].sampling_params.logit_bias for i in rows]
    index = _row_token_index(rows, [list(b) for b in biases], logits.device)                # ([N], [N])
    values = torch.tensor([v for b in biases for v in b.values()], dtype=logits.dtype, device=logits.device)
    return logits.index_put(index, values, accumulate=True)


def _apply_min_tokens(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    rows, banned = [], []
    for i, request in enumerate(requests):
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            continue
        ids = list(params.stop_token_ids)
        if request.eos_token_id is not None and not params.ignore_eos:   # with ignore_eos EOS is a plain token
            ids.append(request.eos_token_id)
        if ids:
            rows.append(i)
            banned.append(ids)
    if not rows:
        return logits
    index = _row_token_index(rows, banned, logits.device)                                    # ([N], [N])
    return logits.index_put(index, torch.tensor(-math.inf, dtype=logits.dtype, device=logits.device))


def _apply_repetition_penalty(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    rows = [i for i, r in enumerate(requests) if r.sampling_params.repetition_penalty != 1.0]
    if not rows:
        return logits
    tokens = [chain(requests[i].prompt_token_ids, requests[i].output_token_ids) for i in rows]
    seen = _token_counts(logits.shape, rows, tokens, logits.device) > 0                      # [B, V]
    penalty = _row_values(requests, "repetition_penalty", logits)                           # [B, 1]
    return apply_repetition_penalty(logits, seen, penalty)


def _apply_frequency_presence_penalties(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    rows = [i for i, r in enumerate(requests)
            if r.sampling_params.frequency_penalty != 0.0 or r.sampling_params.presence_penalty != 0.0]
    if not rows:
        return logits
    counts = _token_counts(logits.shape, rows, [requests[i].output_token_ids for i in rows], logits.device)
    frequency = _row_values(requests, "frequency_penalty", logits)                           # [B, 1]
    presence = _row_values(requests, "presence_penalty", logits)                             # [B, 1]
    return apply_frequency_presence_penalties(logits, counts, frequency, presence)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """HF/vLLM rule on tokens already seen: positive logits divided by the penalty, negative ones multiplied.

    logits [B, V], seen [B, V] bool, penalty [B, 1] (1.0 leaves a row unchanged).
    """
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)                 # [B, V]
    return torch.where(seen, penalized, logits)


def apply_frequency_presence_penalties(logits: torch.Tensor, counts: torch.Tensor, frequency: torch.Tensor,
                                       presence: torch.Tensor) -> torch.Tensor:
    """OpenAI rule: logit -= frequency * count + presence * (count > 0).

    logits [B, V], counts [B, V] (output-token occurrences), frequency / presence [B, 1].
    """
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def _row_token_index(rows: list[int], token_lists: list, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) index pairs for index_put, built without a Python loop over the tokens."""
    flat = torch.tensor(list(chain.from_iterable(token_lists)), dtype=torch.long)            # [N]
    lengths = torch.tensor([len(t) for t in token_lists])                                    # [len(rows)]
    row_idx = torch.repeat_interleave(torch.tensor(rows, dtype=torch.long), lengths)         # [N]
    return row_idx.to(device), flat.to(device)


def _token_counts(shape: torch.Size, rows: list[int], token_iters: list, device: torch.device) -> torch.Tensor:
    """How often each token occurs in each listed row: [B, V] float32 (zeros for rows not listed)."""
    token_lists = [list(t) for t in token_iters]
    row_idx, token_idx = _row_token_index(rows, token_lists, device)                         # [N], [N]
    counts = torch.zeros(shape, dtype=torch.float32, device=device)                          # [B, V]
    return counts.index_put_((row_idx, token_idx), torch.ones(len(token_idx), device=device), accumulate=True)


def _row_values(requests: Sequence[Request], name: str, like: torch.Tensor) -> torch.Tensor:
    """One sampling parameter per row as a column: [B, 1]."""
    values = [getattr(r.sampling_params, name) for r in requests]
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)


# --- the sampled rows' filters -----------------------------------------------------------------------------

def _apply_temperature(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    temperatures = [p.temperature for p in params]
    if all(t == 1.0 for t in temperatures):
        return logits
    return logits / torch.tensor(temperatures, dtype=logits.dtype, device=logits.device).unsqueeze(1)  # [R, V]


def _apply_min_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Drop tokens with prob < min_p * max prob. In logit space that is logit < max logit + log(min_p), which
    needs no softmax and commutes with top-k (both only cut below a threshold and keep the top token)."""
    min_p = [p.min_p for p in params]
    if not any(min_p):
        return logits
    log_min_p = torch.tensor(min_p, dtype=logits.dtype, device=logits.device).log()          # [R]; log 0 = -inf
    threshold = logits.max(dim=-1).values + log_min_p                                        # [R]
    return logits.masked_fill(logits < threshold.unsqueeze(1), -math.inf)


def _sample_top_k_top_p(logits: torch.Tensor, gumbel: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Draw from rows that have a top-k and/or a top-p. logits, gumbel [F, V] -> token ids [F]."""
    # A top-k of the whole vocabulary or more keeps every token (0: off). Clamped here because any int passes
    # validation: 2**63 overflowed the int64 tensor of k's below and failed the whole step.
    vocab = logits.shape[-1]
    top_k = [(0 if p.top_k >= vocab else p.top_k) if p.top_k_enabled else 0 for p in params]
    top_p = [p.top_p for p in params]
    candidates, token_idx, log_total = _top_k_candidates(logits, top_k, top_p)   # [F, W], [F, W], [F]
    candidates = _mask_top_p(candidates, top_p, log_total)
    # The noise stays attached to token ids, so a seeded row draws the same token whatever the width W (which
    # depends on the other rows) turned out to be.
    choice = (candidates + gumbel.gather(1, token_idx)).argmax(dim=-1, keepdim=True)       # [F, 1]
    return token_idx.gather(1, choice).squeeze(1)                                          # [F]


# Candidates kept for top-p rows without a top-k when the first tokens already hold the top_p mass (the usual
# case): a topk of 256 costs 8 ms on the CPU for 8 x 256000 logits, a full sort 165 ms.
_TOP_P_CANDIDATES = 256


def _top_k_candidates(logits: torch.Tensor, top_k: list[int],
                      top_p: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best W logits of each row in descending order with top-k applied, their token ids, and each row's
    log total mass after top-k (what top-p's fractions are of). logits [F, V] -> [F, W], [F, W], [F].
    """
    vocab = logits.shape[1]
    if all(top_k):                    # exact: nothing past the largest k can survive
        candidates, token_idx = logits.topk(min(max(top_k), vocab), dim=-1)
        candidates = _mask_top_k(candidates, top_k)
        return candidates, token_idx, candidates.logsumexp(dim=-1)
    width = max(_TOP_P_CANDIDATES, max(top_k))
    if width < vocab:
        candidates, token_idx = logits.topk(width, dim=-1)                                 # [F, W]
        full = logits.logsumexp(dim=-1)                                                     # [F]
        # Rows without a top-k see the whole vocabulary's mass; their top-p prefix must end inside W.
        has_k = torch.tensor([k > 0 for k in top_k], device=logits.device)                  # [F]
        reach = (candidates.logsumexp(dim=-1) - full).exp()                                 # [F]
        bar = torch.tensor(top_p, dtype=reach.dtype, device=logits.device)                  # [F]
        if bool((has_k | (reach > bar)).all()):
            candidates = _mask_top_k(candidates, top_k)
            return candidates, token_idx, torch.where(has_k, candidates.logsumexp(dim=-1), full)
    candidates, token_idx = logits.sort(dim=-1, descending=True)                           # [F, V]
    candidates = _mask_top_k(candidates, top_k)
    return candidates, token_idx, candidates.logsumexp(dim=-1)


def _mask_top_k(sorted_logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    if not any(top_k):
        return sorted_logits
    width = sorted_logits.shape[1]
    k = torch.tensor([k or width for k in top_k], device=sorted_logits.device)              # [F]; 0 = keep all
    position = torch.arange(width, device=sorted_logits.device)                              # [W]
    return sorted_logits.masked_fill(position.unsqueeze(0) >= k.unsqueeze(1), -math.inf)


def _mask_top_p(sorted_logits: torch.Tensor, top_p: list[float], log_total: torch.Tensor) -> torch.Tensor:
    """Keep the smallest prefix whose probability reaches top_p: drop a token once the mass before it does.
    The top token has zero mass before it, so it always stays. log_total [F] normalizes the probabilities."""
    if all(p == 1.0 for p in top_p):
        return sorted_logits
    # Rows with top_p = 1 get an unreachable bar: float32 cumsum over 256000 tokens can exceed 1.0 and would
    # otherwise drop tail tokens.
    bar = torch.tensor([p if p < 1.0 else math.inf for p in top_p], device=sorted_logits.device)   # [F]
    probs = (sorted_logits - log_total.unsqueeze(1)).exp()                                 # [F, W]
    mass_before = probs.cumsum(dim=-1) - probs                                               # [F, W]
    return sorted_logits.masked_fill(mass_before >= bar.unsqueeze(1), -math.inf)


# --- logprobs ----------------------------------------------------------------------------------------------

def _sampled_logprobs(logits: torch.Tensor, requests: Sequence[Request],
                      tokens: torch.Tensor) -> list[TokenLogprobs | None]:
    out: list[TokenLogprobs | None] = [None] * len(requests)
    rows = [i for i, r in enumerate(requests) if r.sampling_params.logprobs is not None]
    if not rows:
        return out
    counts = [requests[i].sampling_params.logprobs for i in rows]
    index = torch.tensor(rows, device=logits.device)                                         # [L]
    entries = compute_prompt_logprobs(logits[index], tokens[index], max(counts))
    for i, k, entry in zip(rows, counts, entries):
        entry.top = entry.top[:k]             # one top-k for the batch, cut to each row's own count
        out[i] = entry
    return out


def compute_prompt_logprobs(logits: torch.Tensor, target_ids: Sequence[int] | torch.Tensor,
                            k: int) -> list[TokenLogprobs]:
    """Logprob and rank of each target token under log_softmax(logits), plus the top-k.

    logits [N, V] (raw), target_ids [N]. Used for prompt scoring (echo + logprobs) and for sampled tokens.
    """
    targets = torch.as_tensor(target_ids, dtype=torch.long, device=logits.device)           # [N]
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"expected {logits.shape[0]} target ids, got {list(targets.shape)}")
    k = min(k, logits.shape[1])
    chunk = max(1, _LOGPROB_CHUNK_ELEMENTS // max(1, logits.shape[1]))
    out: list[TokenLogprobs] = []
    for start in range(0, logits.shape[0], chunk):
        out.extend(_logprobs_chunk(logits[start:start + chunk], targets[start:start + chunk], k))
    return out


def _logprobs_chunk(logits: torch.Tensor, targets: torch.Tensor, k: int) -> list[TokenLogprobs]:
    logprobs = logits.float().log_softmax(dim=-1)                                            # [n, V]
    target_lp = logprobs.gather(1, targets.unsqueeze(1))                                     # [n, 1]
    rank = (logprobs > target_lp).sum(dim=-1) + 1                                            # [n]
    top_lp, top_ids = logprobs.topk(k, dim=-1)                                               # [n, k] each
    # One device-to-host copy per tensor, not one per number.
    rows = zip(targets.tolist(), target_lp.squeeze(1).tolist(), rank.tolist(), top_ids.tolist(), top_lp.tolist())
    return [TokenLogprobs(t, lp, r, list(zip(ids, lps))) for t, lp, r, ids, lps in rows]
