"""Where the files this project ships live: config groups, Triton model templates, built-in text
and reference tables. One place, so moving a folder changes one line."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
PROJECT = PACKAGE.parent  # the source checkout (editable install); git commit is read here
CONF_DIR = PROJECT / "conf"  # Hydra config groups
TEMPLATES_DIR = PROJECT / "model_repo"  # Triton config.pbtxt templates and python models
RUNTIME_DIR = PACKAGE / "runtime"  # the reference runtime, copied into CPU repositories
DATA_DIR = PACKAGE / "data"
CALIBRATION_TEXT = DATA_DIR / "calibration.txt"  # quant.calib.dataset=builtin
HELDOUT_TEXT = DATA_DIR / "heldout.txt"  # quality scoring and benchmark prompts; never calibrated on
CAPITALS = DATA_DIR / "capitals.txt"  # the pipeline_capitals evaluation task (stages/evaluate/tasks.py)
TRTLLM_BUILD_FLAGS = DATA_DIR / "trtllm_build_flags.json"  # trtllm-build's flags in TensorRT-LLM 1.2.x
