"""Rendering the Triton model repository from the templates in ``model_repo/`` (pure functions).

Rendering is strict, unlike upstream's filler that leaves unknown ``${...}`` in place for Triton to
choke on: a placeholder without a value, or a value the template never asks for, is an error, and
every rendered ``config.pbtxt`` is parsed into Triton's ``ModelConfig`` protobuf before it is
written. Paths inside the repository are relative to its root (python models resolve them against
it; ``serve`` starts the server there), so the folder can be moved to another host.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from pipeline.artifacts import (
    ENGINE_MODEL,
    REPO_CHECKPOINT_DIR,
    REPO_ENGINE_DIR,
    REPO_LORA_PREFETCH_DIR,
    REPO_TOKENIZER_DIR,
    REPO_XGRAMMAR_INFO,
)
from pipeline.assets import RUNTIME_DIR, TEMPLATES_DIR
from pipeline.config.schema import Backend, CpuBatching, Expose, PipelineConfig
from pipeline.deploy import llmapi
from pipeline.errors import StageError
from pipeline.sizing import adapters as adapters_sizing

LORA_GPU_FRACTION = 0.05  # the backend's default share of free GPU memory for the LoRA cache
LORA_HOST_BYTES = 2**30  # the backend's default host LoRA cache
PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
CPU_QUEUE_DELAY_US = 50_000
LLMAPI_TEMPLATES = TEMPLATES_DIR / "llmapi"  # backend=pytorch: upstream's one-model LLM-API layout
# files of upstream's LLM-API model that GPU repositories copy from TensorRT-LLM's triton_backend
UPSTREAM_LLMAPI_FILES = ("model.py", "helpers.py")
LLMAPI_MODEL_DIR_ENV = "PIPELINE_LLMAPI_MODEL_DIR"


def models(cfg: PipelineConfig) -> list[str]:
    if cfg.backend is Backend.pytorch:
        return [ENGINE_MODEL]
    names = ["preprocessing", ENGINE_MODEL, "postprocessing"]
    if cfg.triton.expose in (Expose.ensemble, Expose.both):
        names.append("ensemble")
    if cfg.triton.expose in (Expose.bls, Expose.both):
        names.append("tensorrt_llm_bls")
    return names


def entry_model(cfg: PipelineConfig) -> str:
    """The model clients talk to."""
    if cfg.backend is Backend.pytorch:
        return ENGINE_MODEL
    return "tensorrt_llm_bls" if cfg.triton.expose is Expose.bls else "ensemble"


def _flag(value: bool) -> str:
    return "true" if value else "false"


def kv_cache_reuse(cfg: PipelineConfig) -> bool:
    """Reuse of KV cache blocks across requests that share a prefix (``cfg.prefix_reuse``), which
    the engine can do only with paged context FMHA."""
    return cfg.prefix_reuse and cfg.build.use_paged_context_fmha


def engine_parameters(cfg: PipelineConfig) -> dict[str, str]:
    """``parameters`` of the engine model. GPU: Triton's TensorRT-LLM backend (names from its
    config); CPU: the reference-runtime python model.

    The backend's C++ reads ``gpt_model_type``, ``tokenizer_dir``, ``guided_decoding_backend`` and
    ``xgrammar_tokenizer_info_path`` with no fallback (model_instance_state.cc) and fails the model
    load with "Cannot find parameter with name" when one is absent, although the docs call the last
    three optional: they are always written, an empty backend meaning "no guided decoding"."""
    triton = cfg.triton
    # what both targets read, under the backend's names
    shared = {
        "batch_scheduler_policy": str(triton.batch_scheduler_policy),
        "kv_cache_free_gpu_mem_fraction": str(cfg.kv_cache_fraction),
        "enable_chunked_context": _flag(triton.enable_chunked_context),
        "enable_kv_cache_reuse": _flag(kv_cache_reuse(cfg)),
        "exclude_input_in_output": _flag(triton.exclude_input_in_output),
        "cancellation_check_period_ms": str(triton.cancellation_check_period_ms),
    }
    if triton.max_tokens_in_paged_kv_cache is not None:
        shared["max_tokens_in_paged_kv_cache"] = str(triton.max_tokens_in_paged_kv_cache)
    if not cfg.target.is_gpu:
        return {
            "engine_dir": REPO_ENGINE_DIR,
            **shared,
            "max_seq_len": str(cfg.build.max_seq_len),  # requests beyond it are refused one by one
            "max_input_len": str(cfg.build.max_input_len),
            "max_beam_width": str(cfg.build.max_beam_width),
            "threads": str(triton.cpu_threads or 0),  # 0: every core but one
            "batching": str(triton.cpu_batching),
            "max_num_tokens": str(triton.cpu_max_num_tokens),
            "context_chunk_tokens": str(triton.cpu_context_chunk_tokens),
            "max_logits_mb": str(triton.cpu_max_logits_mb),
            "tokens_per_block": str(cfg.build.tokens_per_block),
            # guided decoding through xgrammar with the repository's tokenizer, as the GPU backend names it
            "guided_decoding_backend": "xgrammar" if triton.guided_decoding else "",
            "tokenizer_dir": REPO_TOKENIZER_DIR,
            "lora_cache_adapters": str(cfg.lora.cache_adapters),  # adapters kept loaded (LRU)
            **({"lora_prefetch_dir": REPO_LORA_PREFETCH_DIR} if cfg.lora.adapters else {}),
        }
    return {
        "gpt_model_type": str(triton.batching_strategy),
        # relative to the repository root: serve starts every rank there, so the folder can move
        "gpt_model_path": REPO_ENGINE_DIR,
        **shared,
        "max_beam_width": str(cfg.build.max_beam_width),
        "FORCE_CPU_ONLY_INPUT_TENSORS": "no",
        "executor_worker_path": "/opt/tritonserver/backends/tensorrtllm/trtllmExecutorWorker",
        # the C++ backend ignores tokenizer_dir and reads xgrammar's tokenizer info instead
        # (the triton_repo stage writes it; relative to the repository root, where ranks start)
        "tokenizer_dir": "",
        "guided_decoding_backend": "xgrammar" if triton.guided_decoding else "",
        "xgrammar_tokenizer_info_path": REPO_XGRAMMAR_INFO if triton.guided_decoding else "",
        **lora_cache_parameters(cfg),
    }


def lora_cache_parameters(cfg: PipelineConfig) -> dict[str, str]:
    """The GPU backend's LoRA cache (its names, model_instance_state.cc), sized in rank-1 layers:
    a page fits the largest configured adapter's layer (``lora_cache_optimal_adapter_size``) and at
    least one layer of the largest rank the engine takes (``..._max_adapter_size``, the engine's
    max_lora_rank); the host cache holds every configured adapter, the GPU cache the backend's
    default share. Absent without adapters, leaving the backend's defaults."""
    if not cfg.lora.adapters:
        return {}
    ranks = adapters_sizing.ranks(cfg) or [cfg.lora.max_rank]
    host = sum(adapters_sizing.adapter_bytes(cfg))
    return {
        "lora_cache_optimal_adapter_size": str(max(ranks)),
        "lora_cache_max_adapter_size": str(cfg.lora.max_rank),
        "lora_cache_gpu_memory_fraction": str(LORA_GPU_FRACTION),
        # 16-bit values, every adapter at once (Hub adapters count once downloaded), and at least the default
        "lora_cache_host_memory_bytes": str(max(host, LORA_HOST_BYTES)),
        "lora_prefetch_dir": REPO_LORA_PREFETCH_DIR,  # the shipped adapters, loaded when the model starts
    }


