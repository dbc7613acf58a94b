"""Is this configuration sound? ``load()`` turns command-line overrides into a typed, checked
config; ``validate()`` collects every cross-field problem at once, each naming the override that
fixes it. Pure and cheap (no weights, no network), so a bad combination is refused before any work.

This module sits above what it asks: the schema, the sizing rules and memory plan, and the
trtllm-build switches. Nothing below imports it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import socket
from collections.abc import Sequence
from pathlib import Path

from pipeline import textfiles
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
from pipeline.redact import redact, register_secret_env
from pipeline.sizing import adapters, calibration, limits, memory, rules
from pipeline.stages.engine import trtllm


def load(overrides: Sequence[str] = (), check_memory: bool = True) -> PipelineConfig:
    """Overrides -> validated, typed config. Raises ConfigError listing every problem.
    ``target=auto`` asks nvidia-smi here, once per call. ``check_memory=False`` leaves the memory
    plan's verdict to the caller (``plan`` prints the table first)."""
    return checked(compose.typed(overrides), check_memory)


def checked(cfg: PipelineConfig, check_memory: bool = True) -> PipelineConfig:
    """A composed config made whole (``target=auto`` detected, defaults resolved into it, the
    architecture read from a local checkpoint) and checked: the same config, and so the same
    fingerprints, whether a job is composed here or by a Hydra launcher elsewhere."""
    # the gateway's key may live in any variable: it is a credential wherever text leaves the process
    register_secret_env(cfg.openai.api_key_env)
    if cfg.target.kind is TargetKind.auto:
        cfg.target = hardware.detect()
    # resolved once, so the recorded config and the fingerprints carry the number
    cfg.triton.kv_cache_free_gpu_mem_fraction = cfg.kv_cache_fraction
    _architecture_from_checkpoint(cfg.model)
    problems = validate(cfg, check_memory)
    if problems:
        raise ConfigError("; ".join(problems) if len(problems) > 1 else problems[0])
    return cfg


# Hub repository ids: org/name, letters, digits, '-', '_', '.' (no '..', no leading or trailing '-.')
REPO_ID = re.compile(r"^(?!.*\.\.)[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?/[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?$")
TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")

# Inclusive bounds of numbers whose lower bound is not 0 (or that have an upper one); every other
# number of the config must be finite and not negative.
RANGES: dict[str, tuple[float | None, float | None]] = {
    "quant.calib.batch_size": (1, None),
    "quant.calib.max_length": (1, None),
    "quant.awq_block_size": (1, None),
    "target.nodes": (1, None),
    "build.timeout_s": (1, None),
    "triton.ready_timeout_s": (1, None),
    "benchmark.top_p": (0, 1),
    "benchmark.timeout_s": (1, None),
    "parallel.tp": (1, None),
    "parallel.pp": (1, None),
    "openai.port": (1, 65535),
    "openai.default_max_tokens": (1, None),
}


def number_problems(cfg: PipelineConfig) -> list[tuple[str, str]]:
    """(key, problem) for every number that is not finite, negative, or outside its range."""
    found = []
    for key, value in _numbers(cfg, ""):
        low, high = RANGES.get(key, (0, None))
        if not math.isfinite(value):
            found.append((key, f"{key}={value} must be a finite number"))
        elif (low is not None and value < low) or (high is not None and value > high):
            bound = f"lie in {low:g}..{high:g}" if high is not None else f"be at least {low:g}"
            found.append((key, f"{key}={value:g} must {bound}"))
    return found


def _numbers(node: object, prefix: str) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for item in dataclasses.fields(node):  # type: ignore[arg-type]
        value = getattr(node, item.name)
        key = f"{prefix}{item.name}"
        if dataclasses.is_dataclass(value):
            out += _numbers(value, key + ".")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out.append((key, float(value)))
    return out


def _tracking_problems(uri: str | None) -> list[str]:
    if uri is None:
        return []
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else ""
    if scheme not in TRACKING_SCHEMES:
        return [
            f"tracking.uri={redact(uri)}: the scheme must be one of {', '.join(TRACKING_SCHEMES)} "
            "(e.g. sqlite:///path/mlflow.db or http://host:5000)"
        ]
    return []


def _host_problems(cfg: PipelineConfig) -> list[str]:
    problems = []
    for key, host in (("triton.host", cfg.triton.host), ("openai.host", cfg.openai.host)):
        if not host:
            continue
        try:
            socket.getaddrinfo(host, None)
        except (socket.gaierror, UnicodeError):
            problems.append(f"{key}={host} does not resolve: give an address this machine has (127.0.0.1, 0.0.0.0)")
    return problems


