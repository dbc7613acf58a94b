"""The PyTorch backend's serving arguments (TensorRT-LLM >= 1.3, ``backend=pytorch``), pure functions.

There is no engine to build on this path: ``tensorrt_llm.LLM`` loads ModelOpt's unified checkpoint
and takes its limits, parallelism and KV cache settings as arguments. The same arguments reach it
three ways, all generated here from one dict: Triton's LLM-API model reads them from ``model.yaml``,
``trtllm-serve`` from its ``--extra_llm_api_options`` file, and the engine stage records them.

Every name written is checked against the LLM API's argument names of the pinned version
(``TorchLlmArgs`` in ``tensorrt_llm/llmapi/llm_args.py``), so a renamed argument fails a test here
rather than a model load on a GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.config.schema import PipelineConfig, SchedulerPolicy
from pipeline.sizing import adapters

PINNED = "1.3"  # the release line these names were checked against
# the line whose LLM API, model.yaml and Triton LLM-API model this path was written to (the
# Dockerfile's BACKEND=pytorch check refuses older images with the same floor)
MIN_VERSION = (1, 3)
# LLM(...) arguments this pipeline writes, and the fields of the nested configs it fills, as the
# pinned version names them
LLM_ARGS = {
    "model",
    "backend",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "max_batch_size",
    "max_num_tokens",
    "max_seq_len",
    "max_input_len",
    "max_beam_width",
    "trust_remote_code",
    "kv_cache_config",
    "enable_chunked_prefill",
    "scheduler_config",
    "cuda_graph_config",
    "guided_decoding_backend",
    "lora_config",
}
NESTED_ARGS = {
    "kv_cache_config": {"free_gpu_memory_fraction", "enable_block_reuse", "max_tokens", "tokens_per_block", "dtype"},
    "scheduler_config": {"capacity_scheduler_policy"},
    "cuda_graph_config": {"enable_padding", "max_batch_size"},
    "lora_config": {"max_lora_rank", "max_loras", "max_cpu_loras", "lora_target_modules"},
}
CAPACITY_POLICY = {
    SchedulerPolicy.guaranteed_no_evict: "GUARANTEED_NO_EVICT",
    SchedulerPolicy.max_utilization: "MAX_UTILIZATION",
}
# trtllm-serve's flags (its click options) this pipeline may pass, of the pinned version
TRTLLM_SERVE_FLAGS = {
    "--backend",
    "--host",
    "--port",
    "--tp_size",
    "--pp_size",
    "--max_batch_size",
    "--max_num_tokens",
    "--max_seq_len",
    "--max_beam_width",
    "--kv_cache_free_gpu_memory_fraction",
    "--trust_remote_code",
    "--extra_llm_api_options",
}
OPTIONS_FILE = "llm_api_options.yaml"  # in the engine stage's folder: trtllm-serve's --extra_llm_api_options


def options(cfg: PipelineConfig) -> dict[str, Any]:
    """``LLM(**options)`` without ``model`` (each launcher says where the checkpoint is)."""
    build, triton = cfg.build, cfg.triton
    kv_cache: dict[str, Any] = {
        "free_gpu_memory_fraction": cfg.kv_cache_fraction,
        "enable_block_reuse": cfg.prefix_reuse,
        "tokens_per_block": build.tokens_per_block,
    }
    if triton.max_tokens_in_paged_kv_cache is not None:
        kv_cache["max_tokens"] = triton.max_tokens_in_paged_kv_cache
    chosen: dict[str, Any] = {
        "backend": "pytorch",
        "tensor_parallel_size": cfg.parallel.tp,
        "pipeline_parallel_size": cfg.parallel.pp,
        "max_batch_size": build.batch,
        "max_num_tokens": build.tokens,
        "max_seq_len": build.max_seq_len,
        "max_input_len": build.max_input_len,
        "max_beam_width": build.max_beam_width,
        "trust_remote_code": cfg.model.trust_remote_code,
        "kv_cache_config": kv_cache,
        "enable_chunked_prefill": triton.enable_chunked_context,
        "scheduler_config": {"capacity_scheduler_policy": CAPACITY_POLICY[triton.batch_scheduler_policy]},
    }
    if build.cuda_graphs:  # decode steps replayed as CUDA graphs, padded up to a captured batch size
        chosen["cuda_graph_config"] = {"enable_padding": True, "max_batch_size": build.batch}
    if triton.guided_decoding:
        chosen["guided_decoding_backend"] = "xgrammar"
    if cfg.lora.adapters:
        # requests name their adapter (LoRARequest: name, id, path); these bound what they may bring
        # (tensorrt_llm/lora_helper.py's LoraConfig): max_loras on the GPU at once, max_cpu_loras in host memory
        chosen["lora_config"] = {
            "max_lora_rank": cfg.lora.max_rank,
            "max_loras": cfg.lora.cache_adapters,
            "max_cpu_loras": max(cfg.lora.cache_adapters, len(cfg.lora.adapters)),
            "lora_target_modules": adapters.backend_modules(cfg),
        }
    return chosen


def unknown_names(chosen: dict[str, Any]) -> list[str]:
    """Names in ``chosen`` that the pinned version's LLM API does not take."""
    unknown = [name for name in chosen if name not in LLM_ARGS]
    for name, fields in NESTED_ARGS.items():
        unknown += [f"{name}.{field}" for field in chosen.get(name) or {} if field not in fields]
    return unknown


def options_yaml(chosen: dict[str, Any]) -> str:
    return yaml.safe_dump(chosen, sort_keys=False)


def trtllm_serve_argv(cfg: PipelineConfig, checkpoint: Path, options_file: Path, host: str, port: int) -> list[str]:
    """``trtllm-serve`` on the checkpoint: parallelism and address as flags, every other argument
    from the options file (which overrides flags it shares with them)."""
    return [
        "trtllm-serve",
        str(checkpoint),
        "--backend",
        "pytorch",
        "--host",
        host,
        "--port",
        str(port),
        "--tp_size",
        str(cfg.parallel.tp),
        "--pp_size",
        str(cfg.parallel.pp),
        "--extra_llm_api_options",
        str(options_file),
    ]


def version_problem(version: str | None) -> str | None:
    """The installed TensorRT-LLM against what the PyTorch backend path needs."""
    fix = "use the TensorRT-LLM >= 1.3 container (see the Dockerfile), or target=cpu"
    if version is None:
        return f"backend=pytorch needs the tensorrt_llm package: {fix}"
    try:
        release = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return None  # a development build: let the LLM API judge
    if release < MIN_VERSION:
        return f"TensorRT-LLM {version} predates the PyTorch backend path this pipeline serves (1.3): {fix}"
    return None