def _parameters_block(params: dict[str, str]) -> str:
    return "\n".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items())


QUEUE_PER_BATCH = 4  # the default queue bound, in batches: a burst waits, a flood is refused


def queue_size(cfg: PipelineConfig) -> int:
    """The engine model's queue bound (triton.max_queue_size; null: 4 batches, 0: no bound)."""
    size = cfg.triton.max_queue_size
    return QUEUE_PER_BATCH * cfg.build.batch if size is None else size


# the CPU LLM-API model's guided decoding (xgrammar, as the engine path's): the engine path's inputs
LLMAPI_CPU_GUIDE_INPUTS = "".join(
    f',\n  {{ name: "{name}", data_type: TYPE_STRING, dims: [ 1 ], optional: true }}'
    for name in ("guided_decoding_guide_type", "guided_decoding_guide")
)


def _cpu_guides(cfg: PipelineConfig) -> bool:
    return not cfg.target.is_gpu and cfg.triton.guided_decoding


def llmapi_parameters(cfg: PipelineConfig) -> dict[str, str]:
    """``parameters`` of the LLM-API model. Upstream's GPU model reads none (its settings are in
    model.yaml); the CPU target's adds what only the reference runtime has, and the queue bounds
    that Triton's dynamic batcher would apply on the engine path."""
    if cfg.target.is_gpu:
        return {}
    triton = cfg.triton
    return {
        "threads": str(triton.cpu_threads or 0),  # 0: every core but one
        "max_num_tokens_per_step": str(triton.cpu_max_num_tokens),
        "context_chunk_tokens": str(triton.cpu_context_chunk_tokens),
        "max_queue_size": str(queue_size(cfg)),
        "queue_timeout_ms": str(triton.queue_timeout_ms),
    }


