"""The project's own speed benchmarks: ``make bench`` (``python -m benchmarks [quantize|serving]
[workdir=...]``). Results land in ``<workdir>/benchmarks/``; artifact paths come from the plan of
the same overrides, not from globbing the workdir.

quantize: for the embedded model on this machine, each quant format is quantized and exported
(tp=1) in a fresh process with force=true, and the wall time and peak resident memory of each
phase are read back from the stage manifest. All formats run in one invocation so their numbers
can be compared as ratios on the same, noisy machine.

serving: the CPU repository of the embedded model served by a real Triton, at concurrency 1 and 8
(the benchmark stage), against the reference runtime called directly with the same prompt and
output lengths at batch 1 and 8. Reports the batching gain (c8 / c1) and what serving costs at
concurrency 1 (served / direct), plus the load generator's own CPU share.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from pipeline import artifacts, runner, validate
from pipeline.stages import STAGES

FORMATS = ("none", "fp8", "int8_sq", "int4_awq", "w4a8_awq", "nvfp4")
EXTRA = {"int4_awq": ["quant.awq_block_size=64"], "w4a8_awq": ["quant.awq_block_size=64"]}


def _final(stage: str, overrides: list[str]) -> Path:
    """The finished folder of ``stage`` for these overrides (the runner's own lookup)."""
    step = next(s for s in runner.plan(validate.load(overrides), STAGES) if s.name == stage)
    return step.dirs.final


def bench_quantize(workdir: Path) -> list[dict]:
    rows = []
    base = [sys.executable, "-m", "pipeline", "build", f"workdir={workdir}", "target=cpu", "until=quantize"]
    subprocess.run([*base, "tracking=none"], check=True)
    for fmt in FORMATS:
        argv = [
            sys.executable,
            "-m",
            "pipeline",
            "build",
            f"workdir={workdir}",
            "target=cpu",
            "until=quantize",
            "tracking=none",
            f"quant={fmt}",
            "redo=[quantize]",
            *EXTRA.get(fmt, []),
        ]
        started = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        manifest = _final("quantize", argv[4:]) / "manifest.json"
        results = json.loads(manifest.read_text())["results"]
        costs, quality = results["costs"], results["quality"]
        rows.append(
            {
                "format": fmt,
                "process_wall_s": round(wall, 1),
                "stage_s": json.loads(manifest.read_text())["seconds"],
                "calibration_s": costs.get("calibration", {}).get("seconds", 0.0),
                "export_s": costs["export"]["seconds"],
                "peak_rss_mb": max(c["peak_rss_mb"] for c in costs.values()),
                "ppl_change_pct": quality.get("perplexity_change_pct"),
                "kl": quality.get("kl_divergence_mean"),
                "top1": quality.get("top1_agreement"),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _direct_tokens_per_s(engine: Path, batch: int, input_tokens: int, output_tokens: int) -> float:
    """The reference runtime called in-process: the ceiling the served repository is measured against."""
    from pipeline.runtime.checkpoint import load_model
    from pipeline.runtime.generate import Request, generate

    model = load_model(engine)
    prompt = list(range(1000, 1000 + input_tokens + 30))  # + the chat template's tokens in the server
    generate(model, [Request(prompt, 4)])  # warm-up
    started = time.perf_counter()
    generate(model, [Request(prompt, output_tokens) for _ in range(batch)])
    return batch * output_tokens / (time.perf_counter() - started)


def bench_serving(workdir: Path) -> list[dict]:
    overrides = [f"workdir={workdir}", "target=cpu", "tracking=none"]
    overrides += ["benchmark.concurrency=[1,8]", "benchmark.requests_per_point=16"]
    subprocess.run([sys.executable, "-m", "pipeline", "build", *overrides], check=True)
    results = _final("benchmark", overrides) / artifacts.BENCHMARK_JSON
    points = {p["load"]: p for p in json.loads(results.read_text())}
    engine = _final("engine", overrides) / artifacts.ENGINE
    direct = {b: _direct_tokens_per_s(engine, b, 64, 32) for b in (1, 8)}
    rows = [
        {
            "load": load,
            "served_tok_s": round(points[load]["output_tokens_per_s"], 2),
            "direct_tok_s": round(direct[batch], 2),
            "served_vs_direct": round(points[load]["output_tokens_per_s"] / direct[batch], 3),
            "ttft_p50_ms": round(points[load]["ttft_ms_p50"]),
            "itl_p50_ms": round(points[load]["itl_ms_p50"], 1),
            "client_cpu_fraction": round(points[load]["client_cpu_fraction"], 4),
        }
        for load, batch in (("c=1", 1), ("c=8", 8))
    ]
    rows.append({"load": "c=8 / c=1", "served_tok_s": round(rows[1]["served_tok_s"] / rows[0]["served_tok_s"], 2)})
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def _table(rows: list[dict]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row.get(h, "")) for h in header) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    workdir = Path(next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("workdir=")), "artifacts"))
    chosen = [a for a in sys.argv[1:] if a in ("quantize", "serving")] or ["quantize", "serving"]
    for name in chosen:
        rows = (bench_quantize if name == "quantize" else bench_serving)(workdir.resolve())
        out = workdir / "benchmarks" / f"{name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"\n{_table(rows)}\n\nwritten to {out}")


if __name__ == "__main__":
    main()
