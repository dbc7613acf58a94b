"""Soak test of the CPU serving path (``make soak``; ``python -m benchmarks soak [seconds=300]``).

The embedded model's repository, served by a real Triton, under ``STREAMS`` concurrent gRPC streams
for ``seconds`` after a warm-up: prompts of 16-64 words, outputs of 8-32 tokens, one stream in
ten cancelled after its first token. Halfway through, a burst of ``BURST`` streams is opened through the BLS
model and each is dropped as soon as it is sent (the flood a misbehaving client makes). Reported:

- errors on streams that were neither cancelled nor refused with "Exceeds maximum queue size"
  (must be 0); refusals are counted apart, as the bounded queue's answer to the burst;
- resident memory and thread count of the whole server (tritonserver and its python stubs) after
  warm-up, at the end, and their growth. The KV cache pool is told apart (the engine's
  ``pipeline_kv_cache_resident_bytes`` gauge): it is allocated lazily and fills with cached
  prefixes up to its fixed budget, which is how it is meant to work; the memory beside it must
  grow less than 10%, and threads stay flat;
- the time to first token of a probe request sent every 2 s (each on its own stream, beside the
  load): the median of those sent before the burst, and how long after the burst the first probe
  that is back within 2x of it was sent (must be under 10 s).

The server gets every core but one (the engine's default); the load generator's threads share
the last one, so figures here are about robustness, not speed.
"""

from __future__ import annotations

import asyncio
import queue
import random
import re
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from pipeline import app, runner, validate
from pipeline.deploy import server
from pipeline.runtime.scheduler import QUEUE_FULL
from pipeline.stages import STAGES

STREAMS = 32
BURST = 500
CANCEL_FRACTION = 0.1
WARMUP_S = 60.0  # at most; a short soak warms up for a fifth of its length
PROBE_EVERY_S = 2.0
RESIDENT_GAUGE = "pipeline_kv_cache_resident_bytes"
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "while",
    "a",
    "model",
    "answers",
    "questions",
    "about",
    "it",
    "and",
    "more",
]


@dataclass
class Tally:
    done: int = 0
    cancelled: int = 0
    refused: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, message: str = "") -> None:
        with self.lock:
            if kind == "error":
                self.errors.append(message[:200])
            else:
                setattr(self, kind, getattr(self, kind) + 1)


def _inputs(text: str, max_tokens: int) -> list[Any]:
    import tritonclient.grpc as grpcclient

    tensors = []
    for name, array, dtype in (
        ("text_input", np.array([[text.encode()]], dtype=object), "BYTES"),
        ("max_tokens", np.array([[max_tokens]], dtype=np.int32), "INT32"),
        ("stream", np.array([[True]]), "BOOL"),
        ("end_id", np.array([[-1]], dtype=np.int32), "INT32"),  # every request runs its full length
    ):
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def _prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(16, 64)))


