"""Wall time and peak resident memory of a block of work: the quantize phases' cost report, and
the serving processes' memory during a benchmark."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any


def _rss(process: Any, children: bool) -> int:
    import psutil

    if not children:
        return int(process.memory_info().rss)
    total = 0
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # a child that ended between the listing and the read
            total += child.memory_info().rss
    return total


@contextlib.contextmanager
def measured(into: dict[str, Any], name: str, interval_s: float = 0.05, children: bool = False) -> Iterator[None]:
    """Record ``{name: {"seconds", "peak_rss_mb"}}`` in ``into``. RSS is sampled in a thread,
    because the process-wide peak (ru_maxrss) cannot tell one phase from another.
    ``children``: the processes this one started (a server and its stubs), summed, instead of
    this one."""
    import psutil

    process = psutil.Process()
    peak = _rss(process, children)
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(interval_s):
            peak = max(peak, _rss(process, children))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    try:
        yield
    finally:
        stop.set()
        sampler.join()
        peak = max(peak, _rss(process, children))
        into[name] = {"seconds": round(time.perf_counter() - started, 3), "peak_rss_mb": round(peak / 2**20, 1)}
