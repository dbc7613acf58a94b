"""The Dockerfile's container pin agrees with the TensorRT-LLM line the project supports."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline import trtllm

DOCKERFILE = (Path(__file__).parents[2] / "Dockerfile").read_text()


def test_base_image_is_the_pinned_triton_trtllm_release() -> None:
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE, re.MULTILINE)
    assert base and base.group(1) == f"nvcr.io/nvidia/tritonserver:{trtllm.CONTAINER_TAG}-trtllm-python-py3"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", DOCKERFILE, re.MULTILINE)


def test_image_build_checks_the_same_tensorrt_llm_range_as_the_project() -> None:
    low, high = (tuple(int(p) for p in bound.split(".")) for bound in re.findall(r"[\d.]+", trtllm.SUPPORTED))
    assert f"{low} <= v < {high}" in DOCKERFILE


def test_entry_point_and_volumes() -> None:
    assert 'ENTRYPOINT ["python3", "-m", "pipeline"]' in DOCKERFILE
    assert 'VOLUME ["/workdir", "/cache/huggingface"]' in DOCKERFILE
    for folder in ("pipeline", "conf", "model_repo"):
        assert f"COPY {folder} ./{folder}" in DOCKERFILE
