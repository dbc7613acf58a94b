"""triton_repo: a self-contained Triton model repository for the engine.

Reads: the engine stage's ``engine/``, the quantize stage's ``tokenizer/``; ``triton.*`` and the
engine limits ``build.max_batch_size|max_input_len|max_seq_len``.
Writes: ``repository/`` (preprocessing, tensorrt_llm, postprocessing, and the ensemble and/or
tensorrt_llm_bls; the LoRA adapters in ``tensorrt_llm/1/lora/``, see ``adapters``) and ``repository.json``
(models, entry model, target, limits, adapters).

The repository differs between targets only in the engine model: Triton's ``tensorrtllm`` backend
on GPU targets, a python model running the reference runtime on the CPU target. Engine and
tokenizer are copied in (hard links where possible), so the folder can be moved to another host.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import yaml

from pipeline.artifacts import (
    ENGINE,
    ENGINE_JSON,
    REPO_CHECKPOINT_DIR,
    REPO_ENGINE_DIR,
    REPO_MODEL_YAML,
    REPO_TOKENIZER_DIR,
    REPO_XGRAMMAR_INFO,
    REPOSITORY,
    REPOSITORY_JSON,
    TOKENIZER,
)
from pipeline.config.schema import Backend, PipelineConfig, to_dict
from pipeline.errors import StageError
from pipeline.stages.triton_repo import adapters, render
from pipeline.workspace import StageWorkspace, link_or_copy

NAME = "triton_repo"
VERSION = (
    4  # 2: repository.json inside the repository; 3: CPU engine model knows max_seq_len; 4: paged in-flight scheduler
)
TOOLS = ("tritonclient",)
# settings that do not change the repository's files (llmapi_model_dir: the templates digest covers
# the upstream files it names)
SERVER_ONLY = (
    "name",
    "host",
    "http_port",
    "grpc_port",
    "metrics_port",
    "ready_timeout_s",
    "exit_timeout_s",
    "llmapi_model_dir",
)

log = logging.getLogger(__name__)


def depends_on(cfg: PipelineConfig) -> dict[str, Any]:
    """What the repository is made of: the rendered configs themselves (so that every setting a
    config reads changes the fingerprint, whichever section it lives in), the copied code, and the
    settings ``repository.json`` records."""
    triton = {k: v for k, v in to_dict(cfg.triton).items() if k not in SERVER_ONLY}
    build = cfg.build
    rendered = json.dumps({**render.rendered_configs(cfg), "model.yaml": _model_yaml(cfg)}, sort_keys=True)
    return {
        "triton": triton,
        "limits": [build.batch, build.max_input_len, build.max_seq_len],
        "target": str(cfg.target.kind),
        "templates": render.templates_digest(cfg),
        "rendered": hashlib.sha256(rendered.encode()).hexdigest()[:16],
        "sampling_defaults": dict(cfg.model.sampling_defaults),
        **({"backend": str(cfg.backend)} if cfg.backend is Backend.pytorch else {}),
        **({"lora": adapters.depends_on(cfg)} if cfg.lora.adapters else {}),
    }


def _model_yaml(cfg: PipelineConfig) -> Any:
    return render.model_yaml(cfg) if cfg.backend is Backend.pytorch else None


def preflight(cfg: PipelineConfig) -> list[str]:
    """Hub LoRA adapters downloaded and checked; GPU repositories of backend=pytorch copy upstream's
    LLM-API model: it must be at hand."""
    problems = adapters.preflight(cfg)
    if cfg.backend is Backend.pytorch and cfg.target.is_gpu and cfg.serve.frontend == "triton":
        problem = render.llmapi_model_problem(cfg)
        problems += [problem] if problem else []
    return problems


def _link_tree(source: Path, target: Path) -> int:
    count = 0
    for path in sorted(source.rglob("*")):
        if path.is_file():
            link_or_copy(path, target / path.relative_to(source))
            count += 1
    return count


def xgrammar_tokenizer_info(tokenizer_dir: Path) -> dict[str, Any]:
    """What the GPU backend's guided decoding reads (``xgrammar_tokenizer_info_path``): the
    vocabulary in id order, the fast tokenizer's serialized backend (xgrammar infers how tokens
    encode bytes from it) and the stop token, as TensorRT-LLM's own generator writes it."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise StageError(
            f"the tokenizer in {tokenizer_dir} is not a fast (tokenizers) one, which xgrammar needs on GPUs: "
            "set triton.guided_decoding=false"
        )
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return {
        "encoded_vocab": [token for token, _ in vocab],
        "tokenizer_str": tokenizer.backend_tokenizer.to_str(),
        "stop_token_ids": [tokenizer.eos_token_id],
    }


def _llmapi_files(cfg: PipelineConfig, ws: StageWorkspace, repo: Path) -> int:
    """backend=pytorch: the unified checkpoint (with its tokenizer) and model.yaml."""
    engine_files = _link_tree(ws.input("engine") / ENGINE, repo / REPO_CHECKPOINT_DIR)
    (repo / REPO_MODEL_YAML).write_text(yaml.safe_dump(render.model_yaml(cfg), sort_keys=False))
    return engine_files


def run(cfg: PipelineConfig, ws: StageWorkspace) -> dict[str, Any]:
    repo = ws.out / REPOSITORY
    configs = render.rendered_configs(cfg)  # strict: fails before anything is copied
    for model, text in configs.items():
        (repo / model / "1").mkdir(parents=True, exist_ok=True)
        (repo / model / "config.pbtxt").write_text(text)
    for rel, source in render.code_files(cfg).items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, repo / rel)
    engine = ws.input("engine")
    if cfg.backend is Backend.pytorch:
        log.info("copying the checkpoint into %s", repo)
        engine_files = _llmapi_files(cfg, ws, repo)
    else:
        log.info("copying the engine and tokenizer into %s", repo)
        engine_files = _link_tree(engine / ENGINE, repo / REPO_ENGINE_DIR)
        _link_tree(ws.input("quantize") / TOKENIZER, repo / REPO_TOKENIZER_DIR)
    if cfg.backend is Backend.tensorrt and cfg.target.is_gpu and cfg.triton.guided_decoding:
        info_file = repo / REPO_XGRAMMAR_INFO
        info_file.write_text(json.dumps(xgrammar_tokenizer_info(repo / REPO_TOKENIZER_DIR)))
    engine_info = json.loads((engine / ENGINE_JSON).read_text())
    info = {
        "models": list(configs),
        "entry_model": render.entry_model(cfg),
        "target": str(cfg.target.kind),
        "backend": str(cfg.backend),
        "runtime": engine_info["runtime"],
        "world_size": engine_info["world_size"],
        "max_batch_size": cfg.build.batch,
        "max_input_len": cfg.build.max_input_len,
        "max_seq_len": cfg.build.max_seq_len,
        "streaming": cfg.triton.streaming,
        "sampling_defaults": dict(cfg.model.sampling_defaults),
        # whether the engine model returns prompt logits (the gateway's echo with logprobs)
        "context_logits": cfg.backend is Backend.tensorrt
        and (not cfg.target.is_gpu or "--gather_context_logits" in cfg.build.extra_args),
        "engine_files": engine_files,
        "adapters": adapters.ship(cfg, repo) if cfg.lora.adapters else [],
    }
    text = json.dumps(info, indent=2) + "\n"
    (ws.out / REPOSITORY_JSON).write_text(text)
    (repo / REPOSITORY_JSON).write_text(text)  # travels with the folder (Triton ignores plain files)
    log.info("rendered %s (entry model %s)", ", ".join(configs), info["entry_model"])
    return info
