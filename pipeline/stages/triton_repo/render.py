"""Rendering the Triton model repository from the templates in ``model_repo/`` (pure functions).

Rendering is strict, unlike upstream's filler that leaves unknown ``${...}`` in place for Triton to
choke on: a placeholder without a value, or a value the template never asks for, is an error, and
every rendered ``config.pbtxt`` is parsed into Triton's ``ModelConfig`` protobuf before it is
written. Paths inside the repository are relative to its root (python models resolve them against
it; ``serve`` starts the server there), so the folder can be moved to another host.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from pipeline.artifacts import ENGINE_MODEL, REPO_ENGINE_DIR, REPO_TOKENIZER_DIR, REPO_XGRAMMAR_INFO
from pipeline.assets import RUNTIME_DIR, TEMPLATES_DIR
from pipeline.config.schema import CpuBatching, Expose, PipelineConfig
from pipeline.errors import StageError

PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
CPU_QUEUE_DELAY_US = 50_000


def models(cfg: PipelineConfig) -> list[str]:
    names = ["preprocessing", ENGINE_MODEL, "postprocessing"]
    if cfg.triton.expose in (Expose.ensemble, Expose.both):
        names.append("ensemble")
    if cfg.triton.expose in (Expose.bls, Expose.both):
        names.append("tensorrt_llm_bls")
    return names


def entry_model(cfg: PipelineConfig) -> str:
    """The model clients talk to."""
    return "tensorrt_llm_bls" if cfg.triton.expose is Expose.bls else "ensemble"


def _flag(value: bool) -> str:
    return "true" if value else "false"


def kv_cache_reuse(cfg: PipelineConfig) -> bool:
    """Reuse of KV cache blocks across requests that share a prefix. Null: on when prompts are
    wrapped in the chat template (they share its system prefix); it needs paged context FMHA in
    the engine."""
    wanted = cfg.triton.enable_kv_cache_reuse
    if wanted is None:
        wanted = cfg.triton.chat_template
    return wanted and cfg.build.use_paged_context_fmha


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
        "kv_cache_free_gpu_mem_fraction": str(triton.kv_cache_free_gpu_mem_fraction),
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
            "tokens_per_block": str(cfg.build.tokens_per_block),
            # guided decoding through xgrammar with the repository's tokenizer, as the GPU backend names it
            "guided_decoding_backend": "xgrammar" if triton.guided_decoding else "",
            "tokenizer_dir": REPO_TOKENIZER_DIR,
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
    }


def _parameters_block(params: dict[str, str]) -> str:
    return "\n".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items())


QUEUE_PER_BATCH = 4  # the default queue bound, in batches: a burst waits, a flood is refused


def queue_size(cfg: PipelineConfig) -> int:
    """The engine model's queue bound (triton.max_queue_size; null: 4 batches, 0: no bound)."""
    size = cfg.triton.max_queue_size
    return QUEUE_PER_BATCH * cfg.build.max_batch_size if size is None else size


def values(cfg: PipelineConfig) -> dict[str, str]:
    """Every placeholder of every template, from the config."""
    triton, build = cfg.triton, cfg.build
    batch = build.max_batch_size
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
        # would; postprocessing is fed only by the engine's admitted requests, and a bound there
        # must never cut a stream, so it gets room for several steps of every running sequence
        "preprocessing_queue_size": str(in_flight),
        "postprocessing_queue_size": str(QUEUE_PER_BATCH * in_flight),
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
        where = f"model_repo/{model}/config.pbtxt"
        text = render((TEMPLATES_DIR / model / "config.pbtxt").read_text(), fills, where)
        parsed = parse(text, where)
        if parsed.name != model:
            raise StageError(f"{where} names its model {parsed.name!r}, not {model!r}")
        configs[model] = text
    return configs


def code_files(cfg: PipelineConfig) -> dict[str, Path]:
    """Repository-relative path -> source file of every python model file to copy in."""
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
        digest.update((TEMPLATES_DIR / model / "config.pbtxt").read_bytes())
    for rel, source in sorted(code_files(cfg).items()):
        digest.update(rel.encode() + source.read_bytes())
    return digest.hexdigest()[:16]
