"""The names of every metric a build logs: one place, read by the run, the registry, ``compare``
and the run's description.

MLflow's UI groups metric charts by the prefix before the first ``/`` and lists a run's metrics
in the order they were first logged (its compare view plots the first one). So the few numbers
that decide between deployments (``HEADLINE``) carry no prefix and are logged first; the detail
sorts under prefixes after them:

- ``load/c8/ttft_ms_p99``: every statistic of every load point (``c8``: concurrency 8,
  ``rate2_5``: 2.5 requests/s);
- ``sweep/output_tokens_per_s`` and the like: the concurrency sweep as a series, step =
  concurrency, so its charts are curves;
- ``quality/``, ``eval/<task>/``, ``stage/``, ``cost/``: the quantization's quality report, the
  accuracy gate per task, each stage's seconds, the quantize phases' time and memory;
- ``system/``: MLflow's own system metrics (CPU, memory, GPU), sampled during the job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipeline.config.schema import PipelineConfig


@dataclass(frozen=True)
class Headline:
    name: str  # the metric's name
    label: str  # a column heading (what each means: docs/benchmarking.md, "What a run holds")


# in the order the UI shows them; throughput and latency at the benchmark's highest load
HEADLINE = (
    Headline("output_tok_s", "output tok/s"),
    Headline("output_tok_s_per_gpu", "tok/s per GPU"),
    Headline("ttft_p50_ms", "TTFT p50 ms"),
    Headline("ttft_p99_ms", "TTFT p99 ms"),
    Headline("itl_p50_ms", "ITL p50 ms"),
    Headline("itl_p99_ms", "ITL p99 ms"),
    Headline("goodput_req_s", "goodput req/s"),
    Headline("accuracy_delta", "accuracy delta"),
    Headline("ppl_change_pct", "perplexity change %"),
    Headline("usd_per_mtok", "$ per 1M tokens"),
    Headline("server_peak_rss_gb", "server memory GB"),
)
HEADLINE_NAMES = tuple(h.name for h in HEADLINE)
Series = list[tuple[str, float, int]]  # (name, value, step)
SERIES = ("output_tokens_per_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99", "e2e_ms_p50")


def load_key(load: str) -> str:
    """``c=8`` -> ``c8``, ``rate=2.5`` -> ``rate2_5``: the load's part of a metric name."""
    return load.replace("=", "").replace(".", "_")


def point_metric(load: str, statistic: str) -> str:
    return f"load/{load_key(load)}/{statistic}"


def _number(value: Any) -> bool:
    """A real number worth a metric: not a flag, not NaN (a load whose requests all failed)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def highest_load(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The point the headline numbers come from: the highest concurrency (a rate sweep: the
    last, highest rate)."""
    closed = [p for p in points if p.get("concurrency")]
    if closed:
        return max(closed, key=lambda p: p["concurrency"])
    return points[-1] if points else None


def cost_per_million_tokens(cfg: PipelineConfig, tokens_per_s: float | None) -> float | None:
    price, gpus = cfg.target.price_per_gpu_hour, cfg.parallel.world_size
    if not price or not tokens_per_s:
        return None
    return price * gpus / 3600 / tokens_per_s * 1e6


def headline(
    cfg: PipelineConfig,
    points: list[dict[str, Any]],
    quality: dict[str, Any] | None = None,
    gate: dict[str, Any] | None = None,
    server_peak_rss_mb: float | None = None,
) -> dict[str, float]:
    """The decision numbers of one build (or bench): only those that were measured."""
    found: dict[str, Any] = {}
    top = highest_load(points)
    if top is not None:
        found["output_tok_s"] = top.get("output_tokens_per_s")
        if cfg.target.gpu:
            found["output_tok_s_per_gpu"] = (top.get("output_tokens_per_s") or 0.0) / cfg.parallel.world_size
        for source, name in (("ttft_ms_p50", "ttft_p50_ms"), ("ttft_ms_p99", "ttft_p99_ms"),
                             ("itl_ms_p50", "itl_p50_ms"), ("itl_ms_p99", "itl_p99_ms")):  # fmt: skip
            found[name] = top.get(source)
        if cfg.slo.limits():
            found["goodput_req_s"] = top.get("goodput_requests_per_s")
        found["usd_per_mtok"] = cost_per_million_tokens(cfg, top.get("output_tokens_per_s"))
    tasks = (gate or {}).get("tasks", [])
    if tasks:
        found["accuracy_delta"] = min(float(task["delta"]) for task in tasks)  # the task that lost the most
    found["ppl_change_pct"] = (quality or {}).get("perplexity_change_pct")
    if server_peak_rss_mb:
        found["server_peak_rss_gb"] = server_peak_rss_mb / 1024
    # four significant digits: what a table shows (the detail under load/ keeps every digit)
    return {name: float(f"{found[name]:.4g}") for name in HEADLINE_NAMES if _number(found.get(name))}


def benchmark_metrics(points: list[dict[str, Any]], cfg: PipelineConfig) -> tuple[dict[str, float], Series]:
    """A sweep's points as ``load/<load>/<statistic>`` and, for closed-loop points, the
    ``sweep/<statistic>`` series (step = concurrency)."""
    flat: dict[str, float] = {}
    series: Series = []
    for point in points:
        for key, value in point.items():
            if _number(value):
                flat[point_metric(point["load"], key)] = float(value)
        cost = cost_per_million_tokens(cfg, point.get("output_tokens_per_s"))
        if cost is not None:
            flat[point_metric(point["load"], "usd_per_million_output_tokens")] = cost
        if point.get("concurrency"):
            for key in SERIES:
                if _number(point.get(key)):
                    series.append((f"sweep/{key}", float(point[key]), int(point["concurrency"])))
    return flat, series


def gate_metrics(gate: dict[str, Any] | None) -> dict[str, float]:
    """``eval/<task>/acc``, ``acc_ref``, ``delta``, ``ci_low``, ``ci_high``, ``agreement`` per task."""
    flat: dict[str, float] = {}
    for task in (gate or {}).get("tasks", []):
        name = task["task"]
        for key, metric in (("accuracy", "acc"), ("reference", "acc_ref"), ("delta", "delta"), ("ci_low", "ci_low"),
                            ("ci_high", "ci_high"), ("agreement", "agreement")):  # fmt: skip
            flat[f"eval/{name}/{metric}"] = float(task[key])
    return flat


def score_metrics(scores: list[Any]) -> dict[str, float]:
    """An ``eval`` command's tasks: ``eval/<task>/acc`` and ``stderr``."""
    flat = {}
    for score in scores:
        flat[f"eval/{score.task}/acc"] = float(score.score)
        flat[f"eval/{score.task}/stderr"] = float(score.stderr)
    return flat


def stage_metrics(name: str, seconds: float | None, results: dict[str, Any]) -> dict[str, float]:
    """A stage's seconds, and what its results report: the quality report (quantize) and the
    phases' time and memory."""
    flat = {f"stage/{name}_seconds": float(seconds or 0.0)}
    for key, value in (results.get("quality") or {}).items():
        if _number(value):
            flat[f"quality/{key}"] = float(value)
    for phase, cost in (results.get("costs") or {}).items():
        for key in ("seconds", "peak_rss_mb"):
            if key in cost:
                flat[f"cost/{phase}_{key}"] = float(cost[key])
    return flat
