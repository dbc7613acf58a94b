"""The ``trtllm-build`` command of TensorRT-LLM 1.1.x and 1.2.x, built by a pure function and checked
flag by flag against the flag table of TensorRT-LLM 1.2.x (``pipeline/data/trtllm_build_flags.json``, a
copy of the project's reference table, so the check works anywhere). Every flag used here exists in 1.1 as well: the
plugin switches date from the 0.1x releases (user buffers and norm+quant fusion from 0.16/0.17).

NVIDIA's advice, applied when a switch is left null (the build-time flag guide and the FP8 and
NVFP4 tuning guides): ``--gemm_plugin auto`` for 16-bit weights and off for FP8/NVFP4 (their own
GEMM paths are faster); FP8 context FMHA only with FP8 on SM >= 89; ``--reduce_fusion`` for tp > 1,
and with it ``--user_buffer`` for FP8 Llama on Hopper (the kernel exists for FP8 Llama only and
fails on Ada); ``--norm_quant_fusion`` for NVFP4 Llama without reduce fusion (at tp=1: the builder
drops it otherwise); multiple optimization profiles always;
one build worker per rank the target's GPUs allow, so ranks build in parallel. The latency preset
adds Hopper's low-latency FP8 GEMM plugins, which the builder rejects on Blackwell.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from pipeline.assets import TRTLLM_BUILD_FLAGS
from pipeline.config.schema import KVCacheDType, PipelineConfig, QuantFormat
from pipeline.sizing import adapters
from pipeline.sizing.rules import FP8_MIN_SM, LLAMA_FAMILY

# The release lines with trtllm-build and the Triton tensorrtllm backend: 1.3 removed the engine
# path; NGC's tritonserver:25.12-trtllm-python-py3 carries 1.1.0, upstream's backend Dockerfile
# builds 1.2.1 on the same 25.12 bases (facts).
SUPPORTED_RANGE = ((1, 1), (1, 3))  # [low, high) as (major, minor)
SUPPORTED = ">={}.{},<{}.{}".format(*SUPPORTED_RANGE[0], *SUPPORTED_RANGE[1])
CONTAINER_TAG = "25.12"  # NGC tritonserver:<tag>-trtllm-python-py3, the Dockerfile's default base
HOPPER_SM = 90
# Flags the pipeline sets itself: extra_args may not set them twice.
OWNED = (
    "--checkpoint_dir",
    "--output_dir",
    "--max_batch_size",
    "--max_input_len",
    "--max_seq_len",
    "--max_num_tokens",
    "--max_beam_width",
    "--kv_cache_type",
    "--gemm_plugin",
    "--use_paged_context_fmha",
    "--use_fp8_context_fmha",
    "--multiple_profiles",
    "--reduce_fusion",
    "--user_buffer",
    "--norm_quant_fusion",
    "--gemm_swiglu_plugin",
    "--low_latency_gemm_plugin",
    "--workers",
    "--input_timing_cache",
    "--output_timing_cache",
    "--lora_plugin",
    "--max_lora_rank",
    "--lora_target_modules",
)


@cache
def flag_table() -> dict[str, dict[str, Any]]:
    return json.loads(TRTLLM_BUILD_FLAGS.read_text())


def _enable(value: bool) -> str:
    return "enable" if value else "disable"


def release_line(version: str) -> tuple[int, ...]:
    """ "1.2.0rc8" -> (1, 2)."""
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())


def version_supported(version: str) -> bool:
    low, high = SUPPORTED_RANGE
    return low <= release_line(version) < high


def uses_fp8(cfg: PipelineConfig) -> bool:
    return cfg.quant.format.fp8_activations or cfg.quant.kv_cache_dtype is KVCacheDType.fp8


def is_llama(cfg: PipelineConfig) -> bool:
    """Llama-like decoders, the only ones the fused all-reduce/norm kernels are built for."""
    return any(name in LLAMA_FAMILY for name in cfg.model.arch.architectures or [])


@dataclass(frozen=True)
class Switches:
    """The plugin and feature switches after NVIDIA's advice filled in every null."""

    gemm_plugin: str | None
    fp8_context_fmha: bool
    reduce_fusion: bool
    user_buffer: bool
    norm_quant_fusion: bool
    low_latency_gemm: bool
    workers: int


def _advised(forced: bool | None, advice: bool) -> bool:
    return advice if forced is None else forced


def switches(cfg: PipelineConfig) -> Switches:
    build, sm, tp, ranks = cfg.build, cfg.target.sm or 0, cfg.parallel.tp, cfg.parallel.world_size
    fmt = cfg.quant.format
    own_gemms = fmt in (QuantFormat.fp8, QuantFormat.nvfp4)  # faster than the GEMM plugin
    gemm = build.gemm_plugin if build.gemm_plugin is not None else (None if own_gemms else "auto")
    reduce_fusion = _advised(build.reduce_fusion, tp > 1)
    fp8_on_hopper = fmt is QuantFormat.fp8 and sm == HOPPER_SM
    return Switches(
        gemm_plugin=gemm,
        fp8_context_fmha=_advised(build.use_fp8_context_fmha, uses_fp8(cfg) and sm >= FP8_MIN_SM),
        reduce_fusion=reduce_fusion,
        user_buffer=_advised(build.user_buffer, reduce_fusion and fp8_on_hopper and is_llama(cfg)),
        # the builder keeps it only for NVFP4 Llama without reduce fusion (builder.py overrides it
        # to False otherwise): advised at tp=1 only, where it takes effect
        norm_quant_fusion=_advised(
            build.norm_quant_fusion, fmt is QuantFormat.nvfp4 and is_llama(cfg) and not reduce_fusion
        ),
        # both fuse or replace the FP8 GEMMs: never together with the regular GEMM plugin
        low_latency_gemm=build.fp8_low_latency_gemm and fp8_on_hopper and gemm is None,
        # each worker needs a GPU of its own on the build host
        workers=max(1, min(ranks, build.workers if build.workers is not None else cfg.target.count)),
    )


