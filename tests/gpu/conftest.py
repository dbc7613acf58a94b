"""GPU tests run where TensorRT-LLM and an NVIDIA GPU exist (the NGC container). Elsewhere they skip;
PIPELINE_REQUIRE_GPU=1 turns that skip into a failure, so a GPU CI job cannot pass by skipping."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest


def _missing(needs_build: bool) -> str | None:
    if importlib.util.find_spec("tensorrt_llm") is None:
        return "tensorrt_llm is not installed (run inside the TensorRT-LLM container: see the Dockerfile)"
    if needs_build and shutil.which("trtllm-build") is None:
        return "trtllm-build is not on PATH"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU visible"
    return None


@pytest.fixture(autouse=True)
def _needs_tensorrt_llm_and_gpu(request: pytest.FixtureRequest) -> None:
    reason = _missing(needs_build=request.node.get_closest_marker("no_build") is None)
    if reason is None:
        return
    if os.environ.get("PIPELINE_REQUIRE_GPU") == "1":
        pytest.fail(f"PIPELINE_REQUIRE_GPU=1 but {reason}")
    pytest.skip(reason)
