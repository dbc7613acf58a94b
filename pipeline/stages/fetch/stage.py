"""fetch: obtain the model as a safetensors Hugging Face checkpoint.

Reads: ``model.*`` (source ``hf``, ``local`` or ``gguf``).
Writes: ``checkpoint/`` (config.json, tokenizer files, *.safetensors) and ``stage.log``.
Results: source, resolved commit sha (hf), file count and bytes.

Hub files are hard-linked from the Hugging Face cache (no second copy on disk); a local folder is
hard-linked (or copied across file systems); a GGUF file is dequantized once with transformers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pipeline import hub
from pipeline.artifacts import CHECKPOINT
from pipeline.config.schema import PipelineConfig, Source, to_dict
from pipeline.errors import FetchError
from pipeline.sizing import memory, rules
from pipeline.stages.fetch import gguf
from pipeline.workspace import StageWorkspace, file_identity, link_or_copy

NAME = "fetch"
VERSION = 2  # 2: GGUF special tokens taken from the GGUF metadata
TOOLS = ("huggingface_hub", "transformers", "gguf", "torch")

log = logging.getLogger(__name__)


def _local_files(cfg: PipelineConfig) -> tuple[Path, list[str]]:
    folder = Path(cfg.model.path or "").expanduser().resolve()
    names = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
    files = hub.select_files(names, cfg.model.allow_pickle, cfg.model.trust_remote_code, str(folder))
    return folder, files


def depends_on(cfg: PipelineConfig) -> dict[str, Any]:
    model = cfg.model
    common = {
        "source": str(model.source),
        "allow_pickle": model.allow_pickle,
        "trust_remote_code": model.trust_remote_code,
    }
    if model.source is Source.hf:
        return {**common, "repo_id": model.repo_id, "revision": model.revision}
    if model.source is Source.local:
        folder, files = _local_files(cfg)
        return {**common, "path": str(folder), "files": {f: file_identity(folder / f) for f in files}}
    gguf_file = gguf.locate(model.path, model.package, model.file)
    return {**common, "gguf": gguf_file.name, "content": file_identity(gguf_file), "dtype": str(model.dtype)}


def _source_config(cfg: PipelineConfig) -> dict[str, Any] | None:
    """The source's config.json: the folder's own, or the Hub's (that one file only). GGUF files
    are converted to Llama checkpoints and need no look."""
    model = cfg.model
    if model.source is Source.hf and model.repo_id:
        return hub.read_config(model.repo_id, model.revision)
    if model.source is Source.local and model.path:
        config_path = Path(model.path).expanduser() / "config.json"
        if config_path.is_file():
            found: dict[str, Any] = json.loads(config_path.read_text())
            return found
    return None


def preflight(cfg: PipelineConfig) -> list[str]:
    """Before anything is downloaded: a model whose architecture config.json names is one the
    pipeline cannot export (or run on the CPU target) is refused, and a Hub model's config.json
    gives its sizes to the memory checks (the target's plan here, quantizing in the quantize
    stage's preflight). Named models declare both, and validation checked them already."""
    arch = cfg.model.arch
    hub_sizes_unknown = cfg.model.source is Source.hf and arch.num_hidden_layers is None
    if arch.architectures and not hub_sizes_unknown:
        return []
    found = _source_config(cfg) or {}
    problems = []
    if not arch.architectures:
        problems += rules.architecture_problems(cfg.model.name, found.get("architectures"), cfg.target.is_gpu)
    if hub_sizes_unknown and not problems:
        # as validation does for a local folder: the quantize stage's preflight, which runs next,
        # and the GPU memory plan then know the model's size
        memory.fill_sizes(arch, found)
        problems += memory.problems(cfg)
    return problems


def run(cfg: PipelineConfig, ws: StageWorkspace) -> dict[str, Any]:
    model = cfg.model
    out = ws.out / CHECKPOINT
    results: dict[str, Any] = {"source": str(model.source)}
    if model.source is Source.hf:
        assert model.repo_id
        snapshot = hub.download(model.repo_id, model.revision, model.allow_pickle, model.trust_remote_code)
        for name in snapshot.files:
            # resolve(): cache entries are symlinks to blobs; link the blob itself
            link_or_copy((snapshot.folder / name).resolve(), out / name)
        results.update(repo_id=model.repo_id, revision=model.revision, revision_sha=snapshot.sha)
    elif model.source is Source.local:
        folder, files = _local_files(cfg)
        log.info("taking %d files from %s", len(files), folder)
        for name in files:
            link_or_copy(folder / name, out / name)
        results.update(path=str(folder))
    else:
        gguf_file = gguf.locate(model.path, model.package, model.file)
        gguf.convert(gguf_file, out, str(model.dtype), model.trust_remote_code)
        results.update(gguf=gguf_file.name)
    _check_checkpoint(cfg, out)
    sizes = [p.stat().st_size for p in out.rglob("*") if p.is_file()]
    results.update(files=len(sizes), bytes=sum(sizes))
    return results


def _check_checkpoint(cfg: PipelineConfig, folder: Path) -> None:
    """What every later stage relies on: a config, weights, a tokenizer, no unapproved code."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FetchError(f"{folder} has no config.json: it is not a Hugging Face checkpoint")
    if not any(folder.glob("tokenizer*")) and not any(folder.glob("*.model")):
        raise FetchError(f"{folder} has no tokenizer files: add tokenizer.json (or tokenizer.model) to the model")
    config = json.loads(config_path.read_text())
    if config.get("auto_map") and not cfg.model.trust_remote_code:
        raise FetchError(
            f"{cfg.model.name} needs its own Python code (auto_map in config.json): set "
            "model.trust_remote_code=true only if you trust it"
        )


def verify(cfg: PipelineConfig, final: Path) -> None:
    """The checkpoint must match the architecture numbers in the model's config file, since the
    planner and validation trust those numbers. Runs on cached results too."""
    config = json.loads((final / CHECKPOINT / "config.json").read_text())
    declared = to_dict(cfg.model.arch)
    wrong = [
        f"model.arch.{key}={value} but the checkpoint has {config.get(key)}"
        for key, value in declared.items()
        if value is not None and config.get(key) != value
    ]
    if wrong:
        raise FetchError(
            f"{cfg.model.name}: {'; '.join(wrong)}: correct conf/model/{cfg.model.name}.yaml or the overrides"
        )
