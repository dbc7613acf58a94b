"""In-flight batching over the reference runtime: requests join and leave the running batch at
every step, as TensorRT-LLM's batch manager does on GPUs.

A scheduler thread loops. Each step it retires cancelled sequences, gives every generating
sequence its next token and every sequence still in its context phase a prompt chunk, within a
budget of ``max_num_tokens`` prompt tokens per step, admits waiting requests into what is left, runs
all of it as one packed forward pass (``packed.forward``), hands each new token to its request's
callback and retires finished sequences at once. A request that arrives while a step runs joins it
between two layers (its prompt catches up on the layers already done), so it does not wait for
the step to end.

A prompt that fits the budget is prefilled in one step, so its first token comes as soon as it
can. A longer one goes ``context_chunk_tokens`` per step, and while it does the step's budget is
that chunk, so that the running streams keep receiving tokens at a steady pace meanwhile.

Memory is a paged KV cache of fixed size (``kvcache.KVCache``). Admission follows TensorRT-LLM's
batch scheduler policies: ``guaranteed_no_evict`` (the default) admits a request only when the
cache can hold its prompt and every token it may generate beside what the running sequences may
still need, so nothing is ever paused; ``max_utilization`` admits on the prompt alone and, when
the cache runs out mid-generation, pauses the most recently admitted sequence (its blocks freed,
its tokens recomputed when it resumes, named blocks often still cached). With block reuse a prompt
starts from the cached blocks of an earlier prompt with the same prefix.

Like the rest of ``pipeline.runtime`` this module imports nothing from the pipeline: it travels
into the Triton model repository.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .failures import CANCELLED, FORWARD_FAILED, QUEUE_FULL, QUEUE_TIMEOUT, SAMPLING_FAILED, SCHEDULER_DOWN
from .generate import Request, Result, advance, seeded
from .kvcache import BlockTable, KVCache, prefix_root
from .packed import Span, forward

TokenCallback = Callable[[int, Result], None]  # the new token id, the result so far (with it)
FinishCallback = Callable[[Result], None]
ErrorCallback = Callable[[str], None]
POLICIES = ("guaranteed_no_evict", "max_utilization")


HEARTBEAT_S = 1.0  # an idle loop still beats this often
STALL_S = 30.0  # a loop that has not beaten for this long is stalled (a forward pass beats per layer)


@dataclass
class SchedulerConfig:
    """The knobs, named after the TensorRT-LLM backend parameters they mirror."""

    max_batch_size: int  # sequences in the running batch
    max_num_tokens: int  # prompt tokens per step, all sequences together
    kv_cache_tokens: int  # the KV cache budget (rounded down to whole blocks)
    tokens_per_block: int = 32
    max_seq_len: int | None = None
    max_input_len: int | None = None
    batch_scheduler_policy: str = "guaranteed_no_evict"
    enable_chunked_context: bool = True
    # a prompt longer than max_num_tokens advances this many tokens per step (None: whatever the
    # step's budget leaves, as TensorRT-LLM chunks); smaller chunks keep other streams' gaps short
    context_chunk_tokens: int | None = None
    enable_kv_cache_reuse: bool = True
    cancellation_check_period_ms: int = 100
    max_queue_size: int = 0  # requests waiting to be admitted; beyond it a request is refused (0: no bound)
    queue_timeout_ms: int = 0  # a request not admitted within this is refused (0: it waits as long as it takes)
    # returned logits (context: prompt x vocabulary floats, generation: a vocabulary a token) held
    # by the requests in flight; 0: no bound
    max_logits_bytes: int = 0

    def __post_init__(self) -> None:
        if self.batch_scheduler_policy not in POLICIES:
            raise ValueError(f"batch_scheduler_policy={self.batch_scheduler_policy}: use one of {', '.join(POLICIES)}")
        for name in ("max_batch_size", "max_num_tokens", "tokens_per_block", "context_chunk_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.kv_cache_tokens < self.tokens_per_block:
            raise ValueError(f"kv_cache_tokens={self.kv_cache_tokens} holds no block of {self.tokens_per_block}")


@dataclass
class Timings:
    """Monotonic nanoseconds of a request's life, for perf metrics."""

    arrival: int
    scheduled: int = 0
    first_token: int = 0
    last_token: int = 0


