"""In-flight batching over the reference runtime: requests join and leave the running batch at
every decoding step, as TensorRT-LLM's batch manager does on GPUs.

A scheduler thread loops: admit waiting requests (each prefilled alone, which also gives its first
token), run one decoding step for every running sequence as one left-padded batch, hand each new
token to its request's callback, and retire finished or cancelled sequences at once. A request is
admitted only while the batch has a free slot (``max_batch_size``) and the KV cache budget
(``kv_cache_tokens``) can hold its prompt plus every token it may generate, TensorRT-LLM's
``guaranteed_no_evict`` policy: a running sequence never has to be paused, and memory for the
cache never grows past the budget. Each sequence keeps its own keys and values; a step pads them
into one batch and takes the new position back out.

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

from .generate import PAD, Request, Result, advance

CANCEL_POLL_S = 0.5
TokenCallback = Callable[[int], None]  # the new token id
FinishCallback = Callable[[Result], None]
ErrorCallback = Callable[[str], None]


@dataclass
class Timings:
    """Monotonic times of a request's life, for perf metrics."""

    arrival: float
    scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None


@dataclass(eq=False)
class Sequence:
    request: Request
    on_token: TokenCallback
    on_finish: FinishCallback
    on_error: ErrorCallback
    timings: Timings
    result: Result = field(default_factory=lambda: Result([], "length"))
    # its own keys and values, [1, heads, length, dim] per layer, while it is outside the batched cache
    layers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    length: int = 0  # cached positions
    last_token: int = PAD
    generator: torch.Generator | None = None
    is_cancelled: Callable[[], bool] | None = None  # asked at every step (a client that went away)
    cancelled: bool = False
    done: bool = False

    @property
    def reserved_tokens(self) -> int:
        """Cache positions this sequence may ever need: its prompt and every token it may generate."""
        return len(self.request.input_ids) + self.request.max_new_tokens


