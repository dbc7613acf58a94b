"""engine: TensorRT engines from the quantized checkpoint (GPU targets), or the reference engine
(CPU target); with ``backend=pytorch`` no engine at all, only the arguments it will be served with.

Reads: the quantize stage's checkpoint; ``build.*``, ``target.*``.
Writes: ``engine/`` and ``engine.json`` (runtime, versions, GPU, world size), plus ``build.log`` on
GPU targets. GPU: ``engine/`` holds ``config.json`` and one ``rank{N}.engine`` per rank, built by
``trtllm-build`` (TensorRT-LLM 1.1.x or 1.2.x). CPU: ``engine/`` holds the TensorRT-LLM checkpoint itself,
which the reference runtime (``pipeline.runtime``) executes with PyTorch.
``backend=pytorch`` (both targets): ``engine/`` holds the unified checkpoint, and
``llm_api_options.yaml`` the LLM API's arguments (limits, parallelism, KV cache, scheduler), which
``model.yaml`` and ``trtllm-serve --extra_llm_api_options`` take; ``engine.json`` records both.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from pipeline import proc
from pipeline.artifacts import BUILD_LOG, CHECKPOINT, ENGINE, ENGINE_JSON, timing_cache
from pipeline.config.hardware import detect
from pipeline.config.schema import Backend, PipelineConfig, to_dict
from pipeline.deploy import llmapi
from pipeline.errors import StageError
from pipeline.sizing import memory
from pipeline.stages.engine import trtllm
from pipeline.workspace import StageWorkspace, copy_atomic, installed_version, link_or_copy, require_space

NAME = "engine"
VERSION = 1
TOOLS = ("tensorrt_llm",)
REFERENCE = "reference"

log = logging.getLogger(__name__)


def depends_on(cfg: PipelineConfig) -> dict[str, Any]:
    if cfg.backend is Backend.pytorch:
        return {"runtime": "llm_api", "llm_api": llmapi.options(cfg)}
    if not cfg.target.is_gpu:
        return {"runtime": REFERENCE}
    # cuda_graphs is the PyTorch backend's: engines do not depend on it (nor on the sizing's explanation)
    ignored = ("name", "timeout_s", "cuda_graphs", "sized_because")
    build = {k: v for k, v in to_dict(cfg.build).items() if k not in ignored}
    return {
        "runtime": "tensorrt_llm",
        "build": build,
        "gpu": cfg.target.gpu,
        "sm": cfg.target.sm,
        "tp": cfg.parallel.tp,
        "pp": cfg.parallel.pp,
        **({"lora": trtllm.lora_flags(cfg)} if cfg.lora.adapters else {}),
    }


PRIVATE_TIMING_CACHE = "timing.cache"


def command(cfg: PipelineConfig, inputs: dict[str, Path], out: Path, workdir: Path) -> list[str] | None:
    """trtllm-build's argv. The timing cache it reads and rewrites is this build's own copy of the
    shared one (``run`` publishes it back whole), so two builds at once never tear it. None where
    nothing is built: the CPU target, and backend=pytorch (the LLM API loads the checkpoint)."""
    if not cfg.target.is_gpu or cfg.backend is Backend.pytorch:
        return None
    cache = out / PRIVATE_TIMING_CACHE if cfg.build.timing_cache else None
    return trtllm.build_argv(cfg, inputs["quantize"] / CHECKPOINT, out / ENGINE, cache)


def installed_trtllm() -> str | None:
    return installed_version("tensorrt_llm")


def preflight(cfg: PipelineConfig) -> list[str]:
    """Before any stage runs: a GPU target needs trtllm-build from TensorRT-LLM 1.1.x or 1.2.x
    (backend=pytorch: the LLM API of TensorRT-LLM >= 1.0, and trtllm-serve when it is the frontend)."""
    if not cfg.target.is_gpu:
        return []
    if cfg.backend is Backend.pytorch:
        problems = [p for p in [llmapi.version_problem(installed_trtllm())] if p]
        if cfg.serve.frontend == "trtllm-serve" and shutil.which("trtllm-serve") is None:
            problems.append(
                "trtllm-serve not found: run inside the TensorRT-LLM container, or use serve.frontend=triton"
            )
        return problems
    fix = f"target={cfg.target.name} needs the TensorRT-LLM container: see the Dockerfile, or use target=cpu"
    if shutil.which("trtllm-build") is None:
        return [f"trtllm-build not found: {fix}"]
    version = installed_trtllm()
    if version is None:
        return [f"the tensorrt_llm package is not installed: {fix}"]
    if trtllm.version_supported(version):
        return []
    if trtllm.release_line(version) >= trtllm.SUPPORTED_RANGE[1]:
        return [
            f"TensorRT-LLM {version} has no engine path (removed in 1.3): use TensorRT-LLM "
            f"{trtllm.SUPPORTED} (the project's Dockerfile builds on such an image)"
        ]
    return [f"TensorRT-LLM {version} is older than this pipeline supports: use {trtllm.SUPPORTED}"]


def _check_engine(folder: Path, world_size: int) -> None:
    if not (folder / "config.json").is_file():
        raise StageError(f"trtllm-build wrote no config.json in {folder}")
    engines = sorted(p.name for p in folder.glob("rank*.engine"))
    if engines != sorted(f"rank{n}.engine" for n in range(world_size)):
        raise StageError(f"trtllm-build wrote {engines}, expected one rank{{N}}.engine for each of {world_size} ranks")


def run(cfg: PipelineConfig, ws: StageWorkspace) -> dict[str, Any]:
    checkpoint = ws.input("quantize") / CHECKPOINT
    world_size = cfg.parallel.world_size
    info: dict[str, Any] = {
        "world_size": world_size,
        "tp": cfg.parallel.tp,
        "pp": cfg.parallel.pp,
        "max_batch_size": cfg.build.batch,
        "max_input_len": cfg.build.max_input_len,
        "max_seq_len": cfg.build.max_seq_len,
        "max_num_tokens": cfg.build.tokens,
    }
    if cfg.backend is Backend.pytorch:  # nothing to build: the checkpoint and how it is to be served
        for path in sorted(checkpoint.iterdir()):
            link_or_copy(path, ws.out / ENGINE / path.name)
        chosen = llmapi.options(cfg)
        (ws.out / llmapi.OPTIONS_FILE).write_text(llmapi.options_yaml(chosen))
        on_gpu = cfg.target.is_gpu
        info.update(
            runtime="pytorch" if on_gpu else REFERENCE,
            backend="pytorch",
            device="gpu" if on_gpu else "cpu",
            tensorrt_llm=installed_trtllm() if on_gpu else None,
            llm_api_options=chosen,
        )
    elif not cfg.target.is_gpu:
        for path in sorted(checkpoint.iterdir()):
            link_or_copy(path, ws.out / ENGINE / path.name)
        info.update(runtime=REFERENCE, device="cpu")
    else:
        argv = command(cfg, ws.inputs, ws.out, ws.workdir)
        assert argv is not None
        require_space(ws.out, memory.checkpoint_bytes(cfg), "the engines")
        shared = timing_cache(ws.workdir, cfg.target.sm)
        private = ws.out / PRIVATE_TIMING_CACHE
        if cfg.build.timing_cache and shared.is_file():
            shutil.copy2(shared, private)
        proc.run(argv, ws.out / BUILD_LOG, timeout_s=cfg.build.timeout_s)
        _check_engine(ws.out / ENGINE, world_size)
        if cfg.build.timing_cache and private.is_file():
            copy_atomic(private, shared)  # readers see the old cache or the new one, never a torn one
            private.unlink()
        host = detect()
        info.update(
            runtime="tensorrt_llm", tensorrt_llm=installed_trtllm(), gpu=host.gpu, sm=host.sm, command=proc.quote(argv)
        )
    (ws.out / ENGINE_JSON).write_text(json.dumps(info, indent=2) + "\n")
    return info


def verify(cfg: PipelineConfig, final: Path) -> None:
    """An engine runs only on the GPU architecture and TensorRT-LLM version it was built with."""
    info = json.loads((final / ENGINE_JSON).read_text())
    if info.get("runtime") != "tensorrt_llm":
        return
    host, version = detect(), installed_trtllm()
    if host.sm != info.get("sm") or version != info.get("tensorrt_llm"):
        raise StageError(
            f"the engine at {final} was built for SM {info.get('sm')} with TensorRT-LLM "
            f"{info.get('tensorrt_llm')}, but this host has SM {host.sm} and TensorRT-LLM {version}: "
            "build on this host with force=true, or choose the matching target"
        )
