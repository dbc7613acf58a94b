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
import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.artifacts import (
    CLIENT_JSON,
    ENGINE_MODEL,
    PLOT,
    REPO_CHECKPOINT_DIR,
    REPO_MODEL_YAML,
    REPOSITORY,
    SERVER_LOG,
)
from pipeline.config.schema import Backend, BenchTool, Endpoint, PipelineConfig, served_model_name, to_dict
from pipeline.deploy import llmapi, server
from pipeline.errors import StageError
from pipeline.redact import url_without_credentials
from pipeline.stages.benchmark import aiperf, loadgen, report, workload
from pipeline.workspace import StageWorkspace, installed_version

NAME = "benchmark"
VERSION = 1
TOOLS = ("tritonclient",)
ALWAYS_RUN = True
KEEP_ON_ERROR = True

log = logging.getLogger(__name__)


def depends_on(cfg: PipelineConfig) -> dict[str, Any]:
    return {k: v for k, v in to_dict(cfg.benchmark).items() if k != "name"}


def preflight(cfg: PipelineConfig) -> list[str]:
    """What the benchmark needs from this machine, checked before the build starts."""
    if not cfg.benchmark.enabled:
        return []
    triton_frontend = cfg.serve.frontend == "triton"  # trtllm-serve is measured through its OpenAI API
    if cfg.backend is Backend.pytorch and cfg.benchmark.endpoint is Endpoint.openai and triton_frontend:
        return [
            "benchmark.endpoint=openai: the OpenAI gateway does not serve the LLM-API repository of backend=pytorch: "
            "use benchmark.endpoint=triton (or bench url=<trtllm-serve's /v1> benchmark.endpoint=openai)"
        ]
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


def sweep(cfg: PipelineConfig, client: Client, tokenizer: Any, out: Path) -> list[dict[str, Any]]:
    """Every load point of ``cfg.benchmark`` against a ready server; tables and plot into ``out``.
    With ``benchmark.tool=aiperf``, AIPerf measures each point after the pipeline does."""
    from tqdm import tqdm

    bench, endpoint = cfg.benchmark, client.endpoint
    sampling = loadgen.Sampling(bench.temperature, bench.top_k, bench.top_p, bench.ignore_eos)
    slo = to_dict(bench.slo)
    if bench.warmup_requests:
        log.info("warming up with %d requests", bench.warmup_requests)
        warm = workload.prompts(tokenizer, bench.warmup_requests, bench, bench.seed + 1_000_000)
        loadgen.run_point(endpoint, warm, sampling, concurrency=bench.warmup_requests, timeout_s=bench.timeout_s)
    points: list[dict[str, Any]] = []
    for index, label in enumerate(_points(cfg)):
        ramp_up = bench.ramp_up and label["concurrency"] is not None
        count = bench.requests_per_point + (label["concurrency"] if ramp_up else 0)
        prompts = workload.prompts(tokenizer, count, bench, bench.seed + index)
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
        point = report.summarize(label, results, seconds, slo)
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
            fresh = workload.prompts(tokenizer, count, bench, bench.seed + 500_000 + index)
            point.update(aiperf.measure(endpoint, client.http_url, bench, point, client.tokenizer_dir, fresh, out))
            log.info("%s: %s", label["load"], aiperf.summary(point))
            report.write_tables(points, out)
    report.plot(points, out / PLOT, f"{cfg.model.name} {cfg.quant.format} tp={cfg.parallel.tp}")
    return points


@dataclass(frozen=True)
class Client:
    """What the load generator talks to, and what AIPerf needs besides."""

    endpoint: loadgen.Endpoint
    tokenizer_dir: Path
    http_url: str | None = None  # Triton's HTTP address: AIPerf reaches Triton over HTTP


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


def served_model(url: str, key: str | None) -> str:
    """The first model an OpenAI-compatible server lists at ``url``/models."""
    import requests

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    where = f"{url_without_credentials(url).rstrip('/')}/models"
    try:
        response = requests.get(url.rstrip("/") + "/models", headers=headers, timeout=10)
        response.raise_for_status()
        return str(response.json()["data"][0]["id"])
    except (requests.RequestException, ValueError, KeyError, IndexError) as error:
        raise StageError(
            f"cannot list the models at {where}: {str(error).splitlines()[0][:200]} "
            "(give benchmark.model=<served name>, and check url= points at .../v1)"
        ) from error


