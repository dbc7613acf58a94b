"""The CPU engine's heartbeat, as the gateway's ``/health`` reads it from Triton's metrics.

Triton's own health endpoints stay green when a python model's thread has died or hangs (its
readiness is the model's load state), so the engine model publishes the last time its scheduler
loop beat (``pipeline_scheduler_heartbeat_seconds``, Unix time) and whether it is alive. GPU
engines publish neither: their health is Triton's.
"""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request

HEARTBEAT = "pipeline_scheduler_heartbeat_seconds"
ALIVE = "pipeline_scheduler_alive"
STALE_S = 30.0  # as the scheduler's own stall limit: an idle loop beats every second
_SAMPLE = re.compile(r"^(\w+)(?:\{[^}]*\})?\s+(\S+)", re.M)


def engine_heartbeat_problem(metrics_url: str | None, now: float | None = None) -> str | None:
    """What is wrong with the engine's scheduler, or None (also when nothing publishes a beat)."""
    if not metrics_url:
        return None
    try:
        with urllib.request.urlopen(metrics_url, timeout=2) as response:
            text = response.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as error:
        return f"Triton's metrics are not reachable ({error})"
    return heartbeat_problem(text, time.time() if now is None else now)


def heartbeat_problem(metrics: str, now: float) -> str | None:
    """The problem a Prometheus text exposition tells about the schedulers in it, or None."""
    beats = [float(value) for name, value in _SAMPLE.findall(metrics) if name == HEARTBEAT]
    alive = [float(value) for name, value in _SAMPLE.findall(metrics) if name == ALIVE]
    if any(value == 0 for value in alive):
        return "the engine's scheduler stopped"
    if beats and now - min(beats) > STALE_S:
        return f"the engine's scheduler has not beaten for {now - min(beats):.0f} s (stalled)"
    return None
