"""What each stage leaves where, and the layout inside a rendered Triton repository. Every module
that reads another stage's output takes the names from here.

Under the workdir (``workspace`` owns ``<stage>/<fingerprint>/`` and its partial and lock files)::

    fetch/<fp>/checkpoint/           Hugging Face checkpoint (safetensors)
    quantize/<fp>/checkpoint/        TensorRT-LLM checkpoint, rank{N}.safetensors
    quantize/<fp>/tokenizer/         the tokenizer, for Triton's pre/postprocessing
    quantize/<fp>/quality.json
    engine/<fp>/engine/              rank{N}.engine (GPU) or the checkpoint (CPU reference runtime)
    engine/<fp>/engine.json
    triton_repo/<fp>/repository/     the Triton model repository (repository.json inside)
    benchmark/<fp>/benchmark.json    and benchmark.csv, the plot, server.log
    plan.json  timing-sm<SM>.cache  triton_backends/  mlflow.db  mlartifacts/
    serve/<fp>/  bench/<time>/  manifests/<fp>/
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINT = "checkpoint"
TOKENIZER = "tokenizer"
QUALITY_JSON = "quality.json"
ENGINE = "engine"
ENGINE_JSON = "engine.json"
BUILD_LOG = "build.log"
STAGE_LOG = "stage.log"
REPOSITORY = "repository"
REPOSITORY_JSON = "repository.json"  # in the stage folder and inside the repository
BENCHMARK_JSON = "benchmark.json"
BENCHMARK_CSV = "benchmark.csv"
PLOT = "latency_throughput.png"
CLIENT_JSON = "client.json"
SERVER_LOG = "server.log"
EVAL_JSON = "eval.json"  # the eval stage: each task's score, standard error, items, chance level
EVAL_ITEMS = "items.jsonl"  # the eval stage: one record per item (prompt, target, answer, score)

# Inside a repository: model names and paths relative to its root (serve starts Triton there).
ENGINE_MODEL = "tensorrt_llm"
REPO_TOKENIZER_DIR = "preprocessing/tokenizer"
REPO_ENGINE_DIR = f"{ENGINE_MODEL}/1/engine"
REPO_CHECKPOINT_DIR = f"{ENGINE_MODEL}/1/checkpoint"  # backend=pytorch: the unified checkpoint (and its tokenizer)
REPO_MODEL_YAML = f"{ENGINE_MODEL}/1/model.yaml"  # backend=pytorch: the LLM API's arguments
# the shipped LoRA adapters' PEFT files: .../lora/peft/<name>/, and their tensors for the engine, loaded
# when it starts: .../lora/prefetch/<task id>/ (the backend's lora_prefetch_dir); inside the engine
# model's version folder, as Triton takes every folder at the repository's top for a model
REPO_LORA_PEFT_DIR = f"{ENGINE_MODEL}/1/lora/peft"
REPO_LORA_PREFETCH_DIR = f"{ENGINE_MODEL}/1/lora/prefetch"
LORA_WEIGHTS_NPY = "model.lora_weights.npy"  # an adapter's request tensors, as upstream's converter names them
LORA_CONFIG_NPY = "model.lora_config.npy"
REPO_XGRAMMAR_INFO = f"{ENGINE_MODEL}/1/xgrammar_tokenizer_info.json"  # the GPU backend's guided decoding


def timing_cache(workdir: Path, sm: int | None) -> Path:
    """One TensorRT timing cache per GPU architecture (its timings are device-specific)."""
    return workdir / f"timing-sm{sm}.cache"


def memory_plan(workdir: Path) -> Path:
    return workdir / "plan.json"


def triton_backends(workdir: Path) -> Path:
    """The CPU target's backend folder (the python backend with this Python's stub)."""
    return workdir / "triton_backends"


def mlflow_store(workdir: Path) -> Path:
    return workdir / "mlflow.db"


def mlflow_artifacts(workdir: Path) -> Path:
    return workdir / "mlartifacts"


def serve_logs(workdir: Path, fingerprint: str) -> Path:
    """Logs of `serve` for a repository (``external`` for repo=<path>)."""
    return workdir / "serve" / fingerprint


def eval_results(workdir: Path, stamp: str) -> Path:
    """Results of one `eval` command."""
    return workdir / "eval-runs" / stamp


def bench_results(workdir: Path, stamp: str) -> Path:
    """Results of one `bench` command."""
    return workdir / "bench" / stamp


def registry_downloads(workdir: Path) -> Path:
    """Registered repositories `serve model_uri=...` downloaded, one folder per name and version."""
    return workdir / "registry"


def manifests(workdir: Path, fingerprint: str) -> Path:
    return workdir / "manifests" / fingerprint
