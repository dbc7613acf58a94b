"""Our quant formats -> ModelOpt's own preset configs (with block size and KV cache settings), and
what TensorRT-LLM's checkpoint ``config.json`` must then say. ModelOpt does the quantizing and the
exporting; this module only chooses its inputs."""

from __future__ import annotations

import copy
from typing import Any

from pipeline.config.schema import KVCacheDType, QuantConfig, QuantFormat
from pipeline.errors import ConfigError
from pipeline.sizing.rules import DECODER_TYPE

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


KV_CACHE_QUANTIZERS = "*[kv]_bmm_quantizer"


def _kv_cache_cfg(kv: KVCacheDType) -> dict[str, Any]:
    bits: int | tuple[int, int] = (4, 3) if kv is KVCacheDType.fp8 else 8
    return {"num_bits": bits, "axis": None, "enable": True}


def _set_awq_block_size(weight_cfg: dict[str, Any] | list[dict[str, Any]], block: int) -> None:
    stages = weight_cfg if isinstance(weight_cfg, list) else [weight_cfg]
    for stage in stages:  # W4A8 has an INT4 stage (grouped) and an FP8 stage (not)
        if "block_sizes" in stage:
            stage["block_sizes"][-1] = block


def customize(preset: dict[str, Any], quant: QuantConfig) -> dict[str, Any]:
    """A copy of ModelOpt's preset with the AWQ group size set and KV cache quantizers added.

    ModelOpt changed the shape of ``quant_cfg``: up to 0.3x (what TensorRT-LLM 1.1/1.2 pin) it is a
    dict of pattern -> settings; 0.4x made it an ordered list of ``{"quantizer_name", "cfg" |
    "enable"}`` entries. Both are handled, so the quantize stage runs with the container's own
    ModelOpt as well as with the version this project tests on."""
    config = copy.deepcopy(preset)
    rules = config["quant_cfg"]
    awq = quant.format.is_awq
    if isinstance(rules, dict):
        if awq and "*weight_quantizer" in rules:
            _set_awq_block_size(rules["*weight_quantizer"], quant.awq_block_size)
        if quant.kv_cache_dtype is not None:
            rules[KV_CACHE_QUANTIZERS] = _kv_cache_cfg(quant.kv_cache_dtype)
        return config
    for entry in rules:
        if awq and entry.get("quantizer_name") == "*weight_quantizer" and "cfg" in entry:
            _set_awq_block_size(entry["cfg"], quant.awq_block_size)
    if quant.kv_cache_dtype is not None:
        rules.append({"quantizer_name": KV_CACHE_QUANTIZERS, "cfg": _kv_cache_cfg(quant.kv_cache_dtype)})
    return config


def modelopt_config(quant: QuantConfig) -> dict[str, Any]:
    """The ``mtq.quantize`` config for this format, from the installed ModelOpt's own preset."""
    import modelopt.torch.quantization as mtq

    return customize(getattr(mtq, MODELOPT_PRESET[quant.format]), quant)


def expected_quantization(quant: QuantConfig) -> dict[str, Any]:
    """What the exported checkpoint's ``quantization`` section must contain."""
    expected: dict[str, Any] = {
        "quant_algo": QUANT_ALGO[quant.format],
        "kv_cache_quant_algo": KV_CACHE_ALGO[quant.kv_cache_dtype],
    }
    if quant.format.is_awq:
        expected["group_size"] = quant.awq_block_size
    return expected


def decoder_type(architectures: list[str] | None) -> str:
    for name in architectures or []:
        if name in DECODER_TYPE:
            return DECODER_TYPE[name]
    raise ConfigError(
        f"no TensorRT-LLM export for architecture {architectures}: supported are {', '.join(sorted(DECODER_TYPE))}"
    )
