"""MLflow's model registry as the hand-off from build to deploy.

``build`` registers the rendered Triton repository (self-contained: engine or checkpoint,
tokenizer, configs) as a version of a registered model named after the model config, tagged with
what it is (format, tp/pp, target, backend) and how it did (the benchmark's headline numbers).
``promote`` points an alias (``production``) at a version; ``serve model_uri=models:/<name>@<alias>``
downloads that version and serves it. A repository registered once is not registered again: a
cached rebuild finds its version by the repository's fingerprint.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from pipeline.config.schema import PipelineConfig
from pipeline.errors import ConfigError, StageError

log = logging.getLogger(__name__)

REPOSITORY_ARTIFACT = "triton_repository"  # where a run keeps the registered repository
FINGERPRINT_TAG = "pipeline.repository_fingerprint"
HEADLINE_METRICS = ("quality_perplexity_change_pct",)  # beside every point's throughput and latency


def model_name(cfg: PipelineConfig) -> str:
    return cfg.tracking.registered_model or cfg.model.name


def _tags(cfg: PipelineConfig, fingerprint: str, metrics: dict[str, float]) -> dict[str, str]:
    tags = {
        "format": str(cfg.quant.format),
        "kv_cache_dtype": str(cfg.quant.kv_cache_dtype) if cfg.quant.kv_cache_dtype else "none",
        "tp": str(cfg.parallel.tp),
        "pp": str(cfg.parallel.pp),
        "target": cfg.target.name,
        "backend": str(cfg.backend),
        FINGERPRINT_TAG: fingerprint,
    }
    for key, value in metrics.items():  # the headline numbers: throughput and TTFT at each load, quality
        if key.endswith(("_output_tokens_per_s", "_ttft_ms_p50")) or key in HEADLINE_METRICS:
            tags[f"metric.{key}"] = f"{value:.4g}"
    return tags


def register(
    client: Any, run_id: str, cfg: PipelineConfig, repository: Path, fingerprint: str, metrics: dict[str, float]
) -> str:
    """Register ``repository`` (once per fingerprint); returns the version."""
    from mlflow.exceptions import MlflowException

    name = model_name(cfg)
    try:
        client.create_registered_model(name, description=f"Triton repositories of {cfg.model.name} built by pipeline")
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    for version in client.search_model_versions(f"name='{name}'"):
        if version.tags.get(FINGERPRINT_TAG) == fingerprint:
            log.info("the repository is version %s of registered model %s already", version.version, name)
            return str(version.version)
    log.info("registering the repository as a version of %s (uploading %s)", name, repository)
    client.log_artifacts(run_id, str(repository), REPOSITORY_ARTIFACT)
    version = client.create_model_version(
        name, f"runs:/{run_id}/{REPOSITORY_ARTIFACT}", run_id=run_id, tags=_tags(cfg, fingerprint, metrics)
    )
    client.set_tag(run_id, "pipeline.registered_version", f"{name}/{version.version}")
    log.info("registered model %s version %s", name, version.version)
    return str(version.version)


def promote(client: Any, name: str, alias: str, version: str | None = None, run: str | None = None) -> str:
    """Point ``alias`` at a version, given by number or by the build run that registered it."""
    if (version is None) == (run is None):
        raise ConfigError("promote needs run=<MLflow run id> or version=<n>, one of them")
    if run is not None:
        found = [v for v in client.search_model_versions(f"name='{name}'") if v.run_id == run]
        if not found:
            raise ConfigError(f"run={run} registered no version of {name}: give version=<n> (see the MLflow UI)")
        version = str(found[0].version)
    assert version is not None
    from mlflow.exceptions import MlflowException

    try:
        client.set_registered_model_alias(name, alias, version)
    except MlflowException as error:
        raise ConfigError(f"promote: {error.message}") from error
    return version


def download(model_uri: str, tracking_uri: str, into: Path) -> Path:
    """The repository a ``models:/<name>@<alias>`` (or ``/<version>``) URI names, downloaded once
    into ``into`` (a folder per version, written whole before it is used)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if not model_uri.startswith("models:/"):
        raise ConfigError(f"model_uri={model_uri}: give models:/<name>@<alias> or models:/<name>/<version>")
    client = mlflow.MlflowClient(tracking_uri)  # the registry is the tracking server's
    name, _, ref = model_uri.removeprefix("models:/").partition("@")
    try:
        if ref:
            found = client.get_model_version_by_alias(name, ref)
        else:
            name, _, number = model_uri.removeprefix("models:/").rpartition("/")
            found = client.get_model_version(name, number)
    except MlflowException as error:
        raise ConfigError(f"model_uri={model_uri}: {error.message}") from error
    version, source = found.version, found.source  # runs:/<run>/triton_repository
    folder = into / name / str(version)
    repository = folder / REPOSITORY_ARTIFACT  # the download keeps the artifact folder's name
    if (repository / "repository.json").is_file():
        return repository
    partial = folder.with_name(f".{version}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # what a killed download left
    shutil.rmtree(folder, ignore_errors=True)
    log.info("downloading %s (version %s) into %s", model_uri, version, folder)
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(partial), tracking_uri=tracking_uri)
    except MlflowException as error:
        raise StageError(f"model_uri={model_uri}: the download failed: {error.message}") from error
    partial.replace(folder)
    return repository
