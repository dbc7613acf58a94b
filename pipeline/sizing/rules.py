"""Rules that decide whether a configuration can work, as pure functions of the config (no weights,
no network), each problem phrased with the override that fixes it. Numbers come from
``shared/reference/facts.md``: heads divide by tp, pp at most the layers, AWQ groups divide every
per-rank input dimension, FP8 needs SM >= 89, NVFP4 needs Blackwell; on Blackwell the engine builder
rejects INT4-AWQ, SmoothQuant and an INT8 KV cache (TensorRT-LLM builder.py raises for them on SM
100-119), so they are refused before any quantization work."""

from __future__ import annotations

from pipeline.config.schema import Architecture, Backend, KVCacheDType, PipelineConfig, QuantFormat

# Hugging Face architecture -> the decoder type ModelOpt's TensorRT-LLM export takes for it.
DECODER_TYPE = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen",
    "Qwen3ForCausalLM": "qwen",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Phi3ForCausalLM": "phi3",
}
# What the CPU target's reference runtime executes (transformers' Llama code).
LLAMA_FAMILY = ("LlamaForCausalLM", "MistralForCausalLM")
AWQ_BLOCK_SIZES = (128, 64)
FP8_MIN_SM = 89
NVFP4_MIN_SM = 100
BLACKWELL_SM = range(100, 120)
# The PyTorch backend (TensorRT-LLM >= 1.3): the ModelOpt formats its quantization guide lists for
# pre-quantized checkpoints (no W8A8 SmoothQuant, no INT8 KV cache), on Ampere and newer.
PYTORCH_FORMATS = (QuantFormat.none, QuantFormat.fp8, QuantFormat.nvfp4, QuantFormat.int4_awq, QuantFormat.w4a8_awq)
PYTORCH_MIN_SM = 80
FRONTENDS = ("triton", "trtllm-serve")


def architecture_problems(model_name: str, architectures: list[str] | None, on_gpu: bool) -> list[str]:
    """A model the pipeline cannot export (or, on the CPU target, run) is refused before any
    weights are downloaded. Unknown architectures (null) are checked once config.json is read."""
    if not architectures:
        return []
    if not any(name in DECODER_TYPE for name in architectures):
        return [
            f"{model_name} is a {architectures[0]}, which the TensorRT-LLM export does not support: use a model "
            f"of one of {', '.join(sorted(DECODER_TYPE))}"
        ]
    if not on_gpu and not any(name in LLAMA_FAMILY for name in architectures):
        return [
            f"{model_name} is a {architectures[0]}: the CPU target's reference runtime runs only "
            f"{' and '.join(LLAMA_FAMILY)}: use a GPU target (target=h100, ...) or a Llama-family model"
        ]
    return []


def valid_tp_sizes(arch: Architecture) -> list[int]:
    """Tensor-parallel sizes the model can be split into: heads and the MLP width split evenly,
    and KV heads either split evenly or replicated whole (TensorRT-LLM replicates them)."""
    heads, kv = arch.num_attention_heads, arch.num_key_value_heads or arch.num_attention_heads
    if not heads:
        return []
    sizes = []
    for tp in range(1, heads + 1):
        if heads % tp or (arch.intermediate_size and arch.intermediate_size % tp):
            continue
        if kv and kv % tp and tp % kv:
            continue
        sizes.append(tp)
    return sizes


def awq_input_dims(arch: Architecture, tp: int) -> dict[str, int]:
    """Per-rank input width of every linear layer AWQ quantizes. Column-parallel layers (qkv,
    fc/gate) see the whole hidden size; row-parallel ones (attention dense, mlp proj) a 1/tp slice."""
    dims: dict[str, int] = {}
    if arch.hidden_size:
        dims["hidden size (qkv, mlp fc/gate)"] = arch.hidden_size
    hd = arch.head_size
    if arch.num_attention_heads and hd:
        dims[f"attention output / tp={tp}"] = arch.num_attention_heads * hd // tp
    if arch.intermediate_size:
        dims[f"intermediate size / tp={tp}"] = arch.intermediate_size // tp
    return dims


def awq_block_problems(arch: Architecture, tp: int, block: int) -> list[str]:
    if block not in AWQ_BLOCK_SIZES:
        return [f"quant.awq_block_size={block}: use quant.awq_block_size=128 or 64"]
    dims = awq_input_dims(arch, tp)
    bad = {name: dim for name, dim in dims.items() if dim % block}
    if not bad:
        return []
    working = [b for b in AWQ_BLOCK_SIZES if all(dim % b == 0 for dim in dims.values())]
    detail = ", ".join(f"{name} = {dim}" for name, dim in bad.items())
    fix = f"use quant.awq_block_size={working[0]}" if working else "use another parallel.tp or quant format"
    return [f"quant.awq_block_size={block} does not divide {detail}: {fix}"]


