"""benchmark: start Triton on the rendered repository (and the OpenAI gateway in front of it with
``benchmark.endpoint=openai``), warm up, sweep the load points, stop it. ``bench`` runs the same
sweep against a running server, any OpenAI-compatible one included.

Reads: the triton_repo stage's ``repository/``; ``benchmark.*``, ``triton.*`` (ports).
Writes: ``benchmark.json`` and ``benchmark.csv`` (one row per load point), ``latency_throughput.png``
and ``server.log``.
Never cached: it measures the machine, so every build runs it again.

The client's own CPU time is measured per point and reported next to the results, so a saturated
client cannot pass for a slow server.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.artifacts import (
    CLIENT_JSON,
    ENGINE_MODEL,
    PLOT,
    REPOSITORY,
    SERVER_LOG,
)
from pipeline.config.schema import BenchTool, Endpoint, PipelineConfig, to_dict
from pipeline.deploy import server, serving
from pipeline.errors import StageError
from pipeline.redact import url_without_credentials
from pipeline.resources import measured
from pipeline.stages.benchmark import aiperf, loadgen, report, workload
from pipeline.workspace import StageWorkspace, installed_version

NAME = "benchmark"
VERSION = 1
TOOLS = ("tritonclient",)
ALWAYS_RUN = True
KEEP_ON_ERROR = True

log = logging.getLogger(__name__)


def depends_on(cfg: PipelineConfig) -> dict[str, Any]:
    bench = {k: v for k, v in to_dict(cfg.benchmark).items() if k != "name"}
    return {**bench, "workload": to_dict(cfg.workload), "slo": to_dict(cfg.slo)}


def preflight(cfg: PipelineConfig) -> list[str]:
    """What the benchmark needs from this machine, checked before the build starts."""
    if not cfg.benchmark.enabled:
        return []
    if cfg.benchmark.tool is not BenchTool.aiperf:
        return []
    try:
        aiperf.executable()
    except StageError as error:
        return [str(error)]
    return []


def url_problems(cfg: PipelineConfig, url: str) -> list[str]:
    """Is ``url`` an address the configured endpoint can take?"""
    http = url.startswith(("http://", "https://"))
    if cfg.benchmark.endpoint is Endpoint.openai and not http:
        return [f"url={url}: benchmark.endpoint=openai takes the server's base URL, e.g. http://127.0.0.1:9000/v1"]
    if cfg.benchmark.endpoint in (Endpoint.triton, Endpoint.llmapi) and http:
        return [
            f"url={url_without_credentials(url)}: the triton endpoint takes Triton's gRPC address host:port "
            "(e.g. 127.0.0.1:8001); for an OpenAI-compatible server add benchmark.endpoint=openai"
        ]
    if cfg.benchmark.tool is BenchTool.aiperf and url_without_credentials(url) != url:
        return [
            "benchmark.tool=aiperf cannot take a user:password in url= without putting it on its command line: "
            "drop it and give the key through openai.api_key_env"
        ]
    if cfg.benchmark.endpoint is Endpoint.triton and cfg.benchmark.tool is BenchTool.aiperf:
        return [
            "benchmark.tool=aiperf against a running Triton: AIPerf needs its HTTP address, which url= does not "
            "give; bench its OpenAI gateway (benchmark.endpoint=openai url=http://host:9000/v1) or drop url="
        ]
    return []


def _points(cfg: PipelineConfig) -> list[dict[str, Any]]:
    bench = cfg.benchmark
    return [{"load": f"c={c}", "concurrency": c, "rate": None} for c in bench.concurrency] + [
        {"load": f"rate={r:g}", "concurrency": None, "rate": r} for r in bench.rates
    ]


def sweep(
    cfg: PipelineConfig, client: Client, tokenizer: Any, out: Path
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every load point of ``cfg.benchmark`` against a ready server; tables and plot into ``out``.
    With ``benchmark.tool=aiperf``, AIPerf measures each point after the pipeline does. Returns
    the points and the prompts sent, described as a dataset."""
    from tqdm import tqdm

    bench, endpoint = cfg.benchmark, client.endpoint
    sampling = loadgen.Sampling(bench.temperature, bench.top_k, bench.top_p, bench.ignore_eos and client.ignore_eos)
    if bench.warmup_requests:
        log.info("warming up with %d requests", bench.warmup_requests)
        warm = workload.prompts(tokenizer, bench.warmup_requests, cfg.workload, bench.seed + 1_000_000)
        loadgen.run_point(endpoint, warm, sampling, concurrency=bench.warmup_requests, timeout_s=bench.timeout_s)
    points: list[dict[str, Any]] = []
    sent: list[str] = []
    for index, label in enumerate(_points(cfg)):
        ramp_up = bench.ramp_up and label["concurrency"] is not None
        count = bench.requests_per_point + (label["concurrency"] if ramp_up else 0)
        prompts = workload.prompts(tokenizer, count, cfg.workload, bench.seed + index)
        sent += [prompt.text for prompt in prompts]
        bar = tqdm(total=len(prompts), desc=f"benchmark {label['load']}", unit="req")

        def done(measured: loadgen.Measured, bar: Any = bar) -> None:
            measured.output_tokens = len(tokenizer.encode(measured.text, add_special_tokens=False))
            bar.update(1)

        cpu_before = time.process_time()
        results, seconds, ended = loadgen.run_point(
            endpoint,
            prompts,
            sampling,
            concurrency=label["concurrency"],
            rate=label["rate"],
            seed=bench.seed + index,
            timeout_s=bench.timeout_s,
            on_done=done,
            ramp_up=ramp_up,
        )
        bar.close()
        point = report.summarize(label, results, seconds, cfg.slo)
        point["ramp_up_requests"] = sum(m.ramp_up for m in results)  # in throughput, not in latencies
        point["client_cpu_s"] = time.process_time() - cpu_before
        point["client_cpu_fraction"] = point["client_cpu_s"] / seconds if seconds else 0.0
        points.append(point)
        log.info(
            "%s: %.1f output tok/s, %.2f req/s, TTFT p50 %.0f ms, ITL p50 %.1f ms, %d errors",
            label["load"],
            point["output_tokens_per_s"],
            point["requests_per_s"],
            point["ttft_ms_p50"],
            point["itl_ms_p50"],
            point["errors"],
        )
        report.write_tables(points, out)  # after every point: a crash keeps what was measured
        if ended:
            raise StageError(f"the server stopped answering during {label['load']} ({ended}); results so far in {out}")
        if bench.tool is BenchTool.aiperf:
            count = aiperf.prompt_count(bench, label)
            fresh = workload.prompts(tokenizer, count, cfg.workload, bench.seed + 500_000 + index)
            point.update(aiperf.measure(endpoint, client.http_url, bench, point, client.tokenizer_dir, fresh, out))
            log.info("%s: %s", label["load"], aiperf.summary(point))
            report.write_tables(points, out)
    report.plot(points, out / PLOT, f"{cfg.model.name} {cfg.quant.format} tp={cfg.parallel.tp}")
    return points, workload.described(cfg.workload, bench.seed, sent)