def _architecture_from_checkpoint(model: ModelConfig) -> None:
    """A local checkpoint's ``config.json`` fills the architecture numbers the config leaves out,
    so the memory plan and the quantize stage's memory check apply before any work, as they do for
    the named models (a Hub model's are filled by the fetch stage's preflight, which reads its
    config.json from the Hub)."""
    if model.source is not Source.local or not model.path:
        return
    try:
        found = json.loads((Path(model.path).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return  # _source_problems names what is wrong with the folder
    memory.fill_sizes(model.arch, found)


def _source_problems(model: ModelConfig) -> list[str]:
    if model.source is Source.hf and not model.repo_id:
        return ["model.source=hf needs model.repo_id=<org/name>"]
    if model.source is Source.hf and model.repo_id and not REPO_ID.match(model.repo_id):
        return [f"model.repo_id={model.repo_id} is not a Hub repository id: use the form org/name"]
    if model.source is Source.local:
        if not model.path:
            return ["model.source=local needs model.path=<folder with config.json and weights>"]
        if not Path(model.path).expanduser().is_dir():
            return [f"model.path={model.path} is not a folder: point it at a Hugging Face checkpoint"]
        if not (Path(model.path).expanduser() / "config.json").is_file():
            return [
                f"model.path={model.path} has no config.json at its top: point it at the checkpoint's own folder "
                "(the one holding config.json and the weights)"
            ]
    if model.source is Source.gguf and not (model.path or (model.package and model.file)):
        return ["model.source=gguf needs model.path=<file.gguf> or model.package=<pkg> model.file=<name>"]
    return []


def validate(cfg: PipelineConfig, check_memory: bool = True) -> list[str]:
    """Every cross-field problem, each naming the override that fixes it. Empty means valid. Null
    engine limits are sized for the workload first (once: the recorded config and the fingerprints
    carry the numbers), as every check below and every stage reads them."""
    limits.resolve(cfg)
    problems = _source_problems(cfg.model)
    for name in (*memory.SIZE_FIELDS, "max_position_embeddings"):
        value = getattr(cfg.model.arch, name)
        if value is not None and value < 1:
            problems.append(f"model.arch.{name}={value} must be positive")
    problems += rules.architecture_problems(cfg.model.name, cfg.model.arch.architectures, cfg.target.is_gpu)
    problems += rules.parallel_problems(cfg)
    problems += rules.gpu_format_problems(cfg)
    problems += rules.backend_problems(cfg)
    problems += _quant_problems(cfg)
    problems += _build_problems(cfg)
    problems += _triton_problems(cfg)
    problems += _benchmark_problems(cfg.benchmark)
    problems += _workload_problems(cfg)
    problems += adapters.problems(cfg)
    problems += _tracking_problems(cfg.tracking.uri)
    problems += _host_problems(cfg)
    said = " ".join(problems)
    problems += [p for key, p in number_problems(cfg) if f"{key}=" not in said and f"{key} " not in said]
    if not problems and check_memory:  # the memory plan needs a configuration that is otherwise sound
        problems += memory.problems(cfg)
    return problems


def _workload_problems(cfg: PipelineConfig) -> list[str]:
    work, problems = cfg.workload, []
    if work.prompts_file:
        file = Path(work.prompts_file).expanduser()
        if not file.is_file():
            problems.append(
                f"workload.prompts_file={work.prompts_file} does not exist: give a JSONL file with a 'text' per line"
            )
        else:
            problems += _file_problems(file, "workload.prompts_file", ("text", "text_input"))
    if work.input_tokens < 1 or work.output_tokens < 1:
        problems.append("workload.input_tokens and workload.output_tokens must be at least 1")
    elif work.input_tokens > cfg.build.max_input_len and not work.input_tokens_stddev:
        problems.append(
            f"workload.input_tokens={work.input_tokens} exceeds build.max_input_len={cfg.build.max_input_len}: "
            "raise build.max_input_len (and build.max_seq_len) or shorten the prompts"
        )
    elif work.input_tokens + work.output_tokens > cfg.build.max_seq_len:
        problems.append(
            f"workload.input_tokens + output_tokens = {work.input_tokens + work.output_tokens} exceeds "
            f"build.max_seq_len={cfg.build.max_seq_len}: raise build.max_seq_len or shorten the workload"
        )
    return problems


def _benchmark_problems(bench: BenchmarkConfig) -> list[str]:
    problems = []
    if any(c < 1 for c in bench.concurrency) or any(r <= 0 for r in bench.rates):
        problems.append("benchmark.concurrency values must be >= 1 and benchmark.rates > 0")
    if bench.enabled and not (bench.concurrency or bench.rates):
        problems.append("benchmark.concurrency and benchmark.rates are both empty: give one, or benchmark=none")
    if bench.requests_per_point < 1:
        problems.append("benchmark.requests_per_point must be at least 1")
    return problems


def _triton_problems(cfg: PipelineConfig) -> list[str]:
    triton, engine_batch = cfg.triton, cfg.build.batch
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
    if not 0 < cfg.kv_cache_fraction <= 1:
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
    if not 1 <= triton.cpu_max_num_tokens <= cfg.build.tokens:
        problems.append(
            f"triton.cpu_max_num_tokens={triton.cpu_max_num_tokens} must lie in 1..{cfg.build.tokens} "
            "(build.max_num_tokens)"
        )
    if triton.cpu_context_chunk_tokens < 1:  # above cpu_max_num_tokens it is that budget
        problems.append(f"triton.cpu_context_chunk_tokens={triton.cpu_context_chunk_tokens} must be at least 1")
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
    if build.batch < 1 or build.tokens < 1 or build.max_beam_width < 1:
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
    if dataset in (calibration.BUILTIN, "cnn_dailymail"):
        return problems
    path = Path(dataset).expanduser()
    if path.suffix not in (".txt", ".jsonl") or not path.is_file():
        problems.append(
            f"quant.calib.dataset={dataset} is not a .txt or .jsonl file: use builtin, cnn_dailymail or such a file"
        )
    elif path.suffix == ".jsonl":
        problems += _file_problems(path, "quant.calib.dataset", ("text",))
    return problems


def _file_problems(path: Path, setting: str, keys: tuple[str, ...]) -> list[str]:
    try:
        textfiles.jsonl_rows(path, setting, keys)
    except ConfigError as error:
        return [str(error)]
    return []