@dataclass(eq=False)
class Sequence:
    request: Request
    on_token: TokenCallback
    on_finish: FinishCallback
    on_error: ErrorCallback
    timings: Timings
    result: Result = field(default_factory=lambda: Result([], "length"))
    table: BlockTable = field(default_factory=BlockTable)
    computed: int = 0  # positions whose keys and values are in the cache
    generator: torch.Generator | None = None
    is_cancelled: Callable[[], bool] | None = None  # asked periodically (a client that went away)
    cancelled: bool = False
    done: bool = False
    paused: int = 0  # times it was paused for lack of cache (max_utilization)
    logits_bytes: int = 0  # its share of the logits budget, held until it ends
    chunked: bool = False  # its prompt is prefilled a chunk per step (longer than a step's budget)

    def __post_init__(self) -> None:
        self.table.chain = self.root

    @property
    def root(self) -> bytes:
        """Where its blocks' names start: its adapter's own prefixes (see kvcache.prefix_root)."""
        return prefix_root(self.request.adapter.name if self.request.adapter is not None else None)

    @property
    def tokens(self) -> list[int]:
        """Every token it knows: the prompt and what it generated (the last one not yet cached)."""
        return self.request.input_ids + self.result.output_ids

    @property
    def final_length(self) -> int:
        return len(self.request.input_ids) + self.request.max_new_tokens


