"""Wall time and peak resident memory of a block of work, for the cost report in manifests."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def measured(into: dict[str, Any], name: str, interval_s: float = 0.05) -> Iterator[None]:
    """Record ``{name: {"seconds", "peak_rss_mb"}}`` in ``into``. RSS is sampled in a thread,
    because the process-wide peak (ru_maxrss) cannot tell one phase from another."""
    import psutil

    process = psutil.Process()
    peak = process.memory_info().rss
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(interval_s):
            peak = max(peak, process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    try:
        yield
    finally:
        stop.set()
        sampler.join()
        peak = max(peak, process.memory_info().rss)
        into[name] = {"seconds": round(time.perf_counter() - started, 3), "peak_rss_mb": round(peak / 2**20, 1)}