def measure(
    cfg: PipelineConfig,
    out: Path,
    workdir: Path,
    tokenizer_dir: Path,
    target: server.Target | None = None,
    url: str | None = None,
) -> dict[str, Any]:
    """Sweep a server: the one at ``url`` (Triton's gRPC address, or an OpenAI base URL with
    ``benchmark.endpoint=openai``), or ``target``'s repository served here for the sweep (with the
    OpenAI gateway in front when the endpoint is openai) and stopped after it."""
    bench = cfg.benchmark
    openai = bench.endpoint is Endpoint.openai
    if url:
        tokenizer = _tokenizer(tokenizer_dir)
        if openai:
            model = bench.model or served_model(url, api_key(cfg))
            endpoint = loadgen.Endpoint("openai", url, model, api_key(cfg))
        else:
            llmapi = bench.endpoint is Endpoint.llmapi or (target is not None and target.llmapi)
            default = target.entry_model if target else (ENGINE_MODEL if llmapi else "ensemble")
            endpoint = loadgen.Endpoint("llmapi" if llmapi else "triton", url, bench.model or default)
        points = sweep(cfg, Client(endpoint, tokenizer_dir), tokenizer, out)
    elif target is not None and target.llmapi and target.on_gpu and cfg.serve.frontend == "trtllm-serve":
        tokenizer = _tokenizer(tokenizer_dir)
        with _trtllm_serve(cfg, target, out) as base_url:
            endpoint = loadgen.Endpoint("openai", base_url, bench.model or served_model(base_url, None))
            points = sweep(cfg, Client(endpoint, tokenizer_dir), tokenizer, out)
    else:
        assert target is not None, "without url= the benchmark serves a built repository"
        triton = server.with_free_ports(cfg.triton)
        launch = server.launch_for(triton, target.repo, target.on_gpu, target.world_size, workdir, llmapi=target.llmapi)
        # the tokenizer (seconds of imports and loading) loads while Triton starts
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            loading = pool.submit(_tokenizer, tokenizer_dir)
            with server.Server(launch, triton, out / SERVER_LOG) as running:
                tokenizer = loading.result()
                if openai:
                    with _gateway(cfg, target, running.grpc_url, running.metrics_url) as endpoint:
                        points = sweep(cfg, Client(endpoint, tokenizer_dir, running.url), tokenizer, out)
                else:
                    kind = "llmapi" if target.llmapi else "triton"
                    endpoint = loadgen.Endpoint(kind, running.grpc_url, bench.model or target.entry_model)
                    points = sweep(cfg, Client(endpoint, tokenizer_dir, running.url), tokenizer, out)
    info = _client_info(endpoint, bench.tool)
    (out / CLIENT_JSON).write_text(json.dumps(info, indent=2) + "\n")
    return {
        "points": points,
        **info,
        "model": endpoint.model,
        "endpoint": endpoint.kind,
        "url": url_without_credentials(endpoint.url),
    }


def _tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@contextlib.contextmanager
def _gateway(cfg: PipelineConfig, target: server.Target, grpc_url: str, metrics_url: str) -> Iterator[loadgen.Endpoint]:
    """The OpenAI gateway in front of a server started for the benchmark."""
    from pipeline.deploy.openai import serve as gateway

    settings = gateway.settings_for(cfg.openai, target.repo, served_model_name(cfg), grpc_url, metrics_url)
    openai = cfg.openai
    host = openai.host or cfg.triton.host
    if server.port_busy(host, openai.port):
        openai = dataclasses.replace(openai, port=server.free_port(host))
        log.warning("port %d is in use: this benchmark's OpenAI gateway takes %d instead", cfg.openai.port, openai.port)
    running = gateway.start(openai, cfg.triton.host, settings)
    try:
        yield loadgen.Endpoint("openai", running.url, settings.served_model, api_key(cfg))
    finally:
        running.stop()


@contextlib.contextmanager
def _trtllm_serve(cfg: PipelineConfig, target: server.Target, out: Path) -> Iterator[str]:
    """serve.frontend=trtllm-serve: trtllm-serve on the repository's checkpoint with the arguments
    of its model.yaml, for the sweep; yields its OpenAI base URL."""
    settings = yaml.safe_load((target.repo / REPO_MODEL_YAML).read_text())
    options = {k: v for k, v in settings.items() if k not in ("model", "triton_config")}
    options_file = out / llmapi.OPTIONS_FILE
    options_file.write_text(llmapi.options_yaml(options))
    host = cfg.triton.host
    port = cfg.serve.trtllm_serve_port
    if server.port_busy(host, port):
        port = server.free_port(host)
    argv = llmapi.trtllm_serve_argv(cfg, target.repo / REPO_CHECKPOINT_DIR, options_file, host, port)
    with server.TrtllmServe(argv, host, port, out / SERVER_LOG, cfg.triton.ready_timeout_s) as running:
        yield f"{running.url}/v1"


def run(cfg: PipelineConfig, ws: StageWorkspace) -> dict[str, Any]:
    if not cfg.benchmark.enabled:
        return {"skipped": "benchmark=none"}
    target = server.target_of_repository(ws.input("triton_repo") / REPOSITORY, ws.out)
    return measure(cfg, ws.out, ws.workdir, target.tokenizer_dir, target)
