"""Our quant formats -> ModelOpt's own preset configs (with block size and KV cache settings), and
what TensorRT-LLM's checkpoint ``config.json`` must then say. ModelOpt does the quantizing and the
exporting; this module only chooses its inputs."""

from __future__ import annotations

import copy
from typing import Any

from pipeline.config import KVCacheDType, QuantConfig, QuantFormat

MODELOPT_PRESET = {
    QuantFormat.fp8: "FP8_DEFAULT_CFG",
    QuantFormat.int4_awq: "INT4_AWQ_CFG",
    QuantFormat.w4a8_awq: "W4A8_AWQ_BETA_CFG",
    QuantFormat.int8_sq: "INT8_SMOOTHQUANT_CFG",
    QuantFormat.nvfp4: "NVFP4_DEFAULT_CFG",
}
# The checkpoint's quantization.quant_algo / kv_cache_quant_algo for each choice.
QUANT_ALGO = {
    QuantFormat.none: None,
    QuantFormat.fp8: "FP8",
    QuantFormat.int4_awq: "W4A16_AWQ",
    QuantFormat.w4a8_awq: "W4A8_AWQ",
    QuantFormat.int8_sq: "W8A8_SQ_PER_CHANNEL",
    QuantFormat.nvfp4: "NVFP4",
}
KV_CACHE_ALGO = {None: None, KVCacheDType.fp8: "FP8", KVCacheDType.int8: "INT8"}
AWQ_FORMATS = (QuantFormat.int4_awq, QuantFormat.w4a8_awq)
# Hugging Face architecture -> ModelOpt/TensorRT-LLM decoder type
DECODER_TYPE = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen",
    "Qwen3ForCausalLM": "qwen",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Phi3ForCausalLM": "phi3",
}


def _kv_cache_entry(kv: KVCacheDType) -> dict[str, Any]:
    bits: int | tuple[int, int] = (4, 3) if kv is KVCacheDType.fp8 else 8
    return {"quantizer_name": "*[kv]_bmm_quantizer", "cfg": {"num_bits": bits, "axis": None}}


def modelopt_config(quant: QuantConfig) -> dict[str, Any]:
    """The ``mtq.quantize`` config: ModelOpt's preset, AWQ group size set, KV cache quantizers added."""
    import modelopt.torch.quantization as mtq

    config = copy.deepcopy(getattr(mtq, MODELOPT_PRESET[quant.format]))
    for entry in config["quant_cfg"]:
        if quant.format in AWQ_FORMATS and entry.get("quantizer_name") == "*weight_quantizer" and "cfg" in entry:
            stages = entry["cfg"] if isinstance(entry["cfg"], list) else [entry["cfg"]]
            for stage in stages:  # W4A8 has an INT4 stage (grouped) and an FP8 stage (not)
                if "block_sizes" in stage:
                    stage["block_sizes"][-1] = quant.awq_block_size
    if quant.kv_cache_dtype is not None:
        config["quant_cfg"].append(_kv_cache_entry(quant.kv_cache_dtype))
    return config


def expected_quantization(quant: QuantConfig) -> dict[str, Any]:
    """What the exported checkpoint's ``quantization`` section must contain."""
    expected: dict[str, Any] = {
        "quant_algo": QUANT_ALGO[quant.format],
        "kv_cache_quant_algo": KV_CACHE_ALGO[quant.kv_cache_dtype],
    }
    if quant.format in AWQ_FORMATS:
        expected["group_size"] = quant.awq_block_size
    return expected


def decoder_type(architectures: list[str] | None) -> str:
    for name in architectures or []:
        if name in DECODER_TYPE:
            return DECODER_TYPE[name]
    from pipeline.errors import ConfigError

    raise ConfigError(
        f"no TensorRT-LLM export for architecture {architectures}: supported are {', '.join(sorted(DECODER_TYPE))}"
    )
