"""The ``trtllm-build`` command of TensorRT-LLM 1.2.x, built by a pure function and checked flag by
flag against the flag table in ``shared/reference/trtllm_build_flags.json`` (a copy ships in
``pipeline/data`` so the check works anywhere).

NVIDIA's advice, applied when a switch is left null: ``--gemm_plugin auto`` for 16-bit weights and
off for FP8/NVFP4 (their own GEMM paths are faster); FP8 context FMHA only with FP8 on SM >= 89;
``--reduce_fusion`` only for tp > 1 on Llama-like models; paged KV cache and paged context FMHA on.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig

FLAG_TABLE = Path(__file__).resolve().parent / "data" / "trtllm_build_flags.json"
SUPPORTED = ">=1.2,<1.3"  # the last release line with trtllm-build (facts)
CONTAINER_TAG = "25.12"  # NGC tritonserver:<tag>-trtllm-python-py3 built on TensorRT-LLM 1.2 (Dockerfile)
FP8_MIN_SM = 89
# Flags the pipeline sets itself: extra_args may not set them twice.
OWNED = (
    "--checkpoint_dir",
    "--output_dir",
    "--max_batch_size",
    "--max_input_len",
    "--max_seq_len",
    "--max_num_tokens",
    "--kv_cache_type",
    "--gemm_plugin",
    "--use_paged_context_fmha",
    "--use_fp8_context_fmha",
    "--multiple_profiles",
    "--reduce_fusion",
    "--workers",
    "--input_timing_cache",
    "--output_timing_cache",
)


@cache
def flag_table() -> dict[str, dict[str, Any]]:
    return json.loads(FLAG_TABLE.read_text())


def _enable(value: bool) -> str:
    return "enable" if value else "disable"


def uses_fp8(cfg: PipelineConfig) -> bool:
    return str(cfg.quant.format) in ("fp8", "w4a8_awq") or cfg.quant.kv_cache_dtype == "fp8"


def build_argv(cfg: PipelineConfig, checkpoint_dir: Path, output_dir: Path, timing_cache: Path | None) -> list[str]:
    """The full ``trtllm-build`` command for this configuration (pure: no I/O)."""
    build, sm, tp = cfg.build, cfg.target.sm or 0, cfg.parallel.tp
    low_precision_gemm = str(cfg.quant.format) in ("fp8", "nvfp4")
    gemm = build.gemm_plugin if build.gemm_plugin is not None else (None if low_precision_gemm else "auto")
    fp8_fmha = build.use_fp8_context_fmha
    if fp8_fmha is None:
        fp8_fmha = uses_fp8(cfg) and sm >= FP8_MIN_SM
    reduce_fusion = build.reduce_fusion if build.reduce_fusion is not None else tp > 1
    argv = [
        "trtllm-build",
        "--checkpoint_dir",
        str(checkpoint_dir),
        "--output_dir",
        str(output_dir),
        "--max_batch_size",
        str(build.max_batch_size),
        "--max_input_len",
        str(build.max_input_len),
        "--max_seq_len",
        str(build.max_seq_len),
        "--max_num_tokens",
        str(build.max_num_tokens),
        "--kv_cache_type",
        build.kv_cache_type,
    ]
    if gemm is not None:
        argv += ["--gemm_plugin", gemm]
    argv += [
        "--use_paged_context_fmha",
        _enable(build.use_paged_context_fmha),
        "--use_fp8_context_fmha",
        _enable(fp8_fmha),
        "--multiple_profiles",
        _enable(build.multiple_profiles),
        "--reduce_fusion",
        _enable(reduce_fusion),
        "--workers",
        str(min(build.workers, tp * cfg.parallel.pp)),
    ]
    if timing_cache is not None:
        argv += ["--input_timing_cache", str(timing_cache), "--output_timing_cache", str(timing_cache)]
    return argv + list(build.extra_args)


def _value_problem(flag: str, value: str | None, spec: dict[str, Any]) -> str | None:
    kind = spec["type"]
    if kind.startswith("bool"):
        return f"{flag} takes no value" if value is not None else None
    if value is None:
        return f"{flag} needs a value"
    choices = spec.get("choices")
    if kind.startswith("list"):
        return None
    if choices and value.lower() not in [c.lower() for c in choices]:
        return f"{flag} {value}: choose one of {', '.join(choices)}"
    if kind == "int":
        try:
            int(value)
        except ValueError:
            return f"{flag} {value}: expected an integer"
    return None


def argv_problems(argv: list[str]) -> list[str]:
    """Every flag must exist in TensorRT-LLM 1.2's table and every value must fit its type."""
    table, problems = flag_table(), []
    index = 1
    while index < len(argv):
        flag = argv[index]
        if flag not in table:
            problems.append(f"unknown trtllm-build flag {flag}")
            index += 1
            continue
        spec = table[flag]
        takes_value = not spec["type"].startswith("bool")
        value = argv[index + 1] if takes_value and index + 1 < len(argv) else None
        if (problem := _value_problem(flag, value, spec)) is not None:
            problems.append(problem)
        index += 2 if takes_value else 1
    return problems


def extra_arg_problems(extra: list[str]) -> list[str]:
    problems = [f"build.extra_args: {p}" for p in argv_problems(["trtllm-build", *extra])]
    owned = sorted(set(extra) & set(OWNED))
    if owned:
        problems.append(
            f"build.extra_args sets {', '.join(owned)}, which the pipeline sets itself: use the matching build.* key"
        )
    return problems
