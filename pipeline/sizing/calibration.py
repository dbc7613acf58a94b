"""How much calibration text: unset ``quant.calib`` values are chosen for the model's size.

Small models (under 1B parameters, the CPU demo) get 16 samples of 256 tokens (AWQ: 8):
fake-quantized forward passes are slow on a CPU, and 16 windows already cover the ~1,400-token
built-in text three times over. Larger models get NVIDIA's defaults, 512 samples of 512 tokens
(AWQ: 32). The text itself is read by the quantize stage (``stages/quantize/calib_data.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config.schema import Architecture, PipelineConfig

BUILTIN = "builtin"  # quant.calib.dataset: the text shipped in pipeline/data
SMALL_MODEL_PARAMS = 1e9


@dataclass(frozen=True)
class CalibrationSizes:
    dataset: str
    num_samples: int
    max_length: int
    batch_size: int


def is_small(arch: Architecture) -> bool:
    """Small enough for CPU-friendly calibration and the float32 faithfulness check."""
    params = arch.approx_params
    return params is not None and params < SMALL_MODEL_PARAMS


def calibration_sizes(cfg: PipelineConfig) -> CalibrationSizes:
    calib, small = cfg.quant.calib, is_small(cfg.model.arch)
    awq = cfg.quant.format.is_awq
    default_samples = (8 if awq else 16) if small else (32 if awq else 512)
    return CalibrationSizes(
        dataset=calib.dataset or cfg.model.calib_dataset,
        num_samples=calib.num_samples or default_samples,
        max_length=calib.max_length or (256 if small else 512),
        batch_size=calib.batch_size,
    )