def gpu_format_problems(cfg: PipelineConfig) -> list[str]:
    """Quant formats against the target GPU's architecture (engine path only)."""
    target, quant = cfg.target, cfg.quant
    if not target.is_gpu or target.sm is None:
        return []
    problems = []
    where = f"target={target.name} ({target.gpu or 'GPU'}, SM {target.sm})"
    if quant.format.fp8_activations and target.sm < FP8_MIN_SM:
        problems.append(
            f"quant={quant.format} needs FP8 (SM >= {FP8_MIN_SM}) but {where}: use quant=int4_awq, "
            "quant=int8_sq or a newer target"
        )
    if quant.kv_cache_dtype is KVCacheDType.fp8 and target.sm < FP8_MIN_SM:
        problems.append(
            f"quant.kv_cache_dtype=fp8 needs SM >= {FP8_MIN_SM} but {where}: use quant.kv_cache_dtype=int8 or null"
        )
    if quant.format is QuantFormat.nvfp4 and target.sm < NVFP4_MIN_SM:
        problems.append(f"quant=nvfp4 needs Blackwell (SM >= {NVFP4_MIN_SM}) but {where}: use quant=fp8")
    blackwell_refused = (QuantFormat.int4_awq, QuantFormat.w4a8_awq, QuantFormat.int8_sq)
    engines = cfg.backend is Backend.tensorrt  # the engine builder's refusals
    if engines and quant.format in blackwell_refused and target.sm in BLACKWELL_SM:
        problems.append(
            f"quant={quant.format} engines are not supported on Blackwell ({where}): use quant=nvfp4 or quant=fp8"
        )
    if engines and quant.kv_cache_dtype is KVCacheDType.int8 and target.sm in BLACKWELL_SM:
        problems.append(
            f"quant.kv_cache_dtype=int8 is not supported on Blackwell ({where}): use quant.kv_cache_dtype=fp8 or null"
        )
    return problems


def backend_problems(cfg: PipelineConfig) -> list[str]:
    """What each TensorRT-LLM backend can take: formats, GPUs, frontends and build options."""
    quant, target, frontend = cfg.quant, cfg.target, cfg.serve.frontend
    problems = []
    if frontend not in FRONTENDS:
        problems.append(f"serve.frontend={frontend}: use serve.frontend=triton or serve.frontend=trtllm-serve")
    if cfg.backend is Backend.tensorrt:
        if frontend == "trtllm-serve":
            problems.append(
                "serve.frontend=trtllm-serve serves the PyTorch backend's checkpoint, not engines: "
                "add backend=pytorch, or use serve.frontend=triton"
            )
        return problems
    if quant.format not in PYTORCH_FORMATS:
        problems.append(
            f"quant={quant.format}: the PyTorch backend (backend=pytorch) serves no W8A8 SmoothQuant checkpoint: "
            "use quant=fp8 or quant=int4_awq, or backend=tensorrt (TensorRT-LLM 1.2)"
        )
    if quant.kv_cache_dtype is KVCacheDType.int8:
        problems.append(
            "quant.kv_cache_dtype=int8: the PyTorch backend (backend=pytorch) has FP8 KV caches only: "
            "use quant.kv_cache_dtype=fp8 or null"
        )
    if target.is_gpu and target.sm is not None and target.sm < PYTORCH_MIN_SM:
        problems.append(
            f"backend=pytorch needs Ampere or newer (SM >= {PYTORCH_MIN_SM}) but target={target.name} has SM "
            f"{target.sm}: use backend=tensorrt or a newer target"
        )
    if frontend == "trtllm-serve" and not target.is_gpu:
        problems.append(
            "serve.frontend=trtllm-serve needs TensorRT-LLM on a GPU target: on target=cpu use serve.frontend=triton"
        )
    if cfg.build.extra_args:
        problems.append(
            f"build.extra_args={cfg.build.extra_args} are trtllm-build flags, and backend=pytorch builds no "
            "engine: leave build.extra_args empty"
        )
    return problems


def parallel_problems(cfg: PipelineConfig) -> list[str]:
    arch, tp, pp = cfg.model.arch, cfg.parallel.tp, cfg.parallel.pp
    if tp < 1 or pp < 1:
        return [f"parallel.tp={tp} parallel.pp={pp}: both must be at least 1"]
    problems = []
    sizes = valid_tp_sizes(arch)
    if sizes and tp not in sizes:
        problems.append(
            f"parallel.tp={tp} does not split {cfg.model.name} ({arch.num_attention_heads} attention heads, "
            f"{arch.num_key_value_heads} KV heads, intermediate size {arch.intermediate_size}): "
            f"use parallel.tp={' or '.join(map(str, sizes))}"
        )
    if arch.num_hidden_layers and pp > arch.num_hidden_layers:
        problems.append(
            f"parallel.pp={pp} exceeds the {arch.num_hidden_layers} layers of {cfg.model.name}: "
            f"use parallel.pp<={arch.num_hidden_layers}"
        )
    if cfg.target.nodes != 1:
        # Leader mode across hosts needs one mpirun spanning every pod (hostfile, ssh or PMIx between
        # them); a local mpirun per pod would start separate, unconnected engines.
        problems.append(
            f"target.nodes={cfg.target.nodes}: multi-node serving is not supported yet: use target.nodes=1 with "
            f"parallel.tp x parallel.pp <= {cfg.target.count} (the GPUs of one node), or a quantized format that fits"
        )
    elif cfg.target.is_gpu and cfg.parallel.world_size > cfg.target.count:
        problems.append(
            f"parallel.tp={tp} x parallel.pp={pp} needs {cfg.parallel.world_size} GPUs but target={cfg.target.name} "
            f"has {cfg.target.count}: lower parallel.tp/pp or choose a larger target"
        )
    if cfg.quant.format.is_awq and not problems:
        problems += awq_block_problems(arch, tp, cfg.quant.awq_block_size)
    return problems