class Scheduler:
    """Thread-safe: ``submit`` and ``cancel`` from any thread; the work happens on the scheduler's
    own thread (``start``), or step by step with ``step`` (tests)."""

    def __init__(self, model: Any, config: SchedulerConfig):
        self.model, self.config = model, config
        cfg = model.config
        self.vocab_size = int(cfg.vocab_size)
        self.cache = KVCache(
            layers=cfg.num_hidden_layers,
            kv_heads=cfg.num_key_value_heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            num_blocks=config.kv_cache_tokens // config.tokens_per_block,
            block_size=config.tokens_per_block,
            reuse=config.enable_kv_cache_reuse,
        )
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.peak_blocks = 0  # the most blocks ever held at once
        self._next_cancel_poll = 0
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.heartbeat = time.monotonic()  # the loop's last sign of life (health reads it)
        self.faults = 0  # exceptions the loop caught (in sampling, callbacks or a step itself)
        self.logits_reserved = 0  # bytes of the logits budget held by requests in flight

    @property
    def capacity_tokens(self) -> int:
        return self.cache.num_blocks * self.cache.block_size

    # -- called from request threads -------------------------------------------------------------

    def submit(
        self,
        request: Request,
        on_token: TokenCallback,
        on_finish: FinishCallback,
        on_error: ErrorCallback,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> Sequence | None:
        """Queue a request; a request that could never run gets ``on_error`` at once (and None)."""
        if not self.alive():
            on_error(f"{SCHEDULER_DOWN} (stalled or stopped): retry on another replica")
            return None
        try:
            problems = request.problems(self.vocab_size, self.config.max_seq_len, self.config.max_input_len)
            problems = problems or self._capacity_problems(request)
        except Exception as error:  # a malformed request fails alone, whatever is wrong with it
            problems = [f"the request could not be checked: {type(error).__name__}: {error}"]
        if problems:
            on_error("; ".join(problems))
            return None
        sequence = Sequence(request, on_token, on_finish, on_error, Timings(time.monotonic_ns()))
        sequence.is_cancelled = is_cancelled
        sequence.generator = seeded(request.seed)
        sequence.logits_bytes = self._logits_bytes(request)
        budget = self.config.max_logits_bytes
        with self._wake:
            if self.config.max_queue_size and len(self.waiting) >= self.config.max_queue_size:
                full = f"{len(self.waiting)} requests are waiting (max_queue_size)"
            elif budget and self.logits_reserved + sequence.logits_bytes > budget:
                full = f"the requests in flight hold {self.logits_reserved / 2**20:.0f} MiB of the logits budget"
            else:
                full = ""
                self.logits_reserved += sequence.logits_bytes
                self.waiting.append(sequence)
                self._wake.notify()
        if full:  # refused at once: a flood must not grow the process or delay everyone behind it
            on_error(f"{QUEUE_FULL}: {full}")
            return None
        return sequence

    def _logits_bytes(self, request: Request) -> int:
        """What the request's returned logits will hold at most, in bytes (float32)."""
        rows = len(request.input_ids) if request.return_context_logits else 0
        rows += request.max_new_tokens if request.return_generation_logits else 0
        return rows * self.vocab_size * 4

    def _capacity_problems(self, request: Request) -> list[str]:
        prompt = len(request.input_ids)
        budget, logits = self.config.max_logits_bytes, self._logits_bytes(request)
        if budget and logits > budget:
            return [
                f"return_context_logits/return_generation_logits for {prompt} prompt and {request.max_new_tokens} "
                f"output tokens would hold {logits / 2**20:.0f} MiB of logits; this engine holds at most "
                f"{budget / 2**20:.0f} MiB (triton.cpu_max_logits_mb)"
            ]
        if prompt + request.max_new_tokens > self.capacity_tokens:
            return [
                f"{prompt} input tokens plus request_output_len={request.max_new_tokens} exceed the KV cache "
                f"of {self.capacity_tokens} tokens (raise max_tokens_in_paged_kv_cache or the memory fraction)"
            ]
        if not self.config.enable_chunked_context and prompt > self.config.max_num_tokens:
            return [
                f"{prompt} input tokens exceed max_num_tokens={self.config.max_num_tokens} per step "
                "(enable chunked context or raise max_num_tokens)"
            ]
        return []

    def cancel(self, sequence: Sequence) -> None:
        """The sequence leaves the batch at the next step and frees its blocks."""
        sequence.cancelled = True
        with self._wake:
            self._wake.notify()

    # -- the loop ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="inflight-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def alive(self) -> bool:
        """Whether the loop runs and beat lately (always true when driven by ``step``, in tests)."""
        if self._thread is None:
            return True
        return self._thread.is_alive() and time.monotonic() - self.heartbeat < STALL_S

    def _beat(self) -> None:
        self.heartbeat = time.monotonic()

    def _loop(self) -> None:
        while True:
            self._beat()
            with self._wake:
                if not self._stopping and not self.waiting and not self.running:
                    self._wake.wait(timeout=HEARTBEAT_S)
                    continue
                if self._stopping:
                    return
            if not self.guarded_step():  # nothing could run (e.g. only cancelled requests): do not spin
                with self._wake:
                    self._wake.wait(timeout=0.01)

    def guarded_step(self) -> bool:
        """``step``, outliving any exception it raises: a bug of ours must not end serving."""
        try:
            return self.step()
        except Exception as error:
            self.faults += 1
            self._fail_running(f"{FORWARD_FAILED} (scheduler step): {type(error).__name__}: {error}")
            return True

    def _fail_running(self, message: str) -> None:
        """After a failed step nothing is known of the running sequences' state: they fail (and
        free their blocks); the waiting ones were not touched and run next."""
        for sequence in list(self.running):
            self._fail(sequence, message)

    def step(self) -> bool:
        """One step: retire cancelled sequences, schedule tokens, run them. False when nothing ran."""
        now = time.monotonic_ns()
        if now >= self._next_cancel_poll:
            self._next_cancel_poll = now + self.config.cancellation_check_period_ms * 1_000_000
            self._poll_cancellations()
        with self._wake:
            gone = [s for s in self.waiting if s.cancelled]
            expired = self._expired(now) if self.config.queue_timeout_ms else []
            for sequence in gone + expired:
                self.waiting.remove(sequence)
        for sequence in gone + [s for s in self.running if s.cancelled]:
            self._retire(sequence, "cancelled")
        for sequence in expired:
            waited = (now - sequence.timings.arrival) / 1e9
            self._retire(sequence, None, f"{QUEUE_TIMEOUT}: waited {waited:.1f} s to be admitted (queue timeout)")
        spans, budget = self._schedule()
        self.peak_blocks = max(self.peak_blocks, self.cache.used)
        if not spans:
            return False
        held_back = self.waiting[0] if self.waiting else None  # did not fit this step: nor will it later

        def join() -> list[Span]:
            """Requests that arrived since the step began, admitted into what is left of it."""
            nonlocal budget
            self._beat()  # called between layers: a long forward pass is not a stall
            if not self.waiting or self.waiting[0] is held_back or budget <= 0:
                return []
            joined, budget = self._admit(budget)
            spans.extend(joined)  # forward returns their logits after the others'
            return [span for _, span in joined]

        try:
            logits = forward(self.model, self.cache, [span for _, span in spans], join)
        except Exception as error:  # answer every request of the step rather than leave clients hanging
            for sequence, _ in spans:
                self._fail(sequence, f"{FORWARD_FAILED}: {error}")
            return True
        self.peak_blocks = max(self.peak_blocks, self.cache.used)
        for (sequence, span), rows in zip(spans, logits, strict=True):
            try:
                self._after_forward(sequence, span, rows)
            except Exception as error:  # sampling or a callback: this request fails, the others go on
                self.faults += 1
                self._fail(sequence, f"{SAMPLING_FAILED}: {type(error).__name__}: {error}")
        return True

    def _after_forward(self, sequence: Sequence, span: Span, rows: torch.Tensor) -> None:
        sequence.computed = span.stop
        self.cache.name_full_blocks(sequence.table, sequence.tokens, sequence.computed)
        if span.all_logits:  # prompt positions, once each (a resumed sequence recomputes them)
            known = sum(len(chunk) for chunk in sequence.result.context_logits)
            if span.start == known:
                prompt = len(sequence.request.input_ids)
                sequence.result.context_logits.append(rows[: max(0, prompt - span.start)].clone())
        if span.wants_logits:
            self._take(sequence, rows[-1])

    def _expired(self, now: int) -> list[Sequence]:
        """Waiting requests past the queue timeout. A preempted sequence, back in the queue after
        it ran, is not expired: its client already has tokens."""
        limit = self.config.queue_timeout_ms * 1_000_000
        return [s for s in self.waiting if not s.timings.scheduled and now - s.timings.arrival > limit]

    def _poll_cancellations(self) -> None:
        """Ask each request whether its client went away (a round trip to the server, so it happens
        every cancellation_check_period_ms rather than at every step)."""
        with self._wake:  # submitters append to the queue meanwhile
            present = [*self.running, *self.waiting]
        for sequence in present:
            if sequence.is_cancelled is not None and not sequence.cancelled:
                try:
                    sequence.cancelled = bool(sequence.is_cancelled())
                except Exception:  # the request is gone with its client
                    sequence.cancelled = True

    # -- scheduling -------------------------------------------------------------------------------

    def _schedule(self) -> tuple[list[tuple[Sequence, Span]], int]:
        """This step's spans: running sequences first (in admission order), then newcomers. Every
        generating sequence gets its token; prompts share ``max_num_tokens``. Unlike TensorRT-LLM,
        whose budget counts both, generation tokens ride along free: on a CPU one more row costs
        almost nothing beside a prompt chunk, and a newcomer's prompt then advances as fast at
        concurrency 8 as alone. While a prompt longer than a step is prefilled, the step's budget
        is its chunk: for as long as that lasts the running streams see steps of at most
        ``context_chunk_tokens`` prompt tokens, and newcomers wait their turn behind it. Returns
        the spans and what is left of the budget."""
        budget = self.config.max_num_tokens
        chunk = self.config.context_chunk_tokens
        if chunk and any(s.chunked and len(s.tokens) - s.computed > 1 for s in self.running):
            budget = min(budget, chunk)
        spans: list[tuple[Sequence, Span]] = []
        for sequence in list(self.running):
            if sequence.done or sequence not in self.running:  # paused by an earlier one's growth
                continue
            generating = len(sequence.tokens) - sequence.computed == 1
            span = self._span(sequence, 1 if generating else self._prompt_share(sequence, budget))
            if span is None:  # a prompt with no budget left this step, or a paused sequence
                continue
            spans.append((sequence, span))
            budget -= 0 if generating else len(span.tokens)
        admitted, budget = self._admit(budget)
        return spans + admitted, budget

    def _admit(self, budget: int) -> tuple[list[tuple[Sequence, Span]], int]:
        """Waiting requests admitted within ``budget`` prompt tokens, with their spans, and what is
        left of the budget."""
        spans: list[tuple[Sequence, Span]] = []
        while budget > 0 and self._admit_next(budget):
            sequence = self.running[-1]
            span = self._span(sequence, self._prompt_share(sequence, budget))
            if span is None:
                break
            spans.append((sequence, span))
            budget -= len(span.tokens)
        return spans, budget

    def _prompt_share(self, sequence: Sequence, budget: int) -> int:
        """Prompt tokens the sequence computes this step: all that remain when they fit what is
        left of the budget, else (a prompt longer than a step's budget) a chunk."""
        remaining = len(sequence.tokens) - sequence.computed
        if not sequence.chunked and remaining <= budget:
            return remaining
        sequence.chunked = True
        return min(remaining, budget, self.config.context_chunk_tokens or budget)

    def _span(self, sequence: Sequence, budget: int) -> Span | None:
        """The sequence's next tokens within ``budget``, with cache blocks for them; None when the
        budget or the cache has no room for them this step."""
        tokens = sequence.tokens
        count = min(len(tokens) - sequence.computed, budget)
        if count < len(tokens) - sequence.computed and not self.config.enable_chunked_context:
            return None
        if count <= 0:
            return None
        while not self.cache.grow(sequence.table, sequence.computed + count):
            victim = self._pause_latest(sequence)
            if victim is sequence:
                return None
        stop = sequence.computed + count
        in_prompt = sequence.computed < len(sequence.request.input_ids)
        return Span(
            sequence.table,
            tokens[sequence.computed : stop],
            sequence.computed,
            wants_logits=stop == len(tokens),
            all_logits=in_prompt and sequence.request.return_context_logits,
            adapter=sequence.request.adapter,
        )

    def _pause_latest(self, needy: Sequence) -> Sequence:
        """max_utilization: free the blocks of the most recently admitted sequence (``needy`` itself
        when it is the latest); it waits at the head of the queue and recomputes when resumed.
        Under guaranteed_no_evict admission leaves room for every sequence, so this never runs."""
        victim = self.running[-1]
        self.running.remove(victim)
        self.cache.release(victim.table)
        victim.table, victim.computed = BlockTable(chain=victim.root), 0
        victim.paused += 1
        with self._wake:
            self.waiting.appendleft(victim)
        return victim

    def _admit_next(self, budget: int) -> bool:
        """Move the head of the queue into the running batch if a slot, the cache and ``budget``
        (prompt tokens left this step) allow it (first come, first served: a request that does not
        fit holds back those behind it). A prompt that would fit a whole step but not what is left
        of this one waits for the next, rather than be cut into two steps' worth of waiting."""
        with self._wake:
            while self.waiting and self.waiting[0].cancelled:
                self._retire(self.waiting.popleft(), "cancelled")
            if not self.waiting or len(self.running) >= self.config.max_batch_size:
                return False
            head = self.waiting[0]
            tokens = head.tokens
            # context logits need every prompt position computed, so such a request reuses nothing
            cached = [] if head.request.return_context_logits else self.cache.cached_prefix(tokens, head.root)
            idle_cached = sum(1 for b in cached if self.cache.refs[b] == 0)
            free = self.cache.available - idle_cached
            if self.config.batch_scheduler_policy == "guaranteed_no_evict":
                free -= sum(self.cache.blocks_for(s.final_length) - len(s.table.blocks) for s in self.running)
                needed = self.cache.blocks_for(head.final_length) - len(cached)
            else:
                needed = self.cache.blocks_for(len(tokens)) - len(cached)
            if needed > free:
                return False
            uncached = len(tokens) - len(cached) * self.cache.block_size
            if budget < uncached <= self.config.max_num_tokens:
                return False
            self.waiting.popleft()
        self.cache.share(head.table, cached)
        head.computed = len(cached) * self.cache.block_size
        head.timings.scheduled = head.timings.scheduled or time.monotonic_ns()
        self.running.append(head)
        if head.request.max_new_tokens == 0:
            self._retire(head, None)
            return self._admit_next(budget)
        return True

    # -- results ----------------------------------------------------------------------------------

    def _take(self, sequence: Sequence, logits: torch.Tensor) -> None:
        """Choose the next token from ``logits``, hand it out, and retire a finished sequence."""
        token, finished = advance(logits, sequence.request, sequence.result, sequence.generator)
        if token is not None:
            now = time.monotonic_ns()
            sequence.timings.first_token = sequence.timings.first_token or now
            sequence.timings.last_token = now
            sequence.on_token(token, sequence.result)
        if finished is not None:
            self._retire(sequence, finished)

    def _retire(self, sequence: Sequence, reason: str | None, error: str | None = None) -> None:
        """Take the sequence out and give its blocks back; its client hears the result, or an
        error (a cancelled request is answered with one, so that the server can close it)."""
        if sequence.done:
            return
        sequence.done = True
        with self._wake:
            self.logits_reserved -= sequence.logits_bytes
            sequence.logits_bytes = 0
        if sequence in self.running:
            self.running.remove(sequence)
        blocks = len(sequence.table.blocks)
        self.cache.release(sequence.table)
        if reason == "cancelled" and error is None:
            error = f"{CANCELLED}: after {len(sequence.result.output_ids)} tokens, {blocks} KV cache blocks freed"
        if error is None:
            if reason:
                sequence.result.finish_reason = reason
            sequence.result.metrics = metrics(sequence)
            try:
                sequence.on_finish(sequence.result)
                return
            except Exception as failure:  # e.g. a response too large to send: the client hears why
                self.faults += 1
                error = f"{SAMPLING_FAILED}: its result could not be sent: {type(failure).__name__}: {failure}"
        try:
            sequence.on_error(error)
        except Exception:  # nobody is left to tell: the request is over either way
            self.faults += 1

    def _fail(self, sequence: Sequence, message: str) -> None:
        self._retire(sequence, "failed", message)


def metrics(sequence: Sequence) -> dict[str, int]:
    """The request's perf metrics, named like the TensorRT-LLM backend's outputs."""
    table, timings = sequence.table, sequence.timings
    return {
        "arrival_time_ns": timings.arrival,
        "first_scheduled_time_ns": timings.scheduled,
        "first_token_time_ns": timings.first_token,
        "last_token_time_ns": timings.last_token,
        "kv_cache_reused_blocks": table.reused,
        "kv_cache_alloc_new_blocks": table.allocated,
        "kv_cache_alloc_total_blocks": table.reused + table.allocated,
    }
