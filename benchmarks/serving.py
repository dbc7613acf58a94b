"""Serving benchmark of the CPU target: the embedded model's repository served by a real Triton,
measured with the pipeline's own load generator (gRPC streaming through the ensemble), every
number of one table taken in one run on this machine so that ratios compare like with like.

Rows (64 output tokens, prompts of mixed lengths: 64 +- 32 tokens before the chat template;
closed-loop points ramp up first: the workers start one after another, and each worker's first
request is left out of the latencies and the throughput):
- in-flight batching (the default engine model) at concurrency 1, 8 and 16;
- run-to-completion batching (``triton.cpu_batching=run_to_completion``) at concurrency 8;
- raw transformers ``generate`` on the same checkpoint, the first 8 prompts as one left-padded
  batch, run in this process while no server runs, with as many torch threads as the served
  engine model has (every core but one) and, for reference, with every core;
- prefix reuse: 8 requests one after another sharing a 256-token system prompt; TTFT of the first
  against the median of the others;
- chunked context: 4 streams running while a 1500-token prompt is admitted; their gaps between
  tokens during its admission against their median gap;
- memory: resident memory of the engine model's process under a closed loop at concurrency 16
  for ``soak_s`` seconds (default 300), against its resident memory before the load plus the KV
  cache budget the model logged.

Each check of issue 12's performance list is printed with its ratio and whether it holds.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from pipeline import app, runner, validate
from pipeline.config.schema import Endpoint, PipelineConfig, SLOConfig, WorkloadConfig
from pipeline.deploy import server
from pipeline.stages import STAGES
from pipeline.stages.benchmark import loadgen, report, workload

OUTPUT_TOKENS = 64
WORKLOAD = WorkloadConfig(input_tokens=64, input_tokens_stddev=32, output_tokens=OUTPUT_TOKENS)
GREEDY = loadgen.Sampling()
SYSTEM_TOKENS = 256
LONG_PROMPT_TOKENS = 1500
SOAK_CONCURRENCY = 16
SOAK_KV_TOKENS = 8192  # a budget the soak can fill: 16 sequences of ~160 tokens use a third of it


def _repository(workdir: Path, extra: list[str]) -> tuple[PipelineConfig, server.Target]:
    overrides = [f"workdir={workdir}", "target=cpu", "tracking=none", "benchmark=none", "until=triton_repo", *extra]
    cfg = validate.load(overrides)
    runner.build(cfg, STAGES)
    return cfg, app.built_target(cfg)


@contextmanager
def _served(cfg: PipelineConfig, target: server.Target, log: Path) -> Iterator[server.Server]:
    launch = server.launch_for(cfg.triton, target.repo, False, 1, cfg.workdir_path)
    with server.Server(launch, cfg.triton, log) as running:
        yield running


def _engine_process(running: server.Server) -> psutil.Process:
    """The python backend stub that runs the engine model (``tensorrt_llm``)."""
    assert running.process is not None
    root = psutil.Process(running.process.process.pid)
    for child in root.children(recursive=True):
        if any("tensorrt_llm" in part and "bls" not in part for part in child.cmdline()):
            return child
    raise RuntimeError("no process of the tensorrt_llm model found under tritonserver")


class Bench:
    """Load points against one server, measured like the benchmark stage measures them."""

    def __init__(self, running: server.Server, tokenizer: Any):
        self.endpoint, self.tokenizer = loadgen.Endpoint(Endpoint.triton, running.grpc_url, "ensemble"), tokenizer

    def prompts(self, count: int, seed: int) -> list[loadgen.Prompt]:
        return workload.synthetic(self.tokenizer, count, WORKLOAD, seed)

    def run(self, prompts: list[loadgen.Prompt], concurrency: int, **kwargs: Any) -> tuple[dict[str, Any], list]:
        def count(measured: loadgen.Measured) -> None:
            measured.output_tokens = len(self.tokenizer.encode(measured.text, add_special_tokens=False))

        results, seconds, ended = loadgen.run_point(
            self.endpoint, prompts, GREEDY, concurrency=concurrency, on_done=count, **kwargs
        )
        if ended:
            raise RuntimeError(f"the server stopped answering: {ended}")
        point = report.summarize({"load": f"c={concurrency}"}, results, seconds, SLOConfig())
        print(
            f"  c={concurrency}: {point['output_tokens_per_s']:.1f} tok/s, TTFT p50 {point['ttft_ms_p50']:.0f} ms, "
            f"ITL p50 {point['itl_ms_p50']:.0f} ms, {point['errors']} errors",
            flush=True,
        )
        return point, results

    def warm_up(self) -> None:
        self.run(self.prompts(2, 999), 2)


def _row(name: str, point: dict[str, Any]) -> dict[str, Any]:
    return {
        "row": name,
        "output_tok_s": round(point["output_tokens_per_s"], 1),
        "ttft_p50_ms": round(point["ttft_ms_p50"]),
        "itl_p50_ms": round(point["itl_ms_p50"], 1),
        "requests": point["requests"],
        "errors": point["errors"],
    }


def raw_generate(engine: Path, token_ids: list[list[int]]) -> float:
    """transformers ``generate`` on the checkpoint, one left-padded batch, greedy, exactly
    OUTPUT_TOKENS new tokens each: output tokens/s."""
    import torch

    from pipeline.runtime.checkpoint import load_model

    model = load_model(engine)
    width = max(len(ids) for ids in token_ids)
    ids = torch.tensor([[0] * (width - len(t)) + t for t in token_ids])
    mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in token_ids])
    settings = {"do_sample": False, "pad_token_id": 0}
    model.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=2, **settings)  # warm-up
    started = time.perf_counter()
    model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=OUTPUT_TOKENS, min_new_tokens=OUTPUT_TOKENS, **settings
    )
    return len(token_ids) * OUTPUT_TOKENS / (time.perf_counter() - started)


def prefix_reuse(bench: Bench) -> dict[str, Any]:
    system = bench.tokenizer.decode(_tokens(bench, SYSTEM_TOKENS, 7))
    questions = [p.text for p in bench.prompts(8, 8)]
    prompts = [loadgen.Prompt(f"{system}\n\n{q[:200]}", SYSTEM_TOKENS, 8) for q in questions]
    _, results = bench.run(prompts, 1)
    ttfts = [m.ttft * 1000 for m in results if m.ttft is not None]
    first, rest = ttfts[0], report.percentile(ttfts[1:], 50)
    return {"first_ttft_ms": round(first), "later_ttft_p50_ms": round(rest), "later_vs_first": round(rest / first, 2)}


def _tokens(bench: Bench, count: int, seed: int) -> list[int]:
    config = WorkloadConfig(input_tokens=count, output_tokens=8)
    text = workload.synthetic(bench.tokenizer, 1, config, seed)[0].text
    return bench.tokenizer.encode(text, add_special_tokens=False)


def chunked_context(bench: Bench) -> dict[str, Any]:
    """4 streams of 200 tokens; after 4 s a 1500-token prompt arrives. The streams' gaps between
    tokens while it is admitted (sent .. its first token) against their median gap."""
    streams = [loadgen.Prompt(p.text, p.input_tokens, 200) for p in bench.prompts(4, 11)]
    text = bench.tokenizer.decode(_tokens(bench, LONG_PROMPT_TOKENS, 12))
    long_result: list[loadgen.Measured] = []

    def send_long() -> None:
        time.sleep(4)
        _, results = bench.run([loadgen.Prompt(text, LONG_PROMPT_TOKENS, 4)], 1)
        long_result.extend(results)

    sender = threading.Thread(target=send_long)
    sender.start()
    _, results = bench.run(streams, 4)
    sender.join()
    (long,) = long_result
    if long.ttft is None:
        raise RuntimeError(f"the long prompt failed: {long.error}")
    window = (long.sent, long.sent + long.ttft)
    gaps, during = [], []
    for measured in results:
        for before, after in zip(measured.token_times, measured.token_times[1:], strict=False):
            gaps.append(after - before)
            if window[0] <= after <= window[1]:
                during.append(after - before)
    p50, p99 = report.percentile(gaps, 50) * 1000, report.percentile(during, 99) * 1000
    return {
        "long_prompt_ttft_ms": round(long.ttft * 1000),
        "stream_itl_p50_ms": round(p50, 1),
        "stream_itl_p99_during_admission_ms": round(p99, 1),
        "p99_vs_p50": round(p99 / p50, 2),
        "gaps_during_admission": len(during),
    }


def soak(bench: Bench, running: server.Server, seconds: float) -> dict[str, Any]:
    engine = _engine_process(running)
    baseline = engine.memory_info().rss
    budget = _kv_budget_bytes(running.log_file)
    peak = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(1.0):
            peak.append(engine.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    prompts = bench.prompts(int(seconds * 3) + SOAK_CONCURRENCY, 21)  # more than the loop can take
    try:
        point, _ = bench.run(prompts, SOAK_CONCURRENCY, stop_after_s=seconds)
    finally:
        stop.set()
        sampler.join()
    mib = 2**20
    return {
        "seconds": round(point["seconds"]),
        "requests": point["requests"],
        "rss_before_mib": round(baseline / mib),
        "rss_peak_mib": round(max(peak) / mib),
        "kv_budget_mib": round(budget / mib),
        "within_budget": max(peak) <= baseline + budget,
    }


def _kv_budget_bytes(log: Path) -> int:
    found = re.search(r"KV cache of (\d+) tokens \((\d+) MiB\)", log.read_text())
    if not found:
        raise RuntimeError(f"the engine model did not log its KV cache budget in {log}")
    return int(found.group(2)) * 2**20


def bench_serving(workdir: Path, soak_s: float) -> dict[str, Any]:
    from transformers import AutoTokenizer

    out = workdir / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    inflight_cfg, inflight = _repository(workdir, [f"triton.max_tokens_in_paged_kv_cache={SOAK_KV_TOKENS}"])
    static_cfg, static = _repository(workdir, ["triton.cpu_batching=run_to_completion"])
    tokenizer = AutoTokenizer.from_pretrained(inflight.repo / "preprocessing" / "tokenizer")
    prompts8 = workload.synthetic(tokenizer, 32 + 8, WORKLOAD, 1)  # 32 measured after each worker's first
    chat = [
        tokenizer.apply_chat_template([{"role": "user", "content": p.text}], add_generation_prompt=True)
        for p in prompts8[:8]
    ]
    import os

    import torch

    engine_threads = max(1, len(os.sched_getaffinity(0)) - 1)  # what the served engine model uses
    raws = {}
    for threads in sorted({engine_threads, len(os.sched_getaffinity(0))}):
        torch.set_num_threads(threads)
        print(f"raw transformers generate, batch 8, {threads} threads (no server running)", flush=True)
        raws[threads] = raw_generate(inflight.repo / "tensorrt_llm" / "1" / "engine", chat)
        print(f"  {raws[threads]:.1f} tok/s", flush=True)
    raw = raws[engine_threads]
    rows: list[dict[str, Any]] = []
    print("run-to-completion batching", flush=True)
    with _served(static_cfg, static, out / "serving-run_to_completion.log") as running:
        bench = Bench(running, tokenizer)
        bench.warm_up()
        rows.append(_row("run_to_completion c=8", bench.run(prompts8, 8, ramp_up=True)[0]))
    print("in-flight batching", flush=True)
    with _served(inflight_cfg, inflight, out / "serving-inflight.log") as running:
        bench = Bench(running, tokenizer)
        bench.warm_up()
        for concurrency, count in ((1, 8), (8, 32), (16, 48)):
            prompts = prompts8 if concurrency == 8 else bench.prompts(count + concurrency, concurrency)
            rows.append(_row(f"inflight c={concurrency}", bench.run(prompts, concurrency, ramp_up=True)[0]))
        print("prefix reuse", flush=True)
        prefix = prefix_reuse(bench)
        print("chunked context", flush=True)
        chunked = chunked_context(bench)
        print(f"memory under c={SOAK_CONCURRENCY} for {soak_s:.0f} s", flush=True)
        memory = soak(bench, running, soak_s)
    for threads, value in raws.items():
        rows.append({"row": f"transformers generate b=8, {threads} threads", "output_tok_s": round(value, 1)})
    by = {r["row"]: r for r in rows}
    c1, c8, c16 = by["inflight c=1"], by["inflight c=8"], by["inflight c=16"]
    checks = [
        ("TTFT p50 c=8 / c=1 <= 2", c8["ttft_p50_ms"] / c1["ttft_p50_ms"], 2.0, "max"),
        ("tok/s c=8 / c=1 >= 3", c8["output_tok_s"] / c1["output_tok_s"], 3.0, "min"),
        (
            "tok/s c=8 in-flight / run-to-completion >= 1",
            c8["output_tok_s"] / by["run_to_completion c=8"]["output_tok_s"],
            1.0,
            "min",
        ),
        ("tok/s c=16 / c=8 >= 1", c16["output_tok_s"] / c8["output_tok_s"], 1.0, "min"),
        ("tok/s c=8 served / raw generate b=8 (same threads) >= 1.2", c8["output_tok_s"] / raw, 1.2, "min"),
        ("prefix reuse: later TTFT / first <= 0.5", prefix["later_vs_first"], 0.5, "max"),
        ("chunked context: ITL p99 / p50 <= 3", chunked["p99_vs_p50"], 3.0, "max"),
        ("memory: peak RSS <= before + KV budget", 1.0 if memory["within_budget"] else 0.0, 1.0, "min"),
    ]
    verdicts = [
        {"check": name, "value": round(value, 2), "holds": value <= limit if kind == "max" else value >= limit}
        for name, value, limit, kind in checks
    ]
    return {"rows": rows, "prefix_reuse": prefix, "chunked_context": chunked, "memory": memory, "checks": verdicts}


def print_tables(result: dict[str, Any]) -> None:
    from pipeline.tables import aligned

    rows = result["rows"]
    header = list(rows[0])
    print()
    print("\n".join(aligned([header, *[[str(r.get(h, "")) for h in header] for r in rows]])))
    for name in ("prefix_reuse", "chunked_context", "memory"):
        print(f"\n{name}: " + json.dumps(result[name]))
    print()
    checks = [[c["check"], str(c["value"]), "yes" if c["holds"] else "NO"] for c in result["checks"]]
    print("\n".join(aligned([["check", "value", "holds"], *checks])))
