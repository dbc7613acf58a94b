"""The LoRA adapters a repository ships (``lora.adapters``), twice each:

- ``tensorrt_llm/1/lora/peft/<name>/``: PEFT's own two files (``adapter_config.json``, ``adapter_model.safetensors``),
  which the LLM API loads by path (``backend=pytorch``: the request's ``lora_path``);
- ``tensorrt_llm/1/lora/prefetch/<task id>/``: the adapter as the TensorRT-LLM backend's request tensors,
  ``model.lora_weights.npy`` [1, rows, width] fp16 and ``model.lora_config.npy`` [1, rows, 3] int32
  (the names and layout upstream's converter writes). The engine model loads this folder when it
  starts (the backend's ``lora_prefetch_dir``, which reads folder names as task ids), so a request
  needs only the adapter's ``lora_task_id``; a client that finds it dropped from the cache sends
  these tensors with the request, as upstream's clients do.

``repository.json`` lists them (name, task id, rank, projections, source and commit), which is how
the gateway learns what to serve. Task ids are 1, 2, ... in the configured order.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import hub
from pipeline.artifacts import LORA_CONFIG_NPY, LORA_WEIGHTS_NPY, REPO_LORA_PEFT_DIR, REPO_LORA_PREFETCH_DIR
from pipeline.config.schema import AdapterConfig, PipelineConfig
from pipeline.errors import FetchError, StageError
from pipeline.runtime import lora
from pipeline.sizing import adapters as checks
from pipeline.workspace import file_identity, link_or_copy

PEFT_FILES = (lora.CONFIG, lora.WEIGHTS)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Located:
    adapter: AdapterConfig
    folder: Path  # PEFT's files
    sha: str | None  # the Hub commit (None: a local folder)


def _key(index: int) -> str:
    return f"lora.adapters[{index}]"


@functools.lru_cache(maxsize=32)
def _downloaded(source: str, revision: str, key: str) -> hub.Snapshot:
    """A Hub adapter downloaded once per process: the preflight's download serves the stage too."""
    return hub.download_adapter(source, revision, key)


def locate(cfg: PipelineConfig) -> list[Located]:
    """Every adapter's folder: a local one as given, a Hub one downloaded (into the Hugging Face
    cache, at a commit sha) first."""
    found = []
    for index, adapter in enumerate(cfg.lora.adapters):
        if adapter.source:
            snapshot = _downloaded(adapter.source, adapter.revision, _key(index))
            found.append(Located(adapter, snapshot.folder, snapshot.sha))
        else:
            found.append(Located(adapter, Path(adapter.path or "").expanduser().resolve(), None))
    return found


def preflight(cfg: PipelineConfig) -> list[str]:
    """Hub adapters downloaded and checked as local ones were in validation, before any stage
    (the base model's download included) runs."""
    if not any(adapter.source for adapter in cfg.lora.adapters):
        return []
    try:
        located = locate(cfg)
    except FetchError as error:
        return [str(error)]
    problems = []
    for item in located:
        if item.adapter.source:
            problems += checks.adapter_problems(cfg, item.adapter.name, item.folder)
    return problems


def depends_on(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """What the shipped adapters are made of: a folder's files by content, a Hub adapter by source
    and revision (a sha pins it; a branch is looked up again only when the repository is rebuilt)."""
    out: list[dict[str, Any]] = []
    for adapter in cfg.lora.adapters:
        if adapter.source:
            out.append({"name": adapter.name, "source": adapter.source, "revision": adapter.revision})
            continue
        folder = Path(adapter.path or "").expanduser()
        files = {name: file_identity(folder / name) for name in PEFT_FILES if (folder / name).is_file()}
        out.append({"name": adapter.name, "files": files})
    return out


def digest(folder: Path) -> str:
    """A short content digest of the adapter's weights (what MLflow and the registry record)."""
    sha = hashlib.sha256()
    with (folder / lora.WEIGHTS).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()[:16]


def ship(cfg: PipelineConfig, repo: Path) -> list[dict[str, Any]]:
    """Write every adapter into ``repo/lora/<name>/``; its entries for ``repository.json``."""
    import numpy as np
    import torch

    entries = []
    for task_id, item in enumerate(locate(cfg), start=1):
        name = item.adapter.name
        try:
            loaded = lora.load(item.folder, name)
        except lora.AdapterError as error:
            raise StageError(f"lora adapter {name}: {error}") from error
        for file in PEFT_FILES:
            link_or_copy(item.folder / file, repo / REPO_LORA_PEFT_DIR / name / file)
        tensors = repo / REPO_LORA_PREFETCH_DIR / str(task_id)
        tensors.mkdir(parents=True, exist_ok=True)
        weights, config = lora.to_backend_tensors(loaded, torch.float16)
        np.save(tensors / LORA_WEIGHTS_NPY, weights.numpy())
        np.save(tensors / LORA_CONFIG_NPY, config.numpy())
        entries.append(
            {
                "name": name,
                "task_id": task_id,
                "rank": loaded.rank,
                "modules": sorted(loaded.modules),
                "source": item.adapter.source or str(item.folder),
                "revision": item.sha,
                "digest": digest(item.folder),
                "path": f"{REPO_LORA_PEFT_DIR}/{name}",  # PEFT's files, relative to the repository root
                "tensors": f"{REPO_LORA_PREFETCH_DIR}/{task_id}",  # the backend's
            }
        )
        log.info("shipped LoRA adapter %s (task id %d, rank %d, %s)", name, task_id, loaded.rank,
                 ", ".join(sorted(loaded.modules)))  # fmt: skip
    return entries
