"""Engine limits sized for the workload: ``build.max_batch_size`` and ``build.max_num_tokens``
left null are chosen from the memory plan's KV cache capacity and the workload's lengths, the way
trtllm-bench sizes the engines it benchmarks (``tensorrt_llm/bench/build/tuning.py``).

The rule (ours, after trtllm-bench's): the requests that fit in the KV cache at the workload's
full length (input + output tokens) are the batch, per pipeline stage, rounded up a little
(optimistic, as in-flight batching admits requests as memory allows: a minimum of 64, then steps
of 32, 128 and 256), at most 4096; the tokens per step are that batch times (1 + input/output),
the prefill a step needs to keep the batch full, rounded up to steps of 256, 512 and 1024 between
2048 and 32768. Unlike trtllm-bench, the KV capacity is this planner's own: weights per rank, the
activations of the chosen limits (sized twice, so they account for themselves) and the runtime
reserve, not the whole memory less the weights.

The CPU target has no GPU memory to plan: its limits are the reference runtime's defaults (its
step size is ``triton.cpu_max_num_tokens``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config.schema import PipelineConfig
from pipeline.sizing import memory

MAX_BATCH = 4096  # trtllm-bench's cap on the decoder's buffers
MAX_TOKENS = 32768  # and on the activation buffers
MIN_BATCH = 64
MIN_TOKENS = 2048  # below it context and generation overlap poorly (trtllm-bench's floor)
# what the limits are when nothing can be planned: the CPU target, or architecture numbers unknown
FALLBACK_BATCH = 64
FALLBACK_TOKENS = 8192


@dataclass(frozen=True)
class Limits:
    max_batch_size: int
    max_num_tokens: int
    reason: str


def round_batch(requests: float) -> int:
    """A batch a little above ``requests``: at least 64, then multiples of 32, 128 or 256."""
    if requests < 256:
        return max(MIN_BATCH, 32 * math.ceil(requests / 32))
    if requests < 1024:
        return 128 * math.ceil(requests / 128)
    return 256 * math.ceil(requests / 256)


def round_tokens(tokens: float) -> int:
    """Tokens per step: at least 2048, then multiples of 256, 512 or 1024."""
    if tokens < 4096:
        return max(MIN_TOKENS, 256 * math.ceil(tokens / 256))
    if tokens < 8192:
        return 512 * math.ceil(tokens / 512)
    return 1024 * math.ceil(tokens / 1024)


def from_capacity(kv_tokens: int, input_tokens: int, output_tokens: int, pp: int) -> tuple[int, int, float]:
    """(max_batch_size, max_num_tokens, requests that fit) for a KV cache of ``kv_tokens`` tokens
    (one pipeline stage's share) and the workload's lengths."""
    requests = kv_tokens / (input_tokens + output_tokens)
    raw_batch = min(requests, MAX_BATCH) / pp  # the stages share the capacity: each has a batch in flight
    raw_tokens = min(raw_batch * (1 + input_tokens / output_tokens), MAX_TOKENS)
    return round_batch(raw_batch), round_tokens(raw_tokens), requests


def size(cfg: PipelineConfig) -> Limits:
    """The limits for ``cfg``'s model, format, parallelism, target and workload (ignoring what
    ``cfg.build`` sets: the caller keeps an explicit value)."""
    if not memory.applies(cfg):
        why = "the CPU target" if not cfg.target.is_gpu else "architecture numbers unknown before the fetch"
        return Limits(FALLBACK_BATCH, FALLBACK_TOKENS, f"defaults ({why}: no memory plan to size from)")
    work = cfg.workload
    seq = work.input_tokens + work.output_tokens
    batch, tokens = 0, 0  # the first pass sizes the KV cache with no activations but the reserve
    for _ in range(2):
        plan = memory.plan_for(cfg, max_num_tokens=tokens, max_batch_size=batch)
        batch, tokens, requests = from_capacity(plan.kv_tokens, work.input_tokens, work.output_tokens, cfg.parallel.pp)
    reason = (
        f"sized for workload {work.input_tokens}/{work.output_tokens} tokens: the KV cache holds {plan.kv_tokens:,} "
        f"tokens per GPU = {requests:,.0f} requests of {seq} tokens -> max_batch_size {batch}, "
        f"max_num_tokens {tokens} (batch x (1 + input/output), rounded as trtllm-bench does)"
    )
    if requests < 1:
        reason = f"the KV cache holds {plan.kv_tokens:,} tokens, less than one {seq}-token request"
    return Limits(batch, tokens, reason)


def resolve(cfg: PipelineConfig) -> None:
    """Fill a null ``build.max_batch_size`` / ``build.max_num_tokens`` with the sized value and
    record why in ``build.sized_because`` (a value the user set is kept)."""
    build = cfg.build
    if build.max_batch_size is not None and build.max_num_tokens is not None:
        return
    sized = size(cfg)
    chosen = []
    if build.max_batch_size is None:
        build.max_batch_size = sized.max_batch_size
        chosen.append("max_batch_size")
    if build.max_num_tokens is None:
        build.max_num_tokens = sized.max_num_tokens
        chosen.append("max_num_tokens")
    build.sized_because = f"{' and '.join(chosen)}: {sized.reason}"