class Scheduler:
    """Thread-safe: ``submit`` and ``cancel`` from any thread; the work happens on the scheduler's
    own thread (``start``), or step by step with ``step`` (tests)."""

    def __init__(
        self,
        model: Any,
        max_batch_size: int,
        kv_cache_tokens: int,
        max_seq_len: int | None = None,
    ):
        self.model = model
        self.max_batch_size = max_batch_size
        self.kv_cache_tokens = kv_cache_tokens
        self.max_seq_len = max_seq_len
        self.vocab_size = int(model.config.vocab_size)
        self.device = next(model.parameters()).device
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # The running batch's cache, kept from step to step while nobody joins or leaves; rebuilt
        # from each sequence's own keys and values when the batch changes.
        self._members: list[Sequence] = []
        self._cache: Any = None
        self._mask = torch.zeros((0, 0), dtype=torch.long)
        self._next_cancel_poll = 0.0
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

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
        problems = request.problems(self.vocab_size, self.max_seq_len)
        if not problems and len(request.input_ids) + request.max_new_tokens > self.kv_cache_tokens:
            problems.append(
                f"{len(request.input_ids)} input tokens plus request_output_len={request.max_new_tokens} exceed "
                f"the KV cache budget of {self.kv_cache_tokens} tokens"
            )
        if problems:
            on_error("; ".join(problems))
            return None
        sequence = Sequence(request, on_token, on_finish, on_error, Timings(time.monotonic()))
        sequence.is_cancelled = is_cancelled
        if request.seed is not None:
            sequence.generator = torch.Generator().manual_seed(request.seed)
        with self._wake:
            self.waiting.append(sequence)
            self._wake.notify()
        return sequence

    def cancel(self, sequence: Sequence) -> None:
        """The sequence leaves the batch at the next step and frees its cache."""
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

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.waiting and not self.running:
                    self._wake.wait()
                if self._stopping:
                    return
            self.step()

    @property
    def reserved_tokens(self) -> int:
        return sum(s.reserved_tokens for s in self.running)

    def step(self) -> None:
        """Retire cancelled sequences, admit what fits, then one decoding step for the rest."""
        if time.monotonic() >= self._next_cancel_poll:
            self._poll_cancellations()
        for sequence in [s for s in self.running if s.cancelled]:
            self._retire(sequence, "cancelled")
        self._admit()
        decoding = [s for s in self.running if not s.done]
        if not decoding:
            self._members, self._cache = [], None  # idle: hold no cache
        else:
            try:
                self._decode(decoding)
            except Exception as error:  # answer every open request rather than leave clients hanging
                for sequence in decoding:
                    self._fail(sequence, f"decoding failed: {error}")

    def _poll_cancellations(self) -> None:
        """Ask each request whether its client went away. Asking is a round trip to the server, so
        it happens every CANCEL_POLL_S rather than at every step."""
        self._next_cancel_poll = time.monotonic() + CANCEL_POLL_S
        with self._wake:  # submitters append to the queue meanwhile
            present = [*self.running, *self.waiting]
        for sequence in present:
            if sequence.is_cancelled is not None and not sequence.cancelled:
                try:
                    sequence.cancelled = bool(sequence.is_cancelled())
                except Exception:  # the request is gone with its client
                    sequence.cancelled = True

    def _admit(self) -> None:
        """Take waiting requests in arrival order while a slot and cache room remain, and prefill
        them together (one left-padded forward pass, which also gives each its first token)."""
        admitted: list[Sequence] = []
        with self._wake:
            while self.waiting:
                head = self.waiting[0]
                if head.cancelled:
                    self.waiting.popleft()
                    continue
                if len(self.running) >= self.max_batch_size:
                    break
                if self.reserved_tokens + head.reserved_tokens > self.kv_cache_tokens:
                    break  # first come, first served: it waits for room, later ones wait behind it
                self.waiting.popleft()
                head.timings.scheduled = time.monotonic()
                self.running.append(head)
                admitted.append(head)
        for sequence in [s for s in admitted if s.request.max_new_tokens == 0]:
            self._retire(sequence, None)
        admitted = [s for s in admitted if not s.done]
        if admitted:
            try:
                self._prefill(admitted)
            except Exception as error:
                for sequence in admitted:
                    self._fail(sequence, f"prefill failed: {error}")

    def _prefill(self, batch: list[Sequence]) -> None:
        from transformers import DynamicCache

        longest = max(len(s.request.input_ids) for s in batch)
        ids = torch.full((len(batch), longest), PAD, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, sequence in enumerate(batch):  # left padding: every prompt ends in the last column
            prompt = sequence.request.input_ids
            ids[row, longest - len(prompt) :] = torch.tensor(prompt)
            mask[row, longest - len(prompt) :] = 1
        cache = DynamicCache()
        with torch.no_grad():
            out = self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(self.device),
                past_key_values=cache,
                use_cache=True,
            )
        logits = out.logits[:, -1, :].float().cpu()
        layers = [_kv(layer) for layer in cache.layers]
        for row, sequence in enumerate(batch):
            length = len(sequence.request.input_ids)
            start = longest - length
            sequence.layers = [(k[row : row + 1, :, start:], v[row : row + 1, :, start:]) for k, v in layers]
            sequence.length = length
            self._take(sequence, logits[row])

    def _decode(self, batch: list[Sequence]) -> None:
        if batch != self._members:
            self._rebuild(batch)
        longest = self._mask.shape[1]
        self._mask = torch.cat([self._mask, torch.ones((len(batch), 1), dtype=torch.long)], dim=1)
        ids = torch.tensor([[s.last_token] for s in batch], dtype=torch.long)
        positions = torch.tensor([[s.length] for s in batch], dtype=torch.long)
        with torch.no_grad():
            out = self.model(
                input_ids=ids.to(self.device),
                attention_mask=self._mask.to(self.device),
                position_ids=positions.to(self.device),
                past_key_values=self._cache,
                use_cache=True,
            )
        assert self._cache.get_seq_length() == longest + 1
        logits = out.logits[:, -1, :].float().cpu()
        for row, sequence in enumerate(batch):
            sequence.length += 1
            if sequence.cancelled:
                self._retire(sequence, "cancelled")
            else:
                self._take(sequence, logits[row])

    def _rebuild(self, batch: list[Sequence]) -> None:
        """One left-padded cache for ``batch``: members of the old batch take their rows out of the
        old cache, newcomers bring the keys and values of their prefill."""
        from transformers import DynamicCache

        if self._cache is not None:
            old = [_kv(layer) for layer in self._cache.layers]
            width = self._mask.shape[1]
            for row, sequence in enumerate(self._members):
                if sequence in batch:
                    start = width - sequence.length
                    sequence.layers = [(k[row : row + 1, :, start:], v[row : row + 1, :, start:]) for k, v in old]
        longest = max(s.length for s in batch)
        cache = DynamicCache()
        for index in range(len(batch[0].layers)):
            keys = [_left_pad(s.layers[index][0], longest) for s in batch]
            values = [_left_pad(s.layers[index][1], longest) for s in batch]
            cache.update(torch.cat(keys), torch.cat(values), index)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, sequence in enumerate(batch):
            mask[row, longest - sequence.length :] = 1
            sequence.layers = []  # its keys and values now live in the batched cache
        self._members, self._cache, self._mask = list(batch), cache, mask

    def _take(self, sequence: Sequence, logits: torch.Tensor) -> None:
        """Choose the next token from ``logits``, hand it out, and retire a finished sequence."""
        token, finished = advance(logits, sequence.request, sequence.result, sequence.generator)
        if token is not None:
            now = time.monotonic()
            sequence.last_token = token
            sequence.timings.first_token = sequence.timings.first_token or now
            sequence.timings.last_token = now
            sequence.on_token(token)
        if finished is not None:
            self._retire(sequence, finished)

    def _retire(self, sequence: Sequence, reason: str | None) -> None:
        if sequence.done:
            return
        sequence.done = True
        sequence.layers = []  # its rows leave the batched cache when the batch is next rebuilt
        if sequence in self.running:
            self.running.remove(sequence)
        if reason:
            sequence.result.finish_reason = reason
        if reason != "cancelled":
            sequence.on_finish(sequence.result)

    def _fail(self, sequence: Sequence, message: str) -> None:
        if not sequence.done:
            self._retire(sequence, "cancelled")  # removed without a finish callback
            sequence.on_error(message)


def _kv(layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache layer's keys and values (set once the model has run)."""
    assert layer.keys is not None and layer.values is not None
    return layer.keys, layer.values


def _left_pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """[1, heads, n, dim] -> [1, heads, length, dim], zeros in front (masked out of attention)."""
    missing = length - tensor.shape[2]
    if missing == 0:
        return tensor
    pad = torch.zeros((*tensor.shape[:2], missing, tensor.shape[3]), dtype=tensor.dtype, device=tensor.device)
    return torch.cat([pad, tensor], dim=2)
