"""Load generator: streams requests to Triton over gRPC, or to any OpenAI-compatible server over
HTTP (server-sent events), and measures each one.

Per request: time to first token (TTFT: request sent -> first streamed response), inter-token
latency (ITL: (end-to-end - TTFT) / (output tokens - 1), as genai-perf and AIPerf define it),
end-to-end latency, input and output token counts (output counted by re-tokenizing the text, as
genai-perf does). Closed loop: ``concurrency`` workers, each sending its next request when the last
one ends. Open loop: Poisson arrivals at ``rate`` requests/s, whatever the server's pace.

Each worker owns one gRPC stream or one HTTP connection, so workers never contend for a shared
client. Failures are recorded with their kind and never stop the run; a server that stops answering
ends the point. On the OpenAI endpoint a streamed chunk with text is a token arrival, as AIPerf and
genai-perf count them.
"""

from __future__ import annotations

import json
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline.config.schema import Endpoint as EndpointKind


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


@dataclass(frozen=True)
class Endpoint:
    """Where the load goes: ``kind`` triton or llmapi (``url`` host:grpc_port, ``model`` the entry
    model) or openai (``url`` the base URL, .../v1; ``model`` the served model name)."""

    kind: EndpointKind
    url: str
    model: str
    api_key: str | None = None  # OpenAI: sent as a bearer token


class ServerGone(Exception):
    """The server stopped answering: the point ends with what was measured."""


TokenHook = Callable[[], None] | None  # called at each streamed response of a request


class _Worker(Protocol):
    def run(
        self, prompt: Prompt, sampling: Sampling, seed: int, request_id: str, on_token: TokenHook = None
    ) -> Measured: ...

    def close(self) -> None: ...


def _inputs(prompt: Prompt, sampling: Sampling, seed: int) -> list[Any]:
    import numpy as np  # numpy and tritonclient: imported when a benchmark runs, not at CLI start

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
    return _infer_inputs(values)


def _infer_inputs(values: list[tuple[str, Any, str]]) -> list[Any]:
    import tritonclient.grpc as grpcclient

    tensors = []
    for name, array, dtype in values:
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def _llmapi_inputs(prompt: Prompt, sampling: Sampling, seed: int) -> list[Any]:
    """The LLM-API model's inputs (no batch dimension: its max_batch_size is 0). It has no input to
    ignore the end token, so a request may end before max_tokens; tokens are counted from the text."""
    import numpy as np

    values: list[tuple[str, Any, str]] = [
        ("text_input", np.array([prompt.text.encode()], dtype=object), "BYTES"),
        ("sampling_param_max_tokens", np.array([prompt.max_tokens], dtype=np.int32), "INT32"),
        ("streaming", np.array([True]), "BOOL"),
        ("sampling_param_temperature", np.array([sampling.temperature], dtype=np.float32), "FP32"),
        ("sampling_param_top_k", np.array([sampling.top_k], dtype=np.int32), "INT32"),
        ("sampling_param_top_p", np.array([sampling.top_p], dtype=np.float32), "FP32"),
        ("sampling_param_seed", np.array([seed], dtype=np.uint64), "UINT64"),
    ]
    return _infer_inputs(values)


class _TritonWorker:
    """One gRPC stream; requests on it run one at a time. The LLM-API model (``llmapi``) streams
    the text so far in each response, the engine path's models each token's text."""

    def __init__(self, endpoint: Endpoint, timeout_s: float):
        import tritonclient.grpc as grpcclient

        self.model, self.timeout_s = endpoint.model, timeout_s
        self.cumulative = endpoint.kind is EndpointKind.llmapi
        self.events: queue.Queue[tuple[float, Any, Any]] = queue.Queue()
        self.client = grpcclient.InferenceServerClient(endpoint.url)
        self.client.start_stream(callback=lambda result, error: self.events.put((time.perf_counter(), result, error)))

    def run(
        self, prompt: Prompt, sampling: Sampling, seed: int, request_id: str, on_token: TokenHook = None
    ) -> Measured:
        inputs = (_llmapi_inputs if self.cumulative else _inputs)(prompt, sampling, seed)
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
                piece = text.reshape(-1)[0].decode(errors="replace")
                if self.cumulative:  # the text so far: keep the latest
                    pieces = [piece]
                else:
                    pieces.append(piece)
                measured.token_times.append(at)
                if on_token is not None:
                    on_token()
            if response.parameters["triton_final_response"].bool_param:
                measured.done, measured.text = at, "".join(pieces)
                return measured

    def close(self) -> None:
        try:
            self.client.stop_stream(cancel_requests=True)
            self.client.close()
        except Exception:  # closing a dead connection must not mask the real error
            pass


def openai_sampling(sampling: Sampling) -> dict[str, Any]:
    """The sampling fields of an OpenAI request. ``top_k`` and ``ignore_eos`` are extensions that
    vLLM, SGLang, trtllm-serve and this pipeline's gateway accept; sent only when they change
    something, so a strict server sees a plain OpenAI request."""
    fields: dict[str, Any] = {"temperature": sampling.temperature}
    if sampling.top_p > 0:
        fields["top_p"] = sampling.top_p
    if sampling.top_k > 0:
        fields["top_k"] = sampling.top_k
    if sampling.ignore_eos:
        fields["ignore_eos"] = True
    return fields


def completion_body(prompt: Prompt, sampling: Sampling, seed: int, model: str) -> dict[str, Any]:
    """The streamed /v1/completions request for one prompt."""
    return {
        "model": model,
        "prompt": prompt.text,
        "max_tokens": prompt.max_tokens,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
        **openai_sampling(sampling),
    }


