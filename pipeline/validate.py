"""Is this configuration sound? ``load()`` turns command-line overrides into a typed, checked
config; ``validate()`` collects every cross-field problem at once, each naming the override that
fixes it. Pure and cheap (no weights, no network), so a bad combination is refused before any work.

This module sits above what it asks: the schema, the sizing rules and memory plan, and the
trtllm-build switches. Nothing below imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.config import compose, hardware
from pipeline.config.schema import (
    BenchmarkConfig,
    ModelConfig,
    PipelineConfig,
    QuantFormat,
    Source,
    TargetKind,
)
from pipeline.errors import ConfigError
from pipeline.sizing import calibration, memory, rules
from pipeline.stages.engine import trtllm


def load(overrides: Sequence[str] = ()) -> PipelineConfig:
    """Overrides -> validated, typed config. Raises ConfigError listing every problem.
    ``target=auto`` asks nvidia-smi here, once per call."""
    cfg = compose.typed(overrides)
    if cfg.target.kind is TargetKind.auto:
        cfg.target = hardware.detect()
    problems = validate(cfg)
    if problems:
        raise ConfigError("; ".join(problems) if len(problems) > 1 else problems[0])
    return cfg


def _source_problems(model: ModelConfig) -> list[str]:
    if model.source is Source.hf and not model.repo_id:
        return ["model.source=hf needs model.repo_id=<org/name>"]
    if model.source is Source.local:
        if not model.path:
            return ["model.source=local needs model.path=<folder with config.json and weights>"]
        if not Path(model.path).expanduser().is_dir():
            return [f"model.path={model.path} is not a folder: point it at a Hugging Face checkpoint"]
    if model.source is Source.gguf and not (model.path or (model.package and model.file)):
        return ["model.source=gguf needs model.path=<file.gguf> or model.package=<pkg> model.file=<name>"]
    return []


def validate(cfg: PipelineConfig) -> list[str]:
    """Every cross-field problem, each naming the override that fixes it. Empty means valid."""
    problems = _source_problems(cfg.model)
    for name in (
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "hidden_size",
        "intermediate_size",
        "vocab_size",
        "max_position_embeddings",
    ):
        value = getattr(cfg.model.arch, name)
        if value is not None and value < 1:
            problems.append(f"model.arch.{name}={value} must be positive")
    problems += rules.architecture_problems(cfg.model.name, cfg.model.arch.architectures, cfg.target.is_gpu)
    problems += rules.parallel_problems(cfg)
    problems += rules.gpu_format_problems(cfg)
    problems += _quant_problems(cfg)
    problems += _build_problems(cfg)
    problems += _triton_problems(cfg)
    problems += _benchmark_problems(cfg.benchmark)
    if not problems:  # the memory plan needs a configuration that is otherwise sound
        problems += memory.problems(cfg)
    return problems


def _benchmark_problems(bench: BenchmarkConfig) -> list[str]:
    problems = []
    if any(c < 1 for c in bench.concurrency) or any(r <= 0 for r in bench.rates):
        problems.append("benchmark.concurrency values must be >= 1 and benchmark.rates > 0")
    if bench.enabled and not (bench.concurrency or bench.rates):
        problems.append("benchmark.concurrency and benchmark.rates are both empty: give one, or benchmark=none")
    if bench.enabled and bench.prompts_file and not Path(bench.prompts_file).expanduser().is_file():
        problems.append(
            f"benchmark.prompts_file={bench.prompts_file} does not exist: give a JSONL file with a 'text' per line"
        )
    if bench.requests_per_point < 1 or bench.input_tokens < 1 or bench.output_tokens < 1:
        problems.append("benchmark.requests_per_point, input_tokens and output_tokens must be at least 1")
    return problems


def _triton_problems(cfg: PipelineConfig) -> list[str]:
    triton, engine_batch = cfg.triton, cfg.build.max_batch_size
    problems = []
    if triton.max_batch_size is not None and triton.max_batch_size != engine_batch:
        problems.append(
            f"triton.max_batch_size={triton.max_batch_size} differs from the engine's build.max_batch_size="
            f"{engine_batch}: leave triton.max_batch_size=null or set both"
        )
    wrong = [size for size in triton.preferred_batch_sizes if not 1 <= size <= engine_batch]
    if wrong:
        problems.append(f"triton.preferred_batch_sizes {wrong} must lie in 1..{engine_batch} (build.max_batch_size)")
    ports = [triton.http_port, triton.grpc_port, triton.metrics_port]
    if len(set(ports)) < 3 or not all(0 < p < 65536 for p in ports):
        problems.append(f"triton.http_port, grpc_port and metrics_port must be three distinct ports, not {ports}")
    if not 0 < triton.kv_cache_free_gpu_mem_fraction <= 1:
        problems.append("triton.kv_cache_free_gpu_mem_fraction must lie in (0, 1]")
    if min(triton.preprocessing_instances, triton.postprocessing_instances, triton.bls_instances) < 1:
        problems.append("triton.*_instances must be at least 1")
    if triton.cpu_threads is not None and triton.cpu_threads < 1:
        problems.append("triton.cpu_threads must be at least 1 (or null: every core)")
    tokens = triton.max_tokens_in_paged_kv_cache
    if tokens is not None and tokens < cfg.build.max_seq_len:
        problems.append(
            f"triton.max_tokens_in_paged_kv_cache={tokens} cannot hold one {cfg.build.max_seq_len}-token "
            "sequence (build.max_seq_len): raise it or lower build.max_seq_len"
        )
    if not 1 <= triton.cpu_max_num_tokens <= cfg.build.max_num_tokens:
        problems.append(
            f"triton.cpu_max_num_tokens={triton.cpu_max_num_tokens} must lie in 1..{cfg.build.max_num_tokens} "
            "(build.max_num_tokens)"
        )
    if triton.cancellation_check_period_ms < 1:
        problems.append("triton.cancellation_check_period_ms must be at least 1")
    return problems


def _build_problems(cfg: PipelineConfig) -> list[str]:
    build, context = cfg.build, cfg.model.arch.max_position_embeddings
    problems = []
    if build.tokens_per_block < 1 or build.tokens_per_block & (build.tokens_per_block - 1):
        problems.append(f"build.tokens_per_block={build.tokens_per_block} must be a power of two (e.g. 32, 64)")
    if build.max_input_len > build.max_seq_len:
        problems.append(
            f"build.max_input_len={build.max_input_len} exceeds build.max_seq_len={build.max_seq_len}: "
            "raise build.max_seq_len or lower build.max_input_len"
        )
    if context and build.max_seq_len > context:
        problems.append(
            f"build.max_seq_len={build.max_seq_len} exceeds the {context}-token context of "
            f"{cfg.model.name}: use build.max_seq_len<={context}"
        )
    if build.max_batch_size < 1 or build.max_num_tokens < 1 or build.max_beam_width < 1:
        problems.append("build.max_batch_size, build.max_num_tokens and build.max_beam_width must be at least 1")
    problems += trtllm.extra_arg_problems(build.extra_args)
    problems += trtllm.switch_problems(cfg)
    if build.workers is not None and build.workers < 1:
        problems.append("build.workers must be at least 1 (or null: one per rank the target's GPUs allow)")
    return problems


def _quant_problems(cfg: PipelineConfig) -> list[str]:
    quant = cfg.quant
    if quant.format is QuantFormat.none:
        return (
            ["quant.kv_cache_dtype needs a quantized format: use quant=fp8 (or another) or quant.kv_cache_dtype=null"]
            if quant.kv_cache_dtype
            else []
        )
    problems = []
    if quant.calib.num_samples is not None and quant.calib.num_samples < 1:
        problems.append("quant.calib.num_samples must be at least 1")
    dataset = calibration.calibration_sizes(cfg).dataset
    if dataset not in (calibration.BUILTIN, "cnn_dailymail") and not Path(dataset).expanduser().is_file():
        problems.append(
            f"quant.calib.dataset={dataset} is not a file: use builtin, cnn_dailymail or a .txt/.jsonl file"
        )
    return problems