def _stream_worker(url: str, model: str, seed: int, until: float, tally: Tally) -> None:
    """One client: a request at a time on its own gRPC stream; one in ten is cancelled (the stream
    is dropped with its request) after the first token, then a fresh stream is opened."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    rng = random.Random(seed)
    while time.monotonic() < until:
        events: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client = grpcclient.InferenceServerClient(url)
        client.start_stream(callback=lambda result, error, events=events: events.put((result, error)))
        cancel = rng.random() < CANCEL_FRACTION
        try:
            client.async_stream_infer(
                model, _inputs(_prompt(rng), rng.randint(8, 32)), enable_empty_final_response=True
            )
            while True:
                result, error = events.get(timeout=120)
                if error is not None:
                    message = str(error)
                    tally.add("refused" if QUEUE_FULL in message else "error", message)
                    break
                if cancel:
                    tally.add("cancelled")
                    break
                if result.get_response().parameters["triton_final_response"].bool_param:
                    tally.add("done")
                    break
        except queue.Empty:
            tally.add("error", "no response within 120 s")
        except InferenceServerException as refused:  # the stream broke: its callback has the reason
            reason = events.get(timeout=5)[1] if not events.empty() else refused
            tally.add("refused" if QUEUE_FULL in str(reason) else "error", f"stream: {reason}")
        finally:
            client.stop_stream(cancel_requests=True)
            client.close()


async def _burst(url: str, model: str, count: int) -> None:
    """``count`` streams, each sending one long request and dropping it at once."""
    import tritonclient.grpc.aio as aioclient

    async def one(index: int) -> None:
        client = aioclient.InferenceServerClient(url)

        async def requests() -> Any:
            yield {"model_name": model, "inputs": _inputs(_prompt(random.Random(index)), 48), "request_id": str(index)}
            await asyncio.sleep(1.0)  # the request side stays open until the client leaves

        try:
            stream = client.stream_infer(requests())
            first = asyncio.ensure_future(stream.__anext__())  # the call is under way
            await asyncio.sleep(0.1)
            stream.cancel()  # the client goes away: the server sees the stream cancelled
            first.cancel()
        except Exception:  # a refused or cut stream is what the burst is for
            pass
        finally:
            await client.close()

    await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)


def _probe(url: str, model: str) -> list[float]:
    ttft = _probe_ttft(url, model)
    return [] if ttft is None else [ttft]


def _probe_ttft(url: str, model: str) -> float | None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    events: queue.Queue[tuple[float, Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: events.put((time.perf_counter(), result, error)))
    sent = time.perf_counter()
    try:
        client.async_stream_infer(model, _inputs("What is the capital of France?", 4), enable_empty_final_response=True)
        at, _, error = events.get(timeout=120)
        return None if error is not None else (at - sent) * 1000
    except (queue.Empty, InferenceServerException):  # no answer, or a stream broken at once
        return None
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


def _server_usage(running: server.Server) -> tuple[float, int, dict[str, int]]:
    """Resident MiB and threads of tritonserver and every process under it, and the threads of
    each (a python stub is named after its model)."""
    assert running.process is not None
    root = psutil.Process(running.process.process.pid)
    family = [root, *root.children(recursive=True)]
    rss = 0
    threads: dict[str, int] = {}
    for process in family:
        try:
            rss += process.memory_info().rss
            models = [Path(arg).parent.parent.name for arg in process.cmdline() if arg.endswith("model.py")]
            threads[models[0] if models else process.name()] = process.num_threads()
        except psutil.Error:
            continue
    return rss / 2**20, sum(threads.values()), threads


def _gauges(running: server.Server) -> dict[str, float]:
    """The engine model's gauges: what of its KV cache pool is resident (the pool is allocated
    lazily and fills as prefixes are cached, up to its fixed budget), and its requests by state."""
    import urllib.request

    with urllib.request.urlopen(running.metrics_url, timeout=10) as response:
        text = response.read().decode()
    gauges = {}
    for line in text.splitlines():
        if line.startswith(RESIDENT_GAUGE):
            gauges["kv_pool_resident_mib"] = float(line.rsplit(" ", 1)[1]) / 2**20
        elif match := re.match(r'nv_trt_llm_request_metrics\{.*request_type="(\w+)".*\} (\S+)$', line):
            gauges[f"engine_requests_{match.group(1)}"] = float(match.group(2))
    return gauges


def soak(workdir: Path, seconds: float) -> dict[str, Any]:
    """Build (or find) the embedded model's CPU repository, serve it, and soak it."""
    overrides = [f"workdir={workdir}", "target=cpu", "tracking=none", "benchmark=none", "until=triton_repo"]
    cfg = validate.load(overrides)
    runner.build(cfg, STAGES)
    target = app.built_target(cfg)
    triton = server.with_free_ports(cfg.triton)
    launch = server.launch_for(triton, target.repo, False, 1, workdir)
    out = workdir / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    with server.Server(launch, triton, out / "soak-server.log") as running:
        return run(running, seconds)


