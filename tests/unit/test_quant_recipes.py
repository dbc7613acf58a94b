"""ModelOpt presets, customised for the AWQ group size and the KV cache, in both shapes ModelOpt has
used: the list of entries of the installed ModelOpt (0.4x) and the dict of patterns of the ModelOpt
that TensorRT-LLM 1.1/1.2 pin (0.3x, written out below as 0.37.0 ships it)."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline import validate
from pipeline.config import schema
from pipeline.stages.quantize import recipes

_DISABLED = {"*lm_head*": {"enable": False}, "default": {"enable": False}}
# The dict-shaped presets of nvidia-modelopt 0.37.0 (modelopt/torch/quantization/config.py), trimmed
# to the keys that matter here.
DICT_PRESETS: dict[str, dict[str, Any]] = {
    "FP8_DEFAULT_CFG": {
        "quant_cfg": {
            "*weight_quantizer": {"num_bits": (4, 3), "axis": None},
            "*input_quantizer": {"num_bits": (4, 3), "axis": None},
            **_DISABLED,
        },
        "algorithm": "max",
    },
    "INT4_AWQ_CFG": {
        "quant_cfg": {
            "*weight_quantizer": {"num_bits": 4, "block_sizes": {-1: 128, "type": "static"}, "enable": True},
            "*input_quantizer": {"enable": False},
            **_DISABLED,
        },
        "algorithm": {"method": "awq_lite", "alpha_step": 0.1},
    },
    "W4A8_AWQ_BETA_CFG": {
        "quant_cfg": {
            "*weight_quantizer": [
                {"num_bits": 4, "block_sizes": {-1: 128, "type": "static"}, "enable": True},
                {"num_bits": (4, 3), "axis": None, "enable": True},
            ],
            "*input_quantizer": {"num_bits": (4, 3), "axis": None, "enable": True},
            **_DISABLED,
        },
        "algorithm": "awq_lite",
    },
}


def _quant(*overrides: str) -> schema.QuantConfig:
    return validate.load(["model=llama8b", *overrides]).quant


@pytest.mark.parametrize("fmt", ["int4_awq", "w4a8_awq"])
def test_awq_group_size_and_kv_cache_in_the_dict_schema(fmt: str) -> None:
    quant = _quant(f"quant={fmt}", "quant.awq_block_size=64", "quant.kv_cache_dtype=fp8")
    preset = DICT_PRESETS[recipes.MODELOPT_PRESET[quant.format]]
    result = recipes.customize(preset, quant)
    weight = result["quant_cfg"]["*weight_quantizer"]
    stages = weight if isinstance(weight, list) else [weight]
    assert stages[0]["block_sizes"] == {-1: 64, "type": "static"}
    assert result["quant_cfg"]["*[kv]_bmm_quantizer"] == {"num_bits": (4, 3), "axis": None, "enable": True}
    assert preset["quant_cfg"]["*weight_quantizer"] is not weight  # the preset itself is untouched
    assert "*[kv]_bmm_quantizer" not in preset["quant_cfg"]


def test_int8_kv_cache_in_the_dict_schema() -> None:
    result = recipes.customize(DICT_PRESETS["FP8_DEFAULT_CFG"], _quant("quant=fp8", "quant.kv_cache_dtype=int8"))
    assert result["quant_cfg"]["*[kv]_bmm_quantizer"]["num_bits"] == 8


@pytest.mark.parametrize("fmt", ["fp8", "int4_awq", "w4a8_awq", "int8_sq", "nvfp4"])
def test_installed_modelopt_list_schema(fmt: str) -> None:
    quant = _quant(f"quant={fmt}", "quant.awq_block_size=64", "quant.kv_cache_dtype=fp8")
    result = recipes.modelopt_config(quant)
    entries = result["quant_cfg"]
    assert isinstance(entries, list), "the installed ModelOpt (0.47) uses the list schema"
    assert entries[-1] == {
        "quantizer_name": "*[kv]_bmm_quantizer",
        "cfg": {"num_bits": (4, 3), "axis": None, "enable": True},
    }
    if fmt in ("int4_awq", "w4a8_awq"):
        weight = next(e for e in entries if e.get("quantizer_name") == "*weight_quantizer" and "cfg" in e)
        stages = weight["cfg"] if isinstance(weight["cfg"], list) else [weight["cfg"]]
        assert stages[0]["block_sizes"][-1] == 64
