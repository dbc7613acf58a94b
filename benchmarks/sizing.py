"""The sizing of engine limits and the performance model on paper (``python -m benchmarks sizing``):
for Llama-3.x-70B FP8 (FP8 KV cache) at tp=2 on H100, what the default preset now picks at three
workloads beside trtllm-bench's choice (shared/reference/facts.md), the old fixed default's
batch of 64, and the model's throughput at each: how much the old default left unused."""

from __future__ import annotations

from typing import Any

from pipeline import validate
from pipeline.sizing import perf

WORKLOADS = ((128, 128), (128, 2048), (2048, 128))
# trtllm-bench's own (max_batch_size, max_num_tokens) for these, where facts.md has them
TRTLLM_BENCH = {(128, 128): (2304, 4608), (128, 2048): (256, 2048)}
OLD_DEFAULT = (64, 8192)
BASE = ["model=llama70b", "quant=fp8", "parallel.tp=2", "target=h100"]


def paper() -> list[dict[str, Any]]:
    rows = []
    for isl, osl in WORKLOADS:
        cfg = validate.load([*BASE, f"workload.input_tokens={isl}", f"workload.output_tokens={osl}"])
        hw = perf.hardware_for(cfg.target)
        assert hw is not None
        arch, fmt, kv = cfg.model.arch, cfg.quant.format, cfg.quant.kv_cache_dtype
        sized = perf.Deployment(arch, fmt, kv, 2, 1, hw, cfg.build.batch, cfg.build.tokens)
        old = perf.Deployment(arch, fmt, kv, 2, 1, hw, *OLD_DEFAULT)
        at_sized = perf.predict(sized, cfg.workload, cfg.build.batch)
        at_old = perf.predict(old, cfg.workload, OLD_DEFAULT[0])
        bench = TRTLLM_BENCH.get((isl, osl))
        rows.append(
            {
                "workload": f"{isl}/{osl}",
                "sized batch/tokens": f"{cfg.build.batch}/{cfg.build.tokens}",
                "trtllm-bench": f"{bench[0]}/{bench[1]}" if bench else "-",
                "predicted tok/s (sized)": round(at_sized.output_tokens_per_s),
                "predicted tok/s (batch 64)": round(at_old.output_tokens_per_s),
                "batch 64 / sized": round(at_old.output_tokens_per_s / at_sized.output_tokens_per_s, 2),
            }
        )
    return rows
