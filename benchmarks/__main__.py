"""The project's own speed benchmarks: ``make bench`` (``python -m benchmarks [quantize|serving]
[workdir=...]``). Results land in ``<workdir>/benchmarks/``; artifact paths come from the plan of
the same overrides, not from globbing the workdir.

quantize: for the embedded model on this machine, each quant format is quantized and exported
(tp=1) in a fresh process with force=true, and the wall time and peak resident memory of each
phase are read back from the stage manifest. All formats run in one invocation so their numbers
can be compared as ratios on the same, noisy machine.

serving (``benchmarks/serving.py``): in-flight against run-to-completion batching and raw
transformers generate, prefix reuse, chunked context and memory under load, with the ratios the
scheduler is held to (``python -m benchmarks serving [soak_s=300]``).

sizing (``benchmarks/sizing.py``): the engine limits the default preset sizes for Llama-3.x-70B
FP8 TP2 on H100 at three workloads, beside trtllm-bench's, and the performance model's throughput
at them and at the old fixed batch of 64 (arithmetic only: no GPU needed).

lora (``benchmarks/lora.py``): the CPU cost of LoRA adapters in a mixed in-flight batch: output
tokens/s with none, half and all of 8 requests adapted.

soak (``benchmarks/soak.py``, ``make soak``): 32 streams for 5 minutes with cancellations and a
burst of 500 dropped streams; errors, memory and thread growth, and TTFT recovery, as checks.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import lora, serving, sizing, soak
from pipeline import runner, validate
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


def _table(rows: list[dict]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row.get(h, "")) for h in header) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    options = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
    workdir = Path(options.get("workdir", "artifacts")).resolve()
    chosen = [a for a in sys.argv[1:] if a in ("quantize", "serving", "soak", "sizing", "lora")] or [
        "sizing",
        "quantize",
        "serving",
        "lora",
    ]
    for name in chosen:
        out = workdir / "benchmarks" / f"{name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        if name == "sizing":
            rows = sizing.paper()
            out.write_text(json.dumps(rows, indent=2) + "\n")
            print(f"\n{_table(rows)}")
        elif name == "quantize":
            rows = bench_quantize(workdir)
            out.write_text(json.dumps(rows, indent=2) + "\n")
            print(f"\n{_table(rows)}")
        elif name == "lora":
            rows = lora.bench_lora(workdir)
            out.write_text(json.dumps(rows, indent=2) + "\n")
            print(f"\n{_table(rows)}")
        elif name == "soak":
            result = soak.soak(workdir, float(options.get("seconds", 300)))
            out.write_text(json.dumps(result, indent=2) + "\n")
            print(json.dumps(result, indent=2))
            if not all(result["checks"].values()):
                raise SystemExit("soak: a check failed (see checks above)")
        else:
            result = serving.bench_serving(workdir, float(options.get("soak_s", 300)))
            out.write_text(json.dumps(result, indent=2) + "\n")
            serving.print_tables(result)
        print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
