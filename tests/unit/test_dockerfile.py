"""The Dockerfile agrees with the TensorRT-LLM lines the project supports, keeps the container's
own packages (TensorRT-LLM's pins, ModelOpt included), fails on a dependency conflict, and runs the
pipeline under an init."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from pipeline.stages.engine import trtllm

ROOT = Path(__file__).parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_base_image_is_the_pinned_triton_trtllm_release() -> None:
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE, re.MULTILINE)
    assert base and base.group(1) == f"nvcr.io/nvidia/tritonserver:{trtllm.CONTAINER_TAG}-trtllm-python-py3"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", DOCKERFILE, re.MULTILINE)


def test_image_build_checks_the_same_tensorrt_llm_range_as_the_project() -> None:
    low, high = trtllm.SUPPORTED_RANGE
    assert f"{low} <= v < {high}" in DOCKERFILE
    assert "import tensorrt_llm; print(tensorrt_llm.__version__)" in DOCKERFILE  # how to check an image


def test_container_packages_are_kept_and_conflicts_fail_the_build() -> None:
    install = DOCKERFILE[DOCKERFILE.index("RUN pip list") :].split("\n\n")[0]
    assert "pip list --format=freeze > /tmp/container-packages.txt" in install
    assert "--constraint /tmp/container-packages.txt" in install
    # a conflict the install introduced fails the build; the container's own are taken first
    assert "(pip check > /tmp/conflicts-before.txt || true)" in install.split("pip install")[0]
    assert install.rstrip().endswith("grep -vxF -f /tmp/conflicts-before.txt")
    assert "modelopt" not in install  # TensorRT-LLM's own pin stays


def test_base_dependencies_fit_the_container() -> None:
    """`pip check` in the image checks this package's requirements too: the CPU target's
    tritonserver wheel must not be one, and ModelOpt must admit the version TensorRT-LLM pins."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[<>=\[ ]", dep)[0] for dep in project["dependencies"]]
    assert "nvidia-pytriton" not in names
    assert "nvidia-pytriton==0.7.0" in project["optional-dependencies"]["cpu"]
    modelopt = next(dep for dep in project["dependencies"] if dep.startswith("nvidia-modelopt"))
    assert modelopt.split(",")[0].split("#")[0].strip() == "nvidia-modelopt>=0.37"


def test_entry_point_runs_under_an_init_and_volumes() -> None:
    assert 'ENTRYPOINT ["tini", "--", "python3", "-m", "pipeline"]' in DOCKERFILE
    assert 'VOLUME ["/workdir", "/cache/huggingface"]' in DOCKERFILE
    for folder in ("pipeline", "conf", "model_repo"):
        assert f"COPY {folder} ./{folder}" in DOCKERFILE


# what the TensorRT-LLM container already has, in the versions TensorRT-LLM pins (kept as they are)
FROM_THE_CONTAINER = {
    "huggingface_hub",
    "transformers",
    "safetensors",
    "torch",
    "accelerate",
    "nvidia-modelopt",
    "numpy",
}


def test_every_dependency_is_in_the_image() -> None:
    """A package the pipeline imports and the container lacks is installed in the image: the
    OpenAI gateway's FastAPI and uvicorn included."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    install = DOCKERFILE[DOCKERFILE.index("RUN pip list") :].split("\n\n")[0]
    for dep in project["dependencies"]:
        name = re.split(r"[<>=\[ ]", dep)[0]
        if name not in FROM_THE_CONTAINER:
            assert f'"{name}' in install or f" {name} " in install, f"{name} is not installed in the image"


def test_the_image_exposes_triton_and_the_openai_api() -> None:
    assert "EXPOSE 8000 8001 8002 9000" in DOCKERFILE


def test_a_pytorch_image_needs_tensorrt_llm_1_3_and_carries_upstreams_llmapi_model_at_that_version() -> None:
    from pipeline.stages.triton_repo import render

    assert re.search(r"^ARG BACKEND=tensorrt$", DOCKERFILE, re.MULTILINE)
    assert "v >= (1, 3)" in DOCKERFILE and '--branch "v$v"' in DOCKERFILE
    assert "sparse-checkout set triton_backend/all_models/llmapi" in DOCKERFILE
    env = re.search(rf"^ENV {render.LLMAPI_MODEL_DIR_ENV}=(\S+)$", DOCKERFILE, re.MULTILINE)
    assert env and env.group(1).endswith("/tensorrt_llm/1")
    assert all(f'$PIPELINE_LLMAPI_MODEL_DIR/{name}"' in DOCKERFILE for name in render.UPSTREAM_LLMAPI_FILES)
