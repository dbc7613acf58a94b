"""benchmark: start Triton on the rendered repository, warm up, sweep the load points, stop it.

Reads: the triton_repo stage's ``repository/``; ``benchmark.*``, ``triton.*`` (ports).
Writes: ``benchmark.json`` and ``benchmark.csv`` (one row per load point), ``latency_throughput.png``
and ``server.log``.
Never cached: it measures the machine, so every build runs it again.

The client's own CPU time is measured per point and reported next to the results, so a saturated
client cannot pass for a slow server.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from pipeline.artifacts import CLIENT_JSON, PLOT, REPO_TOKENIZER_DIR, REPOSITORY, SERVER_LOG
from pipeline.config.schema import PipelineConfig, to_dict
from pipeline.deploy import server
from pipeline.errors import StageError
from pipeline.stages.benchmark import loadgen, report, workload
from pipeline.workspace import StageWorkspace, installed_version

NAME = "benchmark"
VERSION = 1
TOOLS = ("tritonclient",)
ALWAYS_RUN = True
KEEP_ON_ERROR = True

log = logging.getLogger(__name__)


def depends_on(cfg: PipelineConfig) -> dict[str, Any]:
    return {k: v for k, v in to_dict(cfg.benchmark).items() if k != "name"}


def _points(cfg: PipelineConfig) -> list[dict[str, Any]]:
    bench = cfg.benchmark
    return [{"load": f"c={c}", "concurrency": c, "rate": None} for c in bench.concurrency] + [
        {"load": f"rate={r:g}", "concurrency": None, "rate": r} for r in bench.rates
    ]


def sweep(cfg: PipelineConfig, grpc_url: str, model: str, tokenizer: Any, out: Path) -> list[dict[str, Any]]:
    """Every load point of ``cfg.benchmark`` against a ready server; tables and plot into ``out``."""
    from tqdm import tqdm

    bench = cfg.benchmark
    sampling = loadgen.Sampling(bench.temperature, bench.top_k, bench.top_p, bench.ignore_eos)
    slo = to_dict(bench.slo)
    if bench.warmup_requests:
        log.info("warming up with %d requests", bench.warmup_requests)
        warm = workload.prompts(tokenizer, bench.warmup_requests, bench, bench.seed + 1_000_000)
        loadgen.run_point(grpc_url, model, warm, sampling, concurrency=bench.warmup_requests, timeout_s=bench.timeout_s)
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
            grpc_url,
            model,
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
    report.plot(points, out / PLOT, f"{cfg.model.name} {cfg.quant.format} tp={cfg.parallel.tp}")
    return points


def _client_info() -> dict[str, str]:
    return {
        "client": "pipeline.loadgen (tritonclient gRPC streaming)",
        "tritonclient": installed_version("tritonclient") or "absent",
    }


def measure(
    cfg: PipelineConfig, target: server.Target, out: Path, workdir: Path, url: str | None = None
) -> dict[str, Any]:
    """Sweep ``target``'s repository: against ``url`` (a running server's gRPC address) or a
    server started here for the sweep and stopped after it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target.repo / REPO_TOKENIZER_DIR)
    model = cfg.benchmark.model or target.entry_model
    if url:
        points = sweep(cfg, url, model, tokenizer, out)
    else:
        launch = server.launch_for(cfg.triton, target.repo, target.on_gpu, target.world_size, workdir)
        with server.Server(launch, cfg.triton, out / SERVER_LOG) as running:
            points = sweep(cfg, running.grpc_url, model, tokenizer, out)
    (out / CLIENT_JSON).write_text(json.dumps(_client_info(), indent=2) + "\n")
    return {"points": points, **_client_info(), "model": model}


def run(cfg: PipelineConfig, ws: StageWorkspace) -> dict[str, Any]:
    if not cfg.benchmark.enabled:
        return {"skipped": "benchmark=none"}
    target = server.target_of_repository(ws.input("triton_repo") / REPOSITORY, ws.out)
    return measure(cfg, target, ws.out, ws.workdir)
