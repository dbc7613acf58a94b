"""Benchmark statistics per load point, and the tables and plot written from them.

Definitions (genai-perf / AIPerf): TTFT, ITL and end-to-end latency per request, reported as mean
and p50/p90/p95/p99 over the successful measured requests of a point (a ramped-up point's first
request per worker is not measured); output token throughput = output tokens of all successful
requests / wall time of the point; request throughput = successful requests / wall time; goodput
= requests whose own latencies are within every ``slo.*`` limit / wall time; a point meets the
SLO when its p99 latencies are within the limits and no request failed.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.artifacts import BENCHMARK_CSV, BENCHMARK_JSON
from pipeline.config.schema import SLOConfig
from pipeline.stages.benchmark.loadgen import Measured

PERCENTILES = (50, 90, 95, 99)
LATENCIES = ("ttft_ms", "itl_ms", "e2e_ms")


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _stats(values: list[float]) -> dict[str, float]:
    out = {"mean": sum(values) / len(values) if values else math.nan}
    out.update({f"p{q}": percentile(values, q) for q in PERCENTILES})
    return out


def meets_slo(m: Measured, slo: dict[str, float]) -> bool:
    """Whether one request's own latencies are within the SLO's limits (``{"ttft_ms_p99": 1000}``
    limits its TTFT to 1000 ms): what goodput counts."""
    values = {"ttft_ms": m.ttft, "itl_ms": m.itl, "e2e_ms": m.e2e}
    for key, limit in slo.items():
        value = values[key.rsplit("_", 1)[0]]
        if value is not None and value * 1000 > limit:
            return False
    return True


def slo_misses(point: dict[str, Any], slo: SLOConfig) -> dict[str, float]:
    """{statistic: how far over its limit, in ms} for every limit a load point breaks (a point
    with failed requests breaks them all: its latencies say nothing of the failures)."""
    if point.get("errors"):
        return {key: math.inf for key in slo.limits()}
    return slo.misses(point)


def summarize(label: dict[str, Any], results: list[Measured], seconds: float, slo: SLOConfig) -> dict[str, Any]:
    # counts and latencies over the measured requests (ramp-up ones excluded: loadgen.run_point)
    measured = [m for m in results if not m.ramp_up]
    ok = [m for m in measured if m.error is None and m.done is not None]
    errors = Counter(m.error for m in measured if m.error is not None)
    out_tokens, served, window = throughput_window(results, seconds)
    point: dict[str, Any] = {
        **label,
        "requests": len(measured),
        "successful": len(ok),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "seconds": seconds,
        "throughput_window_s": window,
        "ramp_up_s": _ramp_up_seconds(results),
        "input_tokens_mean": sum(m.input_tokens for m in ok) / len(ok) if ok else math.nan,
        "output_tokens_mean": sum(m.output_tokens for m in ok) / len(ok) if ok else math.nan,
        "output_tokens_per_s": out_tokens / window if window > 0 else math.nan,
        "requests_per_s": len(served) / window if window > 0 else math.nan,
        "goodput_requests_per_s": sum(meets_slo(m, slo.limits()) for m in served) / window if window > 0 else math.nan,
    }
    series = {
        "ttft_ms": [m.ttft * 1000 for m in ok if m.ttft is not None],
        "itl_ms": [m.itl * 1000 for m in ok if m.itl is not None],
        "e2e_ms": [m.e2e * 1000 for m in ok if m.e2e is not None],
    }
    for name, values in series.items():
        for stat, value in _stats(values).items():
            point[f"{name}_{stat}"] = value
    if slo.limits():
        point["meets_slo"] = not slo_misses(point, slo)
    return point


def throughput_window(results: list[Measured], seconds: float) -> tuple[float, list[Measured], float]:
    """Output tokens, finished requests and seconds that throughput is counted over. With a
    ramp-up, the steady part of the point, while every worker has a request in flight: from the
    first measured request's send to the last request's send, with the tokens streamed in it (each
    request's share by its responses) and the requests that finished in it. Without (an open loop,
    or a point too short to have a steady part): every request over the whole point."""
    done = [m for m in results if m.error is None and m.done is not None]
    measured_sends = [m.sent for m in results if not m.ramp_up]
    ramped = 0 < len(measured_sends) < len(results)
    if not ramped or max(measured_sends) <= min(measured_sends):
        return float(sum(m.output_tokens for m in done)), done, seconds
    start, end = min(measured_sends), max(measured_sends)
    tokens = sum(m.output_tokens * _share_within(m, start, end) for m in done)
    return tokens, [m for m in done if m.done is not None and start <= m.done <= end], end - start


def _ramp_up_seconds(results: list[Measured]) -> float:
    """From the first worker's first request to the last worker's (0 without a ramp-up)."""
    sends = [m.sent for m in results if m.ramp_up]
    return max(sends) - min(sends) if sends else 0.0


def _share_within(m: Measured, start: float, end: float) -> float:
    """The part of a request's output streamed between ``start`` and ``end``."""
    if not m.token_times:
        return 1.0 if m.done is not None and start <= m.done <= end else 0.0
    return sum(start <= t <= end for t in m.token_times) / len(m.token_times)


def write_tables(points: list[dict[str, Any]], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / BENCHMARK_JSON).write_text(json.dumps(points, indent=2, default=str) + "\n")
    columns = [k for k in points[0] if k != "error_kinds"] if points else []
    with (folder / BENCHMARK_CSV).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(points)


def plot(points: list[dict[str, Any]], path: Path, title: str) -> None:
    """Latency against throughput across the sweep: where the knee is."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = [p["output_tokens_per_s"] for p in points]
    for axis, metric, name in ((axes[0], "ttft_ms", "TTFT"), (axes[1], "itl_ms", "inter-token latency")):
        for stat, style in (("p50", "o-"), ("p99", "s--")):
            axis.plot(x, [p[f"{metric}_{stat}"] for p in points], style, label=f"{name} {stat}")
        for p in points:
            axis.annotate(p["load"], (p["output_tokens_per_s"], p[f"{metric}_p50"]), fontsize=8)
        axis.set_xlabel("output tokens/s")
        axis.set_ylabel(f"{name} (ms)")
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
