"""Load generator: streams requests to Triton over gRPC and measures each one.

Per request: time to first token (TTFT: request sent -> first streamed response), inter-token
latency (ITL: (end-to-end - TTFT) / (output tokens - 1), as genai-perf and AIPerf define it),
end-to-end latency, input and output token counts (output counted by re-tokenizing the text, as
genai-perf does). Closed loop: ``concurrency`` workers, each sending its next request when the last
one ends. Open loop: Poisson arrivals at ``rate`` requests/s, whatever the server's pace.

Each worker owns one gRPC stream, so callbacks never contend for a shared client. Failures are
recorded with their kind and never stop the run; a server that stops answering ends the point.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Prompt:
    text: str
    input_tokens: int
    max_tokens: int


@dataclass
class Measured:
    input_tokens: int
    sent: float
    token_times: list[float] = field(default_factory=list)
    text: str = ""
    output_tokens: int = 0
    error: str | None = None
    done: float | None = None
    ramp_up: bool = False  # a worker's first request of a ramped-up point: in throughput, not latency

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.sent if self.token_times else None

    @property
    def e2e(self) -> float | None:
        return None if self.done is None else self.done - self.sent

    @property
    def itl(self) -> float | None:
        if self.error or self.done is None or self.output_tokens < 2 or self.ttft is None:
            return None
        return (self.done - self.sent - self.ttft) / (self.output_tokens - 1)


@dataclass
class Sampling:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 0.0
    ignore_eos: bool = True  # generate exactly max_tokens (end_id=-1 never matches)


class ServerGone(Exception):
    """The server stopped answering: the point ends with what was measured."""


def _inputs(prompt: Prompt, sampling: Sampling, seed: int) -> list[Any]:
    import numpy as np  # numpy and tritonclient: imported when a benchmark runs, not at CLI start
    import tritonclient.grpc as grpcclient

    values: list[tuple[str, Any, str]] = [
        ("text_input", np.array([[prompt.text.encode()]], dtype=object), "BYTES"),
        ("max_tokens", np.array([[prompt.max_tokens]], dtype=np.int32), "INT32"),
        ("stream", np.array([[True]]), "BOOL"),
        ("temperature", np.array([[sampling.temperature]], dtype=np.float32), "FP32"),
        ("top_k", np.array([[sampling.top_k]], dtype=np.int32), "INT32"),
        ("top_p", np.array([[sampling.top_p]], dtype=np.float32), "FP32"),
        ("seed", np.array([[seed]], dtype=np.uint64), "UINT64"),
    ]
    if sampling.ignore_eos:
        values.append(("end_id", np.array([[-1]], dtype=np.int32), "INT32"))
    tensors = []
    for name, array, dtype in values:
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


class _Worker:
    """One gRPC stream; requests on it run one at a time."""

    def __init__(self, url: str, model: str, timeout_s: float):
        import tritonclient.grpc as grpcclient

        self.model, self.timeout_s = model, timeout_s
        self.events: queue.Queue[tuple[float, Any, Any]] = queue.Queue()
        self.client = grpcclient.InferenceServerClient(url)
        self.client.start_stream(callback=lambda result, error: self.events.put((time.perf_counter(), result, error)))

    def run(self, prompt: Prompt, sampling: Sampling, seed: int, request_id: str) -> Measured:
        inputs = _inputs(prompt, sampling, seed)
        measured = Measured(prompt.input_tokens, time.perf_counter())
        self.client.async_stream_infer(self.model, inputs, request_id=request_id, enable_empty_final_response=True)
        pieces = []
        while True:
            try:
                at, result, error = self.events.get(timeout=self.timeout_s)
            except queue.Empty as timeout:
                raise ServerGone(f"no response within {self.timeout_s:.0f} s") from timeout
            if error is not None:
                measured.error = _error_kind(str(error))
                measured.done = at
                if "unavailable" in str(error).lower() or "connect" in str(error).lower():
                    raise ServerGone(str(error).splitlines()[0])
                return measured
            response = result.get_response()
            text = result.as_numpy("text_output")
            if text is not None and text.size:
                pieces.append(text.reshape(-1)[0].decode(errors="replace"))
                measured.token_times.append(at)
            if response.parameters["triton_final_response"].bool_param:
                measured.done, measured.text = at, "".join(pieces)
                return measured

    def close(self) -> None:
        try:
            self.client.stop_stream(cancel_requests=True)
            self.client.close()
        except Exception:  # closing a dead connection must not mask the real error
            pass


def _error_kind(message: str) -> str:
    first = message.strip().splitlines()[0] if message.strip() else "error"
    return first.split(":", 1)[0][:80] if "]" not in first else first.split("]", 1)[-1].strip()[:80]


def run_point(
    url: str,
    model: str,
    prompts: list[Prompt],
    sampling: Sampling,
    concurrency: int | None = None,
    rate: float | None = None,
    seed: int = 0,
    timeout_s: float = 300.0,
    on_done: Callable[[Measured], None] | None = None,
    stop_after_s: float | None = None,
    ramp_up: bool = False,
) -> tuple[list[Measured], float, str | None]:
    """Send every prompt (closed loop at ``concurrency`` or open loop at ``rate``), or as many as
    start within ``stop_after_s``; return the measurements, the wall time of the point, and why it
    ended early (None when it did not).

    ``ramp_up`` (closed loop): each worker's first request is marked ``ramp_up``: it counts toward
    throughput but not toward latency percentiles. All workers start at once, so their first
    requests arrive as one burst that a running server never sees again; without the ramp-up that
    burst weighs on every percentile of a short point."""
    workers_n = concurrency or max(1, min(len(prompts), 64))
    pending: queue.Queue[tuple[int, Prompt]] = queue.Queue()
    for index, prompt in enumerate(prompts):
        pending.put((index, prompt))
    results: list[Measured] = []
    lock = threading.Lock()
    gone: list[str] = []
    arrivals = _arrival_times(len(prompts), rate, seed) if rate else None
    started = time.perf_counter()

    def work() -> None:
        worker = _Worker(url, model, timeout_s)
        unmeasured = 1 if ramp_up and concurrency else 0
        try:
            while not gone:
                if stop_after_s is not None and time.perf_counter() - started > stop_after_s:
                    return
                try:
                    index, prompt = pending.get_nowait()
                except queue.Empty:
                    return
                if arrivals is not None:  # open loop: wait for this request's arrival time
                    time.sleep(max(0.0, started + arrivals[index] - time.perf_counter()))
                try:
                    measured = worker.run(prompt, sampling, seed + index, str(index))
                except ServerGone as error:
                    gone.append(str(error))
                    return
                if unmeasured:
                    unmeasured -= 1
                    measured.ramp_up = True
                with lock:
                    results.append(measured)
                if on_done is not None:
                    on_done(measured)
        finally:
            worker.close()

    threads = [threading.Thread(target=work, daemon=True) for _ in range(workers_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - started, (gone[0] if gone else None)


def _arrival_times(count: int, rate: float, seed: int) -> list[float]:
    """Poisson process: exponential gaps with mean 1/rate, reproducible from the seed."""
    rng = random.Random(seed)
    times, now = [], 0.0
    for _ in range(count):
        times.append(now)
        now += rng.expovariate(rate)
    return times
