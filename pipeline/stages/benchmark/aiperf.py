"""NVIDIA AIPerf as a cross-check of the pipeline's load generator (``benchmark.tool=aiperf``).

After the pipeline measures a load point, AIPerf measures the same point against the same endpoint,
load and sampling, on prompts drawn the same way (given to it as a file, so the lengths are exact):
fresh ones, so neither pass finds the other's prompts in the server's prefix cache. Its figures join
the point as ``aiperf_*`` keys, with the differences in percent, and so reach the same MLflow run.

The load has the same shape on both sides. A ramped-up closed-loop point of ours starts its workers
one after another over the first request's output (``loadgen._Ramp``), leaves each worker's first
request out of the latencies, and counts throughput while every worker is busy. AIPerf gets the
same ramp in seconds (``--concurrency-ramp-duration``, ours as measured) and no warm-up phase: its
warm-up drains before the measured phase starts, so that phase would open with a burst of
``concurrency`` simultaneous arrivals that it measures (at c=8 on the CPU target that burst put
AIPerf's TTFT p50 at 1087 ms against our 652 ms). It sends ``concurrency`` more requests; its
latency percentiles are computed from its per-request records without the first ``concurrency``
requests, and its throughput over the same window as ours, as ours are.

AIPerf lives in its own virtual environment (``make aiperf``): its pins (pandas 2.3, prometheus-client
0.23) clash with the pipeline's. It runs niced: on a small CPU host its timing loop takes a whole
core, and the server must keep the others (the CPU target's engine leaves one core free by default).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline import proc
from pipeline.assets import PROJECT
from pipeline.config.schema import BenchmarkConfig
from pipeline.config.schema import Endpoint as EndpointKind
from pipeline.errors import StageError
from pipeline.stages.benchmark.loadgen import Endpoint, Measured, Prompt, Sampling, openai_sampling
from pipeline.stages.benchmark.report import percentile, throughput_window

log = logging.getLogger(__name__)

VENV_BIN = PROJECT / ".venv-aiperf" / "bin" / "aiperf"
EXPORT = "profile_export_aiperf.json"
RECORDS = "profile_export.jsonl"  # one line per request
# ours -> AIPerf's metric and statistic; our ITL is AIPerf's inter_token_latency (vLLM's TPOT)
COMPARED = {
    "ttft_ms_p50": ("time_to_first_token", "p50"),
    "itl_ms_p50": ("inter_token_latency", "p50"),
    "e2e_ms_p50": ("request_latency", "p50"),
    "output_tokens_per_s": ("output_token_throughput", "avg"),
    "requests_per_s": ("request_throughput", "avg"),
}


def executable() -> str:
    """AIPerf's command: the project's own environment first, then PATH."""
    if VENV_BIN.is_file():
        return str(VENV_BIN)
    found = shutil.which("aiperf")
    if found:
        return found
    raise StageError(
        "benchmark.tool=aiperf needs AIPerf: run `make aiperf` (it gets a virtual environment of its own, "
        ".venv-aiperf), or put `aiperf` on PATH"
    )


def _triton_template(sampling: Sampling) -> str:
    """The body of Triton's generate_stream for one prompt, as a Jinja template AIPerf fills in."""
    fixed = {"stream": True, "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p}
    if sampling.ignore_eos:
        fixed["end_id"] = -1
    rest = json.dumps(fixed)[1:-1]
    return '{"text_input": {{ text|tojson }}, "max_tokens": {{ max_tokens }}, ' + rest + "}"


def _endpoint_args(endpoint: Endpoint, http_url: str | None, sampling: Sampling) -> list[str]:
    if endpoint.kind is EndpointKind.openai:
        parts = urlsplit(endpoint.url)
        extra = openai_sampling(sampling)
        args = ["--endpoint-type", "completions", "--url", f"{parts.scheme}://{parts.netloc}"]
        args += ["--custom-endpoint", parts.path.rstrip("/") + "/completions", "--use-legacy-max-tokens"]
        args += ["--extra-inputs", json.dumps(extra)]
        if endpoint.api_key:
            args += ["--api-key", endpoint.api_key]  # masked in our logs (pipeline.redact)
        return args
    if http_url is None:
        raise StageError("AIPerf reaches Triton over HTTP: its HTTP address is unknown here")
    extra = {"payload_template": _triton_template(sampling), "response_field": "text_output"}
    return [
        "--endpoint-type",
        "template",
        "--url",
        http_url,
        "--custom-endpoint",
        f"/v2/models/{endpoint.model}/generate_stream",
        "--extra-inputs",
        json.dumps(extra),
    ]


def write_prompts(prompts: list[Prompt], path: Path) -> None:
    """Prompts as AIPerf's ``single_turn`` dataset: text and output length per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps({"text": p.text, "output_length": p.max_tokens}) for p in prompts)
    path.write_text("\n".join(lines) + "\n")


def argv(
    endpoint: Endpoint,
    http_url: str | None,
    bench: BenchmarkConfig,
    point: dict[str, Any],
    tokenizer_dir: Path,
    prompts_file: Path,
    out: Path,
) -> list[str]:
    """AIPerf's command line for one load point of the pipeline's sweep: the warm-up requests
    first, then ``requests_per_point`` measured ones, in the file's order."""
    sampling = Sampling(bench.temperature, bench.top_k, bench.top_p, bench.ignore_eos)
    args = [executable(), "profile", "--model", endpoint.model, "--streaming"]
    args += _endpoint_args(endpoint, http_url, sampling)
    if point["concurrency"] is not None:
        load = ["--concurrency", str(point["concurrency"])]
    else:
        load = ["--request-rate", str(point["rate"]), "--arrival-pattern", "poisson"]
    args += [*load, "--request-count", str(bench.requests_per_point + ramp_up_count(bench, point))]
    if warmup_count(bench, point):
        args += ["--warmup-request-count", str(warmup_count(bench, point))]
    if ramp_up_count(bench, point) and point.get("ramp_up_s"):
        args += ["--concurrency-ramp-duration", f"{point['ramp_up_s']:.1f}"]
    args += ["--input-file", str(prompts_file), "--custom-dataset-type", "single_turn"]
    args += ["--dataset-sampling-strategy", "sequential"]
    args += ["--tokenizer", str(tokenizer_dir.resolve()), "--random-seed", str(bench.seed)]
    args += ["--request-timeout-seconds", f"{bench.timeout_s:g}", "--output-artifact-dir", str(out)]
    args += ["--ui-type", "none", "--no-server-metrics", "--no-gpu-telemetry"]
    return args


def figures(folder: Path, ramp_up: int = 0) -> dict[str, float]:
    """AIPerf's results in ``folder`` as ``aiperf_<our metric name>``: errors from its summary;
    latency percentiles and throughput from its summary, or, when ``ramp_up`` > 0, from its
    per-request records the way ours are counted (``report.summarize``): latencies without the
    first ``ramp_up`` requests to start, throughput between the first measured request's start and
    the last request's start."""
    data = _read_json(folder / EXPORT)
    out = {}
    for ours, (metric, stat) in COMPARED.items():
        value = (data.get(metric) or {}).get(stat)
        if isinstance(value, int | float):
            out[f"aiperf_{ours}"] = float(value)
    errors = (data.get("error_summary") or []) if isinstance(data.get("error_summary"), list) else []
    out["aiperf_errors"] = float(sum(int(e.get("count", 0)) for e in errors if isinstance(e, dict)))
    if ramp_up:
        out.update(_after_ramp_up(folder / RECORDS, ramp_up))
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise StageError(f"AIPerf wrote no readable results ({path}): {error}") from error
    return data if isinstance(data, dict) else {}


def _after_ramp_up(records_file: Path, ramp_up: int) -> dict[str, float]:
    """p50 of TTFT, ITL and end-to-end latency over the measured phase's successful requests, the
    first ``ramp_up`` to start (one per worker) left out; output tokens/s between the first
    measured request's start and the last request's start."""
    try:
        records = [json.loads(line) for line in records_file.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as error:
        raise StageError(f"AIPerf wrote no readable per-request records ({records_file}): {error}") from error
    measured = [r for r in records if r.get("metadata", {}).get("benchmark_phase") == "profiling"]
    measured.sort(key=lambda r: r["metadata"].get("request_start_ns", 0))
    kept = [r for r in measured[ramp_up:] if not r.get("error")]
    out = {}
    for ours, (metric, _) in COMPARED.items():
        if not ours.endswith("_p50"):
            continue
        values = [_value(r, metric) for r in kept if metric in r.get("metrics", {})]
        if values:
            out[f"aiperf_{ours}"] = float(percentile(values, 50))
    throughput = _window_throughput(measured, ramp_up)
    if throughput is not None:
        out["aiperf_output_tokens_per_s"] = throughput
    return out


def _value(record: dict[str, Any], metric: str) -> float:
    return float(record["metrics"][metric]["value"])


def _window_throughput(records: list[dict[str, Any]], ramp_up: int) -> float | None:
    """Output tokens/s over the window ours is counted over (``report.throughput_window``), from
    AIPerf's records in start order; a record's tokens taken as evenly spaced from its first to its
    end (the records keep no token times). None when a record lacks a field."""
    try:
        requests = [_as_measured(record, index < ramp_up) for index, record in enumerate(records)]
    except (KeyError, TypeError, ValueError):
        return None
    tokens, _, window = throughput_window(requests, 0.0)
    return tokens / window if window > 0 else None


def _as_measured(record: dict[str, Any], ramp_up: bool) -> Measured:
    sent, done = record["metadata"]["request_start_ns"] / 1e9, record["metadata"]["request_end_ns"] / 1e9
    measured = Measured(0, sent, done=done, ramp_up=ramp_up)
    if record.get("error"):
        measured.error = "error"
        return measured
    count = int(_value(record, "output_token_count"))
    first = sent + _value(record, "time_to_first_token") / 1000
    gap = (done - first) / (count - 1) if count > 1 else 0.0
    measured.output_tokens, measured.token_times = count, [first + k * gap for k in range(count)]
    return measured


def differences(point: dict[str, Any]) -> dict[str, float]:
    """(ours - AIPerf's) / AIPerf's, in percent, for every compared figure both have."""
    out = {}
    for ours in COMPARED:
        theirs = point.get(f"aiperf_{ours}")
        value = point.get(ours)
        if isinstance(theirs, float) and theirs and isinstance(value, int | float) and value == value:
            out[f"aiperf_diff_pct_{ours}"] = (value - theirs) / theirs * 100
    return out


def ramp_up_count(bench: BenchmarkConfig, point: dict[str, Any]) -> int:
    """How many of the point's first requests are ramp-up (ours: one per worker of a closed loop)."""
    return point["concurrency"] if bench.ramp_up and point["concurrency"] is not None else 0


def warmup_count(bench: BenchmarkConfig, point: dict[str, Any]) -> int:
    """AIPerf's warm-up phase: only where no ramp-up plays its part."""
    return 0 if ramp_up_count(bench, point) else bench.warmup_requests


def prompt_count(bench: BenchmarkConfig, point: dict[str, Any]) -> int:
    """How many prompts AIPerf sends at ``point``, warm-up and ramp-up included."""
    return warmup_count(bench, point) + ramp_up_count(bench, point) + bench.requests_per_point


def measure(
    endpoint: Endpoint,
    http_url: str | None,
    bench: BenchmarkConfig,
    point: dict[str, Any],
    tokenizer_dir: Path,
    prompts: list[Prompt],
    out: Path,
) -> dict[str, float]:
    """Run AIPerf on one load point with ``prompts`` (ramp-up ones first); its figures and the
    differences from ours."""
    folder = out / "aiperf" / point["load"].replace("=", "")
    shutil.rmtree(folder, ignore_errors=True)
    write_prompts(prompts, folder / "prompts.jsonl")
    command = argv(endpoint, http_url, bench, point, tokenizer_dir, folder / "prompts.jsonl", folder)
    log.info("AIPerf cross-check at %s (niced: the server keeps the cores)", point["load"])
    limit = bench.timeout_s * (bench.requests_per_point + 8) + 120
    nice = ["nice", "-n", "10"] if shutil.which("nice") else []
    # no colours in the log. (HF_HUB_OFFLINE must stay unset: AIPerf 0.13 then takes the local
    # tokenizer folder for a Hub repository id and fails.)
    proc.run(nice + command, folder / "aiperf.log", timeout_s=limit, env={"NO_COLOR": "1"})
    found = figures(folder, ramp_up_count(bench, point))
    return {**found, **differences({**point, **found})}


def summary(point: dict[str, Any]) -> str:
    """One log line: AIPerf's figures next to ours."""
    parts = []
    for ours, label in (("ttft_ms_p50", "TTFT p50"), ("itl_ms_p50", "ITL p50"), ("output_tokens_per_s", "tok/s")):
        theirs, diff = point.get(f"aiperf_{ours}"), point.get(f"aiperf_diff_pct_{ours}")
        if theirs is not None and diff is not None:
            parts.append(f"{label} {point[ours]:.1f} vs AIPerf {theirs:.1f} ({diff:+.1f}%)")
    return "; ".join(parts) or "AIPerf reported no comparable figures"
