"""Batched generation with the reference runtime: what the Triton ``tensorrt_llm`` model of the CPU
target calls.

Requests of different lengths run as one left-padded batch with a shared KV cache (padded with an
internal id: a client's ``pad_id`` never enters the batch). Sampling follows
TensorRT-LLM's conventions: ``top_k=0`` and ``top_p=0`` (or ``temperature=0``) mean greedy;
otherwise temperature, then top-k, then top-p, with a per-request seed. Penalties follow its
penalty kernel: after temperature, every token that occurs in the sequence so far (prompt and
output) has its logit divided by ``repetition_penalty`` (multiplied when negative), lowered by
``presence_penalty`` once and by ``frequency_penalty`` per occurrence; ``min_tokens`` masks the
end token until that many tokens are out; a ``guide`` (guided decoding) masks what its grammar
forbids. ``end_id`` and stop word
sequences finish a request; bad word sequences are never completed. A callback sees every new token
as it is chosen (streaming).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .lora import Adapter

PAD = 0  # any id works: padded positions are masked out of attention
# Below this temperature sampling is greedy: dividing float32 logits by 1e-40 overflows them to inf
# (and softmax of inf is NaN), and the distribution is one-hot long before that anyway.
MIN_TEMPERATURE = 1e-5
# Magnitudes beyond these overflow float32 scores once scaled by a small temperature and a
# repetition penalty (30 / 1e-5 * 1e3 is 3e9, far inside float32; 3e38 is not): refused by name.
MAX_PENALTY = 1e3  # |presence_penalty|, |frequency_penalty|; repetition_penalty within [1/MAX, MAX]
MAX_BIAS = 1e9  # |embedding_bias| (OpenAI's logit_bias spans +-100; -1e9 bans a token outright)
MAX_WORDS = 256  # stop_words_list and bad_words_list entries, each scanned at every step
SEED_RANGE = 2**64  # torch.Generator seeds are unsigned 64-bit: larger seeds wrap around


class Guide(Protocol):
    """Guided decoding of one sequence (a grammar matcher): which tokens may come next."""

    def mask(self, scores: torch.Tensor) -> None:
        """Set the scores of every token the grammar forbids next to -inf, in place."""

    def accept(self, token: int) -> None:
        """Advance past the chosen token."""


@dataclass
class Request:
    input_ids: list[int]
    max_new_tokens: int = 16
    end_id: int | None = None
    pad_id: int | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    seed: int | None = None
    stop_words: list[list[int]] = field(default_factory=list)
    bad_words: list[list[int]] = field(default_factory=list)
    return_log_probs: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    embedding_bias: torch.Tensor | None = None  # [vocab] float32, added to the logits before anything else
    return_generation_logits: bool = False  # keep each step's raw logits
    return_context_logits: bool = False  # keep the raw logits of every prompt position (in-flight only)
    guide: Guide | None = None  # guided decoding: only tokens its grammar allows
    adapter: Adapter | None = None  # a LoRA adapter for this request alone (in-flight batching)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or (self.top_k in (0, 1) and self.top_p == 0) or self.top_k == 1

    def problems(self, vocab_size: int, max_seq_len: int | None = None, max_input_len: int | None = None) -> list[str]:
        """What would make this request fail inside a shared batch, checked before it joins one,
        so that a bad request fails alone."""
        problems = []
        if not self.input_ids:
            problems.append("input_ids is empty")
        if max_input_len is not None and len(self.input_ids) > max_input_len:
            problems.append(f"{len(self.input_ids)} input tokens exceed the engine's max_input_len={max_input_len}")
        outside = sorted({t for t in self.input_ids if not 0 <= t < vocab_size})
        if outside:
            problems.append(f"input_ids {outside[:5]} lie outside the vocabulary (0..{vocab_size - 1})")
        words = [t for word in self.stop_words + self.bad_words for t in word]
        if any(not 0 <= t < vocab_size for t in words):
            problems.append(f"stop_words_list/bad_words_list hold ids outside the vocabulary (0..{vocab_size - 1})")
        if self.end_id is not None and self.end_id != -1 and not 0 <= self.end_id < vocab_size:
            problems.append(f"end_id={self.end_id} is outside the vocabulary (use -1 for none)")
        if self.pad_id is not None and not 0 <= self.pad_id < vocab_size:
            problems.append(f"pad_id={self.pad_id} is outside the vocabulary (0..{vocab_size - 1})")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            problems.append(f"temperature={self.temperature} must be a finite number >= 0")
        if not (math.isfinite(self.repetition_penalty) and 1 / MAX_PENALTY <= self.repetition_penalty <= MAX_PENALTY):
            problems.append(
                f"repetition_penalty={self.repetition_penalty} must lie in [{1 / MAX_PENALTY:g}, {MAX_PENALTY:g}]"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if not (math.isfinite(getattr(self, name)) and abs(getattr(self, name)) <= MAX_PENALTY):
                problems.append(f"{name}={getattr(self, name)} must lie in [{-MAX_PENALTY:g}, {MAX_PENALTY:g}]")
        if self.embedding_bias is not None:
            if self.embedding_bias.numel() != vocab_size:
                size = self.embedding_bias.numel()
                problems.append(f"embedding_bias has {size} values; the vocabulary has {vocab_size}")
            elif not bool(torch.isfinite(self.embedding_bias).all()):
                problems.append("embedding_bias holds a value that is not a finite number")
            elif float(self.embedding_bias.abs().max()) > MAX_BIAS:
                problems.append(f"embedding_bias holds a weight beyond +-{MAX_BIAS:g}")
        for name, count in (("stop_words_list", len(self.stop_words)), ("bad_words_list", len(self.bad_words))):
            if count > MAX_WORDS:
                problems.append(f"{name} holds {count} sequences; at most {MAX_WORDS}")
        if self.seed is not None and not -(2**63) <= self.seed < SEED_RANGE:
            problems.append(f"seed={self.seed} must lie in [-2**63, 2**64 - 1]")
        if self.min_tokens < 0:
            problems.append(f"min_tokens={self.min_tokens} must be >= 0")
        if self.top_k < 0:
            problems.append(f"runtime_top_k={self.top_k} must be >= 0")
        if not (math.isfinite(self.top_p) and 0 <= self.top_p <= 1):
            problems.append(f"runtime_top_p={self.top_p} must lie in [0, 1]")
        if self.max_new_tokens < 0:
            problems.append(f"request_output_len={self.max_new_tokens} must be >= 0")
        elif max_seq_len is not None and len(self.input_ids) + self.max_new_tokens > max_seq_len:
            problems.append(
                f"{len(self.input_ids)} input tokens plus request_output_len={self.max_new_tokens} exceed the "
                f"engine's max_seq_len={max_seq_len}"
            )
        return problems


@dataclass
class Result:
    output_ids: list[int]  # generated tokens only (end_id excluded)
    finish_reason: str  # "length" | "end" | "stop"
    log_probs: list[float] = field(default_factory=list)
    metrics: dict[str, int] = field(default_factory=dict)  # perf metrics (in-flight scheduler)
    generation_logits: list[torch.Tensor] = field(default_factory=list)  # [vocab] per output token
    context_logits: list[torch.Tensor] = field(default_factory=list)  # [positions, vocab] per prompt chunk

    @property
    def sequence_length(self) -> int:
        return len(self.output_ids)


TokenCallback = Callable[[int, int, "Result"], None]  # (request index, token id, its result so far)
FinishCallback = Callable[[int, "Result"], None]  # (request index, its final result)


def _ban_bad_words(logits: torch.Tensor, generated: list[int], bad_words: list[list[int]]) -> None:
    """Forbid the token that would complete any bad word sequence."""
    for word in bad_words:
        if not word:
            continue
        prefix = word[:-1]
        if not prefix or generated[-len(prefix) :] == prefix:
            logits[word[-1]] = float("-inf")


def _penalize(scores: torch.Tensor, request: Request, generated: list[int]) -> torch.Tensor:
    """The embedding bias, temperature, then the penalties on every token seen so far (TensorRT-LLM's
    order)."""
    if request.embedding_bias is not None:
        scores = scores + request.embedding_bias.reshape(-1).to(scores.dtype)
    if request.temperature >= MIN_TEMPERATURE:
        scores = scores / request.temperature
    penalized = request.repetition_penalty != 1 or request.presence_penalty or request.frequency_penalty
    if penalized:
        # ids are checked to lie inside the vocabulary, so there are exactly vocabulary-many counts
        counts = torch.bincount(torch.tensor(request.input_ids + generated), minlength=scores.numel())
        seen = counts > 0
        if request.repetition_penalty != 1:
            repeated = torch.where(scores < 0, scores * request.repetition_penalty, scores / request.repetition_penalty)
            scores = torch.where(seen, repeated, scores)
        scores = scores - seen * request.presence_penalty - counts * request.frequency_penalty
    if request.end_id is not None and 0 <= request.end_id < scores.numel() and len(generated) < request.min_tokens:
        scores[request.end_id] = float("-inf")
    return scores


def _argmax(scores: torch.Tensor) -> int:
    """The best token; NaN scores (which torch.argmax would pick) count as forbidden."""
    return int(torch.argmax(torch.nan_to_num(scores, nan=float("-inf"))))


def _choose(scores: torch.Tensor, request: Request, generator: torch.Generator | None) -> int:
    """A token from temperature-scaled, penalized scores. Numerically safe: where the scores give
    no distribution to sample (non-finite or all forbidden), the best-scored token is taken."""
    if request.greedy:
        return _argmax(scores)
    if request.top_k > 0:
        kth = torch.topk(scores, min(request.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if 0 < request.top_p < 1:
        ordered, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(ordered, 0) - ordered < request.top_p  # smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], ordered[keep])
        probs = probs / probs.sum()
    if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0:
        return _argmax(scores)
    return int(torch.multinomial(probs, 1, generator=generator))


def seeded(seed: int | None) -> torch.Generator | None:
    """A generator for a request's seed (wrapped into torch's unsigned 64-bit range), or None."""
    return None if seed is None else torch.Generator().manual_seed(seed % SEED_RANGE)


def _stopped(generated: list[int], stop_words: list[list[int]]) -> bool:
    return any(word and generated[-len(word) :] == word for word in stop_words)


def advance(
    logits: torch.Tensor, request: Request, result: Result, generator: torch.Generator | None
) -> tuple[int | None, str | None]:
    """One decoding step of one request, shared by ``generate`` and the in-flight scheduler: ban
    bad words, choose a token, record it. Returns (the token handed out, or None when it is the
    end token; why the request finished, or None while it goes on)."""
    scores = _penalize(logits.clone(), request, result.output_ids)
    _ban_bad_words(scores, result.output_ids, request.bad_words)
    if request.guide is not None:
        request.guide.mask(scores)
    token = _choose(scores, request, generator)
    if request.guide is not None:
        request.guide.accept(token)
    if request.end_id is not None and token == request.end_id:
        return None, "end"
    result.output_ids.append(token)
    if request.return_generation_logits:
        result.generation_logits.append(logits.clone())
    if request.return_log_probs:
        result.log_probs.append(float(torch.log_softmax(logits, -1)[token]))
    if _stopped(result.output_ids, request.stop_words):
        return token, "stop"
    if len(result.output_ids) >= request.max_new_tokens:
        return token, "length"
    return token, None


def generate(
    model: Any,
    requests: Sequence[Request],
    on_token: TokenCallback | None = None,
    on_finish: FinishCallback | None = None,
) -> list[Result]:
    """Run all requests as one batch until each finishes or reaches its ``max_new_tokens``.

    ``on_finish`` hears of each request as soon as it is done, so a server can answer it while the
    rest of the batch goes on."""
    from transformers import DynamicCache

    if not requests:
        return []
    if any(r.adapter is not None for r in requests):
        raise ValueError("LoRA adapters are applied by in-flight batching (the scheduler), not by a static batch")
    device = next(model.parameters()).device
    pad = PAD
    width = max(len(r.input_ids) for r in requests)
    ids = torch.full((len(requests), width), pad, dtype=torch.long)
    mask = torch.zeros((len(requests), width), dtype=torch.long)
    for row, request in enumerate(requests):  # left padding keeps every sequence's end aligned
        ids[row, width - len(request.input_ids) :] = torch.tensor(request.input_ids)
        mask[row, width - len(request.input_ids) :] = 1
    generators = [seeded(r.seed) for r in requests]
    results = [Result([], "length") for _ in requests]
    active = [r.max_new_tokens > 0 for r in requests]

    def finish(row: int, reason: str | None = None) -> None:
        active[row] = False
        if reason:
            results[row].finish_reason = reason
        if on_finish is not None:
            on_finish(row, results[row])

    for row in range(len(requests)):
        if not active[row] and on_finish is not None:
            on_finish(row, results[row])
    cache = DynamicCache()
    step_ids, positions = ids, (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        for _ in range(max(r.max_new_tokens for r in requests)):
            if not any(active):
                break
            out = model(
                input_ids=step_ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                past_key_values=cache,
                use_cache=True,
            )
            logits = out.logits[:, -1, :].float().cpu()
            chosen = torch.full((len(requests), 1), pad, dtype=torch.long)
            for row, request in enumerate(requests):
                if not active[row]:
                    continue
                token, finished = advance(logits[row], request, results[row], generators[row])
                if token is not None:
                    chosen[row, 0] = token
                    if on_token is not None:
                        on_token(row, token, results[row])
                if finished is not None:
                    finish(row, finished)
            # finished rows keep a slot in the batch; their new positions are masked out
            mask = torch.cat([mask, torch.tensor([[1 if a else 0] for a in active], dtype=torch.long)], dim=1)
            positions = positions[:, -1:] + 1
            step_ids = chosen
    return results