def model_yaml(cfg: PipelineConfig) -> dict[str, Any]:
    """``tensorrt_llm/1/model.yaml``: the LLM API's arguments, with the checkpoint relative to the
    repository root (where serve starts Triton), and the Triton settings upstream's model reads."""
    return {
        "model": REPO_CHECKPOINT_DIR,
        **llmapi.options(cfg),
        "triton_config": {
            "max_batch_size": 0,  # requests are batched inside the LLM API, not by Triton
            "decoupled": cfg.triton.streaming,
            "cancellation_check_period_ms": cfg.triton.cancellation_check_period_ms,
        },
    }


def llmapi_model_dir(cfg: PipelineConfig) -> Path | None:
    """Where GPU repositories copy upstream's LLM-API model.py and helpers.py from: TensorRT-LLM's
    triton_backend/all_models/llmapi/tensorrt_llm/1 at the installed version (the Dockerfile puts it
    there and names it in PIPELINE_LLMAPI_MODEL_DIR)."""
    configured = cfg.triton.llmapi_model_dir or os.environ.get(LLMAPI_MODEL_DIR_ENV)
    return Path(configured).expanduser() if configured else None


def llmapi_model_problem(cfg: PipelineConfig) -> str | None:
    folder = llmapi_model_dir(cfg)
    missing = [name for name in UPSTREAM_LLMAPI_FILES if folder is None or not (folder / name).is_file()]
    if not missing:
        return None
    where = f"in {folder}" if folder else f"(neither triton.llmapi_model_dir nor {LLMAPI_MODEL_DIR_ENV} is set)"
    return (
        f"upstream's LLM-API Triton model ({', '.join(missing)}) is not found {where}: build the Dockerfile "
        "with BACKEND=pytorch, or set triton.llmapi_model_dir to TensorRT-LLM's "
        "triton_backend/all_models/llmapi/tensorrt_llm/1 at the installed version"
    )


def values(cfg: PipelineConfig) -> dict[str, str]:
    """Every placeholder of every template, from the config."""
    if cfg.backend is Backend.pytorch:
        return {
            "decoupled": _flag(cfg.triton.streaming),
            "parameters": _parameters_block(llmapi_parameters(cfg)),
            "extension_inputs": LLMAPI_CPU_GUIDE_INPUTS if _cpu_guides(cfg) else "",
        }
    triton, build = cfg.triton, cfg.build
    batch = build.batch
    # requests the repository holds at once: the engine's batch and its queue (0, no queue bound,
    # still gets one: unbounded thread pools and queues are what a flood must not get)
    in_flight = batch + (queue_size(cfg) or QUEUE_PER_BATCH * batch)
    preferred = triton.preferred_batch_sizes or [batch]
    delay = triton.max_queue_delay_microseconds
    if delay is None:  # in-flight batching admits requests at every step: waiting only adds latency
        inflight = cfg.target.is_gpu or cfg.triton.cpu_batching is CpuBatching.inflight
        delay = 0 if inflight else CPU_QUEUE_DELAY_US
    return {
        "max_batch_size": str(batch),
        "max_queue_delay_microseconds": str(delay),
        "max_queue_size": str(queue_size(cfg)),
        "queue_timeout_us": str(triton.queue_timeout_ms * 1000),
        # preprocessing is where the ensemble's requests wait first: it holds what the engine
        # would (postprocessing has no bound: see its config)
        "preprocessing_queue_size": str(in_flight),
        "preferred_batch_sizes": ", ".join(str(s) for s in preferred),
        "decoupled": _flag(triton.streaming),
        "backend": "tensorrtllm" if cfg.target.is_gpu else "python",
        "parameters": _parameters_block(engine_parameters(cfg)),
        "tokenizer_dir": REPO_TOKENIZER_DIR,
        "add_special_tokens": _flag(triton.add_special_tokens),
        "chat_template": _flag(triton.chat_template),
        "max_input_len": str(build.max_input_len),
        "max_seq_len": str(build.max_seq_len),
        "preprocessing_instances": str(triton.preprocessing_instances),
        "postprocessing_instances": str(triton.postprocessing_instances),
        "bls_instances": str(triton.bls_instances),
        "bls_max_concurrent_requests": str(in_flight),
    }


