"""The engine's state as Triton metrics, under the TensorRT-LLM backend's own names, so dashboards
and routers written for it (llm-d's scorers read these) work on the CPU target too:
``nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=max|free|used|tokens_per|fraction}`` and
``nv_trt_llm_request_metrics{request_type=active|max|scheduled|waiting}``. One more gauge has no
upstream twin: ``pipeline_kv_cache_resident_bytes``, the part of the KV cache pool written at least
once (the pool is allocated lazily in host memory; the soak tells it apart from a leak). Two more
say whether the scheduler lives, for health checks (Triton's own health cannot see a python
model's thread): ``pipeline_scheduler_heartbeat_seconds``, the Unix time of the scheduler loop's
last beat, and ``pipeline_scheduler_alive`` (1 or 0)."""

from __future__ import annotations

import threading
import time
from typing import Any

import triton_python_backend_utils as pb_utils

PERIOD_S = 1.0  # upstream publishes its iteration stats about as often


def _gauges(name: str, description: str) -> Any:
    return pb_utils.MetricFamily(name=name, description=description, kind=pb_utils.MetricFamily.GAUGE)


class EngineStats:
    """A thread that copies the scheduler's counters into Triton's metrics every PERIOD_S."""

    def __init__(self, scheduler: Any, model: str, version: str) -> None:
        self.scheduler = scheduler
        labels = {"model": model, "version": version}
        blocks = _gauges("nv_trt_llm_kv_cache_block_metrics", "TRT LLM KV cache block metrics")
        requests = _gauges("nv_trt_llm_request_metrics", "TRT LLM request metrics")
        resident = _gauges(
            "pipeline_kv_cache_resident_bytes",
            "Bytes of the KV cache pool written at least once (resident in host memory)",
        )
        heartbeat = _gauges(
            "pipeline_scheduler_heartbeat_seconds",
            "Unix time of the in-flight scheduler loop's last beat (a stalled loop stops beating)",
        )
        alive = _gauges("pipeline_scheduler_alive", "1 while the in-flight scheduler's thread runs and beats, else 0")
        # a family must outlive its metrics: kept here with them
        self.families = (blocks, requests, resident, heartbeat, alive)
        self.heartbeat: Any = heartbeat.Metric(labels=labels)
        self.alive: Any = alive.Metric(labels=labels)
        self.blocks = {
            kind: blocks.Metric(labels={"kv_cache_block_type": kind, **labels})
            for kind in ("max", "free", "used", "tokens_per", "fraction")
        }
        self.requests = {
            kind: requests.Metric(labels={"request_type": kind, **labels})
            for kind in ("active", "max", "scheduled", "waiting")
        }
        self.resident: Any = resident.Metric(labels=labels)
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._publish, name="engine-stats", daemon=True)
        self.thread.start()

    def _publish(self) -> None:
        try:
            self._loop()
        except Exception as error:  # metrics must never take serving down with them
            pb_utils.Logger.log_warn(f"engine metrics stopped: {error}")

    def _loop(self) -> None:
        while True:
            scheduler = self.scheduler
            cache, config = scheduler.cache, scheduler.config
            used, running, waiting = cache.used, len(scheduler.running), len(scheduler.waiting)
            for kind, value in (
                ("max", cache.num_blocks),
                ("free", cache.num_blocks - used),
                ("used", used),
                ("tokens_per", cache.block_size),
                ("fraction", used / cache.num_blocks),
            ):
                self.blocks[kind].set(value)
            for kind, value in (
                ("active", running + waiting),
                ("max", config.max_batch_size),
                ("scheduled", running),
                ("waiting", waiting),
            ):
                self.requests[kind].set(value)
            self.resident.set(cache.resident_bytes)
            # the beat in wall-clock time, so that a reader in another process can compare it
            self.heartbeat.set(time.time() - (time.monotonic() - scheduler.heartbeat))
            self.alive.set(1 if scheduler.alive() else 0)
            if self.closing.wait(PERIOD_S):
                return

    def stop(self) -> None:
        self.closing.set()
        self.thread.join(timeout=5)
        self.blocks.clear()  # metrics before their families (the python backend's rule)
        self.requests.clear()
        self.resident = self.heartbeat = self.alive = None