def build_argv(cfg: PipelineConfig, checkpoint_dir: Path, output_dir: Path, timing_cache: Path | None) -> list[str]:
    """The full ``trtllm-build`` command for this configuration (pure: no I/O)."""
    build, chosen = cfg.build, switches(cfg)
    argv = [
        "trtllm-build",
        "--checkpoint_dir",
        str(checkpoint_dir),
        "--output_dir",
        str(output_dir),
        "--max_batch_size",
        str(build.batch),
        "--max_input_len",
        str(build.max_input_len),
        "--max_seq_len",
        str(build.max_seq_len),
        "--max_num_tokens",
        str(build.tokens),
        "--max_beam_width",
        str(build.max_beam_width),
        "--kv_cache_type",
        build.kv_cache_type,
        "--tokens_per_block",
        str(build.tokens_per_block),
    ]
    if chosen.gemm_plugin is not None:
        argv += ["--gemm_plugin", chosen.gemm_plugin]
    if chosen.low_latency_gemm:
        argv += ["--gemm_swiglu_plugin", "fp8", "--low_latency_gemm_plugin", "fp8"]
    argv += [
        "--use_paged_context_fmha",
        _enable(build.use_paged_context_fmha),
        "--use_fp8_context_fmha",
        _enable(chosen.fp8_context_fmha),
        "--multiple_profiles",
        _enable(build.multiple_profiles),
        "--reduce_fusion",
        _enable(chosen.reduce_fusion),
        "--user_buffer",
        _enable(chosen.user_buffer),
        "--norm_quant_fusion",
        _enable(chosen.norm_quant_fusion),
        "--workers",
        str(chosen.workers),
    ]
    if timing_cache is not None:
        argv += ["--input_timing_cache", str(timing_cache), "--output_timing_cache", str(timing_cache)]
    return argv + lora_flags(cfg) + list(build.extra_args)


def lora_flags(cfg: PipelineConfig) -> list[str]:
    """The LoRA plugin for ``lora.adapters``, as upstream's multi-LoRA guide builds it: the plugin in
    the model's dtype, adapters of rank up to ``lora.max_rank`` on every projection one of them
    adapts. The adapters themselves are not built in (no ``--lora_dir``): requests bring them, and
    the repository's ``lora_prefetch_dir`` loads the shipped ones when the server starts."""
    if not cfg.lora.adapters:
        return []
    modules = adapters.backend_modules(cfg)
    return ["--lora_plugin", "auto", "--max_lora_rank", str(cfg.lora.max_rank), "--lora_target_modules", *modules]


def switch_problems(cfg: PipelineConfig) -> list[str]:
    """Switches forced on where the builder would reject them."""
    chosen = switches(cfg)
    if chosen.user_buffer and not (chosen.reduce_fusion and cfg.parallel.tp > 1):
        return ["build.user_buffer=true needs reduce fusion at parallel.tp > 1: leave build.user_buffer=null"]
    return []


def _value_problem(flag: str, value: str | None, spec: dict[str, Any]) -> str | None:
    kind = spec["type"]
    if kind.startswith("bool"):
        return f"{flag} takes no value" if value is not None else None
    if value is None:
        return f"{flag} needs a value"
    choices = spec.get("choices")
    if choices and value.lower() not in [c.lower() for c in choices]:
        return f"{flag} {value}: choose one of {', '.join(choices)}"
    if kind == "int":
        try:
            int(value)
        except ValueError:
            return f"{flag} {value}: expected an integer"
    return None


def argv_problems(argv: list[str]) -> list[str]:
    """Every flag must exist in TensorRT-LLM's table (1.2.x; the flags used by default exist in 1.1
    too) and every value must fit its type."""
    table, problems = flag_table(), []
    index = 1
    while index < len(argv):
        flag = argv[index]
        if flag not in table:
            problems.append(f"unknown trtllm-build flag {flag}")
            index += 1
            continue
        spec = table[flag]
        if spec["type"].startswith("list"):  # nargs=+: the values up to the next flag, each a choice
            values = []
            while index + 1 < len(argv) and not argv[index + 1].startswith("--"):
                values.append(argv[index + 1])
                index += 1
            problems += _list_problems(flag, values, spec.get("choices"))
            index += 1
            continue
        takes_value = not spec["type"].startswith("bool")
        value = argv[index + 1] if takes_value and index + 1 < len(argv) else None
        if (problem := _value_problem(flag, value, spec)) is not None:
            problems.append(problem)
        index += 2 if takes_value else 1
    return problems


def _list_problems(flag: str, values: list[str], choices: list[str] | None) -> list[str]:
    if not values:
        return [f"{flag} needs at least one value"]
    wrong = [v for v in values if choices and v not in choices]
    return [f"{flag} {' '.join(wrong)}: choose from {', '.join(choices or [])}"] if wrong else []


def extra_arg_problems(extra: list[str]) -> list[str]:
    problems = [f"build.extra_args: {p}" for p in argv_problems(["trtllm-build", *extra])]
    owned = sorted(set(extra) & set(OWNED))
    if owned:
        problems.append(
            f"build.extra_args sets {', '.join(owned)}, which the pipeline sets itself: use the matching build.* key"
        )
    return problems
