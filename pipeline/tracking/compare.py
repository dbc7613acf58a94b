"""``python -m pipeline compare``: the runs of the MLflow store side by side.

One row per build or ``bench`` run (sweep parents are left out): model, quant, KV cache, tp/pp,
target, the endpoint measured (and for a bench the server's address), output
tokens/s at each concurrency, single-user latency (TTFT p50/p99 and ITL p50 at the lowest
concurrency), cost per million output tokens at the highest concurrency (GPU targets with a
price), the perplexity change of the quantization, and the accuracy gate's verdict with the
largest accuracy loss against the unquantized reference over the evaluated tasks. ``sort=<column>`` (``-column`` for
descending) and ``filter=<MLflow filter>``, e.g. ``filter="params.quant = 'fp8'"``.
"""

from __future__ import annotations

import re
from typing import Any

from pipeline.config.schema import PipelineConfig
from pipeline.errors import ConfigError
from pipeline.redact import redact
from pipeline.tables import aligned
from pipeline.tracking.metrics import point_metric
from pipeline.tracking.runs import probe_store, tracking_uri

FIXED = ["run", "status", "model", "quant", "kv", "tp/pp", "target", "backend", "endpoint"]


def _runs(cfg: PipelineConfig, where: str | None) -> list[Any]:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    probe_store(cfg)
    client = MlflowClient(tracking_uri(cfg))
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    try:
        runs = client.search_runs(experiments, filter_string=where or "", max_results=1000)
    except MlflowException as error:
        raise ConfigError(f"filter={where!r} is not an MLflow filter: {error.message.splitlines()[0]}") from error
    return [r for r in runs if r.data.tags.get("pipeline.sweep") != "true"]


def _concurrencies(runs: list[Any]) -> list[int]:
    found = set()
    for run in runs:
        for key in run.data.metrics:
            match = re.fullmatch(r"load/c(\d+)/output_tokens_per_s", key)
            if match:
                found.add(int(match.group(1)))
    return sorted(found)


def rows(cfg: PipelineConfig, where: str | None = None) -> tuple[list[str], list[dict[str, Any]]]:
    runs = _runs(cfg, where)
    levels = _concurrencies(runs)
    low, high = (f"c{levels[0]}", f"c{levels[-1]}") if levels else ("c1", "c1")
    columns = FIXED + [f"tok/s@c{c}" for c in levels]
    columns += [f"TTFT p50@{low}", f"TTFT p99@{low}", f"ITL p50@{low}", f"$/Mtok@{high}", "ppl change %"]
    columns += ["gate", "acc delta"]
    table = []
    for run in runs:
        p, m = run.data.params, run.data.metrics
        row: dict[str, Any] = {
            "run": run.info.run_name or run.info.run_id[:8],
            "status": run.info.status,
            "model": p.get("model"),
            "quant": p.get("quant"),
            "kv": p.get("kv_cache_dtype"),
            "tp/pp": f"{p['tp']}/{p['pp']}" if "tp" in p else None,
            "target": p.get("target"),
            # build runs from before the choice built engines; a bench of another server has none
            "backend": p.get("backend", "tensorrt" if "tp" in p else None),
            # a bench run names what it measured: the endpoint and the server's address
            "endpoint": f"{p['endpoint']} {p['url']}" if "url" in p else p.get("endpoint"),
        }
        for c in levels:
            row[f"tok/s@c{c}"] = m.get(point_metric(f"c={c}", "output_tokens_per_s"))
        row[f"TTFT p50@{low}"] = m.get(f"load/{low}/ttft_ms_p50")
        row[f"TTFT p99@{low}"] = m.get(f"load/{low}/ttft_ms_p99")
        row[f"ITL p50@{low}"] = m.get(f"load/{low}/itl_ms_p50")
        row[f"$/Mtok@{high}"] = m.get(f"load/{high}/usd_per_million_output_tokens")
        row["ppl change %"] = m.get("ppl_change_pct")
        row["gate"] = run.data.tags.get("accuracy_gate")
        row["acc delta"] = m.get("accuracy_delta")  # the task that lost the most
        table.append(row)
    return columns, table


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"
    return str(value)


def table(cfg: PipelineConfig, sort: str | None = None, where: str | None = None) -> str:
    columns, data = rows(cfg, where)
    if not data:
        return f"no runs in {redact(tracking_uri(cfg))}" + (f" matching {where!r}" if where else "")
    if sort:
        key, descending = sort.lstrip("-"), sort.startswith("-")
        if key not in columns:
            raise ConfigError(f"sort={sort}: no column {key!r}; choose from {', '.join(columns)}")
        present = [r for r in data if r.get(key) is not None]
        missing = [r for r in data if r.get(key) is None]
        data = sorted(present, key=lambda r: r[key], reverse=descending) + missing
    cells = [columns] + [[_cell(r.get(c)) for c in columns] for r in data]
    return "\n".join(aligned(cells))
