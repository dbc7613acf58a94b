"""Benchmarks: ``make bench`` (``python -m bench [workdir=...]``).

quantize: for the embedded model on this machine, each quant format is quantized and exported
(tp=1) in a fresh process with force=true, and the wall time and peak resident memory of each
phase are read back from the stage manifest. All formats run in one invocation so their numbers
can be compared as ratios on the same, noisy machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

FORMATS = ("none", "fp8", "int8_sq", "int4_awq", "w4a8_awq", "nvfp4")
EXTRA = {"int4_awq": ["quant.awq_block_size=64"], "w4a8_awq": ["quant.awq_block_size=64"]}


def bench_quantize(workdir: Path) -> list[dict]:
    rows = []
    subprocess.run([sys.executable, "-m", "pipeline", "build", f"workdir={workdir}", "target=cpu"], check=True)
    for fmt in FORMATS:
        argv = [
            sys.executable,
            "-m",
            "pipeline",
            "build",
            f"workdir={workdir}",
            "target=cpu",
            f"quant={fmt}",
            "redo=[quantize]",
            *EXTRA.get(fmt, []),
        ]
        started = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        manifest = max(workdir.glob("quantize/*/manifest.json"), key=lambda p: p.stat().st_mtime)
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


def main() -> None:
    workdir = Path(next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("workdir=")), "artifacts"))
    rows = bench_quantize(workdir.resolve())
    out = workdir / "bench" / "quantize.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    header = list(rows[0])
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[h]) for h in header) + " |")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