def run(
    running: server.Server,
    seconds: float,
    streams: int = STREAMS,
    burst: int = BURST,
    settle_s: float = 5.0,
    burst_after_s: float | None = None,
) -> dict[str, Any]:
    """Soak a running server for ``seconds`` (plus warm-up) with ``streams`` streams and a burst of
    ``burst`` dropped streams after ``burst_after_s`` (default: halfway); ``settle_s`` after the
    load, the server is measured again."""
    warmup = min(WARMUP_S, seconds / 5)
    url, model = running.grpc_url, "tensorrt_llm_bls"
    tally = Tally()
    until = time.monotonic() + warmup + seconds
    workers = [
        threading.Thread(target=_stream_worker, args=(url, model, i, until, tally), daemon=True) for i in range(streams)
    ]
    for worker in workers:
        worker.start()
    time.sleep(warmup)
    rss_start, threads_start, _ = _server_usage(running)
    pool_start = _gauges(running)["kv_pool_resident_mib"]
    print(
        f"after {warmup:.0f} s of warm-up: server {rss_start:.0f} MiB ({pool_start:.0f} MiB of it the KV cache "
        f"pool), {threads_start} threads",
        flush=True,
    )
    burst_at = time.monotonic() + (seconds / 2 if burst_after_s is None else burst_after_s)
    burst_done: float | None = None
    probes: list[tuple[float, list[float]]] = []
    while time.monotonic() < until:
        if burst_done is None and time.monotonic() >= burst_at:
            print(f"burst: {burst} streams opened and dropped", flush=True)
            asyncio.run(_burst(url, model, burst))
            burst_done = time.monotonic()
            print(f"burst sent in {burst_done - burst_at:.1f} s", flush=True)
        box: list[float] = []  # the probe's TTFT, once it has one
        threading.Thread(target=lambda box=box: box.extend(_probe(url, model)), daemon=True).start()
        probes.append((time.monotonic(), box))
        time.sleep(PROBE_EVERY_S)
    for worker in workers:
        worker.join(timeout=180)
    time.sleep(settle_s)  # cancelled requests leave the batch at their next step
    if not running.alive():  # Triton 2.51 can crash under cancellations: say so, not a socket error
        raise SystemExit(f"soak: Triton died during the soak (its log: {running.log_file})")
    rss_end, threads_end, threads_by_process = _server_usage(running)
    gauges_end = _gauges(running)
    pool_end = gauges_end["kv_pool_resident_mib"]
    # beside the pool, which only fills up to its fixed budget as prefixes are cached
    other_start, other_end = rss_start - pool_start, rss_end - pool_end
    assert burst_done is not None
    before = [box[0] for at, box in probes if at < burst_at and box]
    normal = statistics.median(before) if before else float("nan")
    after = [(at, box[0]) for at, box in probes if at >= burst_done and box]
    recovered = next((at - burst_done for at, t in after if t <= 2 * normal), None)
    return {
        "seconds": seconds,
        "streams": streams,
        "burst": burst,
        "completed": tally.done,
        "cancelled": tally.cancelled,
        "refused_queue_full": tally.refused,
        "errors": len(tally.errors),
        "error_examples": tally.errors[:3],
        "server_rss_mib": [round(rss_start), round(rss_end)],
        "rss_growth_pct": round((rss_end - rss_start) / rss_start * 100, 1),
        "kv_pool_resident_mib": [round(pool_start), round(pool_end)],
        "rss_beside_kv_pool_mib": [round(other_start), round(other_end)],
        "rss_beside_kv_pool_growth_pct": round((other_end - other_start) / other_start * 100, 1),
        "server_threads": [threads_start, threads_end],
        "threads_by_process_at_end": threads_by_process,
        "engine_requests_at_end": {k: v for k, v in gauges_end.items() if k.startswith("engine_requests_")},
        "warmup_s": warmup,
        "probes": len(probes),
        "probe_ttft_ms_median_before_burst": round(normal, 1),
        "ttft_back_within_2x_after_burst_s": None if recovered is None else round(recovered, 1),
        "checks": {
            "no errors": not tally.errors,
            "memory beside the KV cache pool grows < 10%": other_end < other_start * 1.10,
            # idle request threads end after a few seconds, so the count may fall; it must not grow
            "threads do not grow (< 10%)": threads_end <= threads_start * 1.10,
            "TTFT back within 10 s": recovered is not None and recovered < 10,
        },
    }