class _OpenAIWorker:
    """One keep-alive HTTP connection to an OpenAI-compatible server; streamed completions."""

    def __init__(self, endpoint: Endpoint, timeout_s: float):
        import requests

        self.endpoint, self.timeout_s = endpoint, timeout_s
        self.url = endpoint.url.rstrip("/") + "/completions"
        self.session = requests.Session()
        if endpoint.api_key:
            self.session.headers["Authorization"] = f"Bearer {endpoint.api_key}"

    def run(
        self, prompt: Prompt, sampling: Sampling, seed: int, request_id: str, on_token: TokenHook = None
    ) -> Measured:
        import requests

        body = completion_body(prompt, sampling, seed, self.endpoint.model)
        measured = Measured(prompt.input_tokens, time.perf_counter())
        try:
            with self.session.post(self.url, json=body, stream=True, timeout=(10, self.timeout_s)) as response:
                if response.status_code != 200:
                    measured.error, measured.done = _http_error(response), time.perf_counter()
                    return measured
                measured.text = self._read_stream(response, measured, on_token)
        except requests.RequestException as error:  # refused, reset, cut mid-stream, or silent past the timeout
            raise ServerGone(str(error).splitlines()[0][:200]) from error
        measured.done = time.perf_counter()
        return measured

    @staticmethod
    def _read_stream(response: Any, measured: Measured, on_token: TokenHook) -> str:
        pieces = []
        # each server-sent event is one HTTP chunk; iter_lines yields it as soon as it arrives
        for line in response.iter_lines(chunk_size=512):
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if event.get("error"):
                measured.error = _error_kind(str(event["error"].get("message", "error")))
                break
            choices = event.get("choices") or []
            text = choices[0].get("text") if choices else None
            if text:
                pieces.append(text)
                measured.token_times.append(time.perf_counter())
                if on_token is not None:
                    on_token()
        return "".join(pieces)

    def close(self) -> None:
        self.session.close()


def _http_error(response: Any) -> str:
    try:
        message = str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = response.reason or ""
    return f"HTTP {response.status_code}: {message}"[:80]


def _connect(endpoint: Endpoint, timeout_s: float) -> _Worker:
    if endpoint.kind is EndpointKind.openai:
        return _OpenAIWorker(endpoint, timeout_s)
    return _TritonWorker(endpoint, timeout_s)


def _error_kind(message: str) -> str:
    first = message.strip().splitlines()[0] if message.strip() else "error"
    return first.split(":", 1)[0][:80] if "]" not in first else first.split("]", 1)[-1].strip()[:80]


class _Ramp:
    """A closed loop's workers start one after another, spread over the first request's output:
    worker k sends its first request once worker 0's first has streamed k/c of its tokens (or
    ended). Started together, c requests of one output length are prefilled back to back, end in
    back-to-back steps and come back together, every time: the point would measure that one
    burst's queue over and over (on the CPU target at c=8: TTFT p50 736 ms started together,
    347 ms spread, against 331 ms at c=1). Spread in tokens, so in the server's own steps,
    whatever its speed; AIPerf's ``--concurrency-ramp-duration`` does the same in seconds."""

    def __init__(self, workers: int, tokens: int):
        self.share = max(1, tokens) / workers  # tokens of the first request between two starts
        self.seen, self.ended = 0, False
        self.changed = threading.Condition()

    def token(self) -> None:
        with self.changed:
            self.seen += 1
            self.changed.notify_all()

    def end(self) -> None:
        with self.changed:
            self.ended = True
            self.changed.notify_all()

    def wait_turn(self, number: int, timeout_s: float) -> None:
        with self.changed:
            self.changed.wait_for(lambda: self.ended or self.seen >= number * self.share, timeout_s)


def run_point(
    endpoint: Endpoint,
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

    ``ramp_up`` (closed loop): the workers start one after another (``_Ramp``) and each worker's
    first request is marked ``ramp_up``: left out of the latency percentiles; throughput is counted
    while every worker is busy (``report.summarize``)."""
    workers_n = concurrency or max(1, min(len(prompts), 64))
    pending: queue.Queue[tuple[int, Prompt]] = queue.Queue()
    for index, prompt in enumerate(prompts):
        pending.put((index, prompt))
    results: list[Measured] = []
    lock = threading.Lock()
    gone: list[str] = []
    arrivals = _arrival_times(len(prompts), rate, seed) if rate else None
    ramp = _Ramp(workers_n, prompts[0].max_tokens if prompts else 1) if ramp_up and concurrency else None
    started = time.perf_counter()

    def work(number: int) -> None:
        worker = _connect(endpoint, timeout_s)
        unmeasured = 1 if ramp is not None else 0
        pacer = ramp if ramp is not None and number == 0 else None  # the others start by its first stream
        if ramp is not None and pacer is None:
            ramp.wait_turn(number, timeout_s)
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
                on_token = pacer.token if pacer is not None and unmeasured else None
                try:
                    measured = worker.run(prompt, sampling, seed + index, str(index), on_token)
                except ServerGone as error:
                    gone.append(str(error))
                    return
                except Exception as error:  # a bad prompt or answer: that request's error, never a lost one
                    measured = Measured(prompt.input_tokens, time.perf_counter(), done=time.perf_counter())
                    measured.error = f"{type(error).__name__}: {error}"[:80]
                if unmeasured:
                    unmeasured -= 1
                    measured.ramp_up = True
                    if pacer is not None:
                        pacer.end()
                with lock:
                    results.append(measured)
                if on_done is not None:
                    on_done(measured)
        finally:
            if pacer is not None:
                pacer.end()  # the others must not wait for a first request that never came
            worker.close()

    threads = [threading.Thread(target=work, args=(number,), daemon=True) for number in range(workers_n)]
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