@dataclass(frozen=True)
class Client:
    """What the load generator talks to, and what AIPerf needs besides."""

    endpoint: loadgen.Endpoint
    tokenizer_dir: Path
    http_url: str | None = None  # Triton's HTTP address: AIPerf reaches Triton over HTTP
    ignore_eos: bool = True  # whether the endpoint can be asked to ignore the end token


def _client_info(endpoint: loadgen.Endpoint, tool: BenchTool) -> dict[str, str]:
    via = {
        "triton": "tritonclient gRPC streaming",
        "llmapi": "tritonclient gRPC streaming, LLM-API model inputs",
        "openai": "requests, OpenAI /v1/completions SSE",
    }[endpoint.kind]
    info = {"client": f"pipeline.loadgen ({via})", "tritonclient": installed_version("tritonclient") or "absent"}
    if tool is BenchTool.aiperf:
        info["cross_check"] = "aiperf"
    return info


def api_key(cfg: PipelineConfig) -> str | None:
    """The OpenAI API key the benchmark sends: the gateway's own variable (openai.api_key_env)."""
    return os.environ.get(cfg.openai.api_key_env) or None


def measure(
    cfg: PipelineConfig,
    out: Path,
    tokenizer_dir: Path,
    target: server.Target | None = None,
    url: str | None = None,
) -> dict[str, Any]:
    """Sweep a server: the one at ``url`` (Triton's gRPC address, or an OpenAI base URL with
    ``benchmark.endpoint=openai``), or ``target``'s repository served here for the sweep, as
    ``serve`` serves it (with the OpenAI gateway in front when the endpoint is openai), and
    stopped after it."""
    bench = cfg.benchmark
    openai = bench.endpoint is Endpoint.openai
    usage: dict[str, Any] = {}  # the served processes' memory, when the sweep serves them here
    if url:
        tokenizer = _tokenizer(tokenizer_dir)
        if openai:
            model = bench.model or serving.served_model(url, api_key(cfg))
            endpoint = loadgen.Endpoint(Endpoint.openai, url, model, api_key(cfg))
        else:
            llmapi = bench.endpoint is Endpoint.llmapi or (target is not None and target.llmapi)
            default = target.entry_model if target else (ENGINE_MODEL if llmapi else "ensemble")
            endpoint = loadgen.Endpoint(Endpoint.llmapi if llmapi else Endpoint.triton, url, bench.model or default)
        points, prompts = sweep(cfg, Client(endpoint, tokenizer_dir), tokenizer, out)
    else:
        assert target is not None, "without url= the benchmark serves a built repository"
        # the tokenizer (seconds of imports and loading) loads while the server starts
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            loading = pool.submit(_tokenizer, tokenizer_dir)
            with serving.serving(cfg, target, out / SERVER_LOG, openai=openai, free_ports=True) as served:
                tokenizer = loading.result()
                endpoint = _served_endpoint(cfg, target, served)
                ignore_eos = bench.ignore_eos and not (target.llmapi and served.frontend == "triton")
                if bench.ignore_eos and not ignore_eos:
                    log.info("the LLM-API model has no input to ignore the end token: requests may end early")
                with measured(usage, "serving", interval_s=0.5, children=True):
                    client = Client(endpoint, tokenizer_dir, served.http_url, ignore_eos)
                    points, prompts = sweep(cfg, client, tokenizer, out)
    info = _client_info(endpoint, bench.tool)
    (out / CLIENT_JSON).write_text(json.dumps(info, indent=2) + "\n")
    return {
        "points": points,
        "datasets": [prompts],
        **info,
        "model": endpoint.model,
        "endpoint": str(endpoint.kind),
        "url": url_without_credentials(endpoint.url),
        **({"server_peak_rss_mb": usage["serving"]["peak_rss_mb"]} if usage else {}),
    }


def _served_endpoint(cfg: PipelineConfig, target: server.Target, served: serving.Endpoints) -> loadgen.Endpoint:
    """Where the load goes on a server started for the sweep: its OpenAI API (the gateway's or
    trtllm-serve's), else Triton's gRPC stream to the entry model."""
    if served.openai_url:
        key = api_key(cfg) if served.frontend == "triton" else None  # the gateway checks the key
        model = cfg.benchmark.model or served.served_model or serving.served_model(served.openai_url, key)
        return loadgen.Endpoint(Endpoint.openai, served.openai_url, model, key)
    assert served.grpc_url is not None
    kind = Endpoint.llmapi if target.llmapi else Endpoint.triton
    return loadgen.Endpoint(kind, served.grpc_url, cfg.benchmark.model or target.entry_model)


def _tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def run(cfg: PipelineConfig, ws: StageWorkspace) -> dict[str, Any]:
    if not cfg.benchmark.enabled:
        return {"skipped": "benchmark=none"}
    target = server.target_of_repository(ws.input("triton_repo") / REPOSITORY, ws.out)
    return measure(cfg, ws.out, target.tokenizer_dir, target)