def render(template: str, fills: dict[str, str], where: str) -> str:
    """Fill every ``${name}``; any name without a value, or a ``${`` left after filling, is an error."""
    missing = sorted({m for m in PLACEHOLDER.findall(template) if m not in fills})
    if missing:
        raise StageError(f"{where} uses {', '.join('${' + m + '}' for m in missing)} with no value: a template bug")
    text = PLACEHOLDER.sub(lambda m: fills[m.group(1)], template)
    if "${" in text:
        raise StageError(f"{where} still holds '${{' after rendering: a malformed placeholder")
    return text


def parse(text: str, where: str) -> Any:
    """Parse a rendered config.pbtxt into Triton's ``ModelConfig`` (as the server will)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as error:
        raise StageError(f"{where} is not a valid Triton model config: {error}") from error


def rendered_configs(cfg: PipelineConfig) -> dict[str, str]:
    """model name -> rendered and parsed config.pbtxt text."""
    fills = values(cfg)
    configs = {}
    for model in models(cfg):
        template = _template_dir(cfg) / model / "config.pbtxt"
        where = str(template.relative_to(TEMPLATES_DIR.parent))
        text = render(template.read_text(), fills, where)
        parsed = parse(text, where)
        if parsed.name != model:
            raise StageError(f"{where} names its model {parsed.name!r}, not {model!r}")
        configs[model] = text
    return configs


def _template_dir(cfg: PipelineConfig) -> Path:
    return LLMAPI_TEMPLATES if cfg.backend is Backend.pytorch else TEMPLATES_DIR


def _llmapi_code_files(cfg: PipelineConfig) -> dict[str, Path]:
    """GPU: upstream's model.py and helpers.py. CPU: the reference runtime's stand-in for them,
    with the engine model's helpers it shares (input parsing, engine gauges)."""
    files = {}
    if cfg.target.is_gpu:  # the triton_repo stage's preflight checks that they are there
        folder = llmapi_model_dir(cfg) or Path(LLMAPI_MODEL_DIR_ENV)
        return {f"{ENGINE_MODEL}/1/{name}": folder / name for name in UPSTREAM_LLMAPI_FILES}
    for source in sorted((LLMAPI_TEMPLATES / ENGINE_MODEL / "1").glob("*.py")):
        files[f"{ENGINE_MODEL}/1/{source.name}"] = source
    for name in ("stats.py", "inputs.py", "failure_codes.py", "guided.py"):
        files[f"{ENGINE_MODEL}/1/{name}"] = TEMPLATES_DIR / ENGINE_MODEL / "1" / name
    for name in sorted(p.name for p in RUNTIME_DIR.glob("*.py")):
        files[f"{ENGINE_MODEL}/1/reference_runtime/{name}"] = RUNTIME_DIR / name
    return files


def code_files(cfg: PipelineConfig) -> dict[str, Path]:
    """Repository-relative path -> source file of every python model file to copy in."""
    if cfg.backend is Backend.pytorch:
        return _llmapi_code_files(cfg)
    files = {}
    for model in models(cfg):
        if model == ENGINE_MODEL and cfg.target.is_gpu:
            continue  # the tensorrtllm backend needs no code
        for source in sorted((TEMPLATES_DIR / model / "1").glob("*.py")):  # model.py and its helpers
            files[f"{model}/1/{source.name}"] = source
    if not cfg.target.is_gpu:
        # the reference runtime travels with the repository (python models never import pipeline)
        for name in sorted(p.name for p in RUNTIME_DIR.glob("*.py")):
            files[f"{ENGINE_MODEL}/1/reference_runtime/{name}"] = RUNTIME_DIR / name
    return files


def templates_digest(cfg: PipelineConfig) -> str:
    """Changes to any template or copied code must re-render the repository."""
    digest = hashlib.sha256()
    for model in models(cfg):
        digest.update((_template_dir(cfg) / model / "config.pbtxt").read_bytes())
    for rel, source in sorted(code_files(cfg).items()):
        digest.update(rel.encode() + (source.read_bytes() if source.is_file() else str(source).encode()))
    return digest.hexdigest()[:16]
