"""MLflow's model registry as the hand-off from build to deploy.

``build`` registers the rendered Triton repository (self-contained: engine or checkpoint,
tokenizer, configs) as a version of a registered model named after the model config, tagged with
what it is (format, tp/pp, target, backend) and how it did (the benchmark's headline numbers).
``promote`` points an alias (``production``) at a version; ``serve model_uri=models:/<name>@<alias>``
downloads that version and serves it. A repository registered once is not registered again: a
cached rebuild finds its version by the repository's fingerprint.

A repository is code that Triton runs, so every version carries a manifest of its files' hashes
(``manifest.py``) and the manifest's digest as a tag: a download is verified before it is used,
and so is a copy already on disk before it is served. A version already pulled is served from
disk, with a warning, when the tracking server does not answer, so a restart during an outage
is not a crash loop.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from pipeline.config.schema import PipelineConfig
from pipeline.errors import ConfigError, StageError
from pipeline.tracking import manifest
from pipeline.tracking.store import reachable
from pipeline.workspace import locked

log = logging.getLogger(__name__)

REPOSITORY_ARTIFACT = "triton_repository"  # where a run keeps the registered repository
MANIFEST_ARTIFACT = "triton_repository.manifest.json"  # beside it: every file's sha256
FINGERPRINT_TAG = "pipeline.repository_fingerprint"
DIGEST_TAG = "pipeline.repository_digest"  # the manifest's sha256
LOCAL_MANIFEST = "manifest.json"  # a downloaded version's manifest, beside its repository
ALIASES = "aliases"  # a file per alias: its version as last resolved (for serving while the server is down)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
GATE_TAG = "accuracy_gate"  # pass | fail | skipped: promote refuses all but pass without force=true
FORCED_TAG = "accuracy_gate.forced"  # set when a version that did not pass was promoted anyway


def model_name(cfg: PipelineConfig) -> str:
    return cfg.tracking.registered_model or cfg.model.name


def _tags(cfg: PipelineConfig, fingerprint: str, headline: dict[str, float]) -> dict[str, str]:
    tags = {
        "format": str(cfg.quant.format),
        "kv_cache_dtype": str(cfg.quant.kv_cache_dtype) if cfg.quant.kv_cache_dtype else "none",
        "tp": str(cfg.parallel.tp),
        "pp": str(cfg.parallel.pp),
        "target": cfg.target.name,
        "backend": str(cfg.backend),
        FINGERPRINT_TAG: fingerprint,
    }
    for key, value in headline.items():  # the build's headline numbers (tracking.metrics)
        tags[f"metric.{key}"] = f"{value:.4g}"
    return tags


def adapter_tags(shipped: list[dict[str, Any]]) -> dict[str, str]:
    """The LoRA adapters a repository ships (its repository.json), as run params and version tags:
    their names, and each one's source (a Hub repository at its commit, or the folder), rank and
    weights digest."""
    tags = {"lora_adapters": ",".join(entry["name"] for entry in shipped)} if shipped else {}
    for entry in shipped:
        where = f"{entry['source']}@{entry['revision']}" if entry.get("revision") else entry["source"]
        tags[f"lora.{entry['name']}"] = f"{where} rank={entry['rank']} digest={entry['digest']}"
    return tags


def register(
    client: Any,
    run_id: str,
    cfg: PipelineConfig,
    repository: Path,
    fingerprint: str,
    headline: dict[str, float],
    shipped: list[dict[str, Any]] | None = None,
) -> str:
    """Register ``repository`` (once per fingerprint; ``shipped``: the LoRA adapters it ships, as
    the triton_repo stage lists them); returns the version."""
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
    log.info("registering the repository as a version of %s (hashing and uploading %s)", name, repository)
    files = manifest.manifest(repository)
    client.log_artifacts(run_id, str(repository), REPOSITORY_ARTIFACT)
    client.log_dict(run_id, files, MANIFEST_ARTIFACT)
    tags = {**_tags(cfg, fingerprint, headline), **adapter_tags(shipped or []), DIGEST_TAG: manifest.digest(files)}
    version = client.create_model_version(name, f"runs:/{run_id}/{REPOSITORY_ARTIFACT}", run_id=run_id, tags=tags)
    client.set_tag(run_id, "pipeline.registered_version", f"{name}/{version.version}")
    log.info("registered model %s version %s", name, version.version)
    return str(version.version)


def version_of(client: Any, name: str, run_id: str) -> str | None:
    """The version holding the repository a build run produced (registered by that run or, for a
    cached repository, by the run that first built it): found by the repository's fingerprint."""
    fingerprint = client.get_run(run_id).data.tags.get("fingerprint.triton_repo")
    for version in client.search_model_versions(f"name='{name}'"):
        if version.run_id == run_id or (fingerprint and version.tags.get(FINGERPRINT_TAG) == fingerprint):
            return str(version.version)
    return None


def promote(
    client: Any, name: str, alias: str, version: str | None = None, run: str | None = None, force: bool = False
) -> str:
    """Point ``alias`` at a version, given by number or by the build run that registered it. A
    version that did not pass the accuracy gate is refused unless ``force`` (recorded on it)."""
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
        tags = client.get_model_version(name, version).tags
    except MlflowException as error:
        raise ConfigError(f"promote: {error.message}") from error
    verdict = tags.get(GATE_TAG, "skipped")
    if verdict != "pass":
        failed = "; ".join(f"{k.removeprefix(GATE_TAG + '.')} {v}" for k, v in sorted(tags.items())
                           if k.startswith(GATE_TAG + ".") and k != FORCED_TAG)  # fmt: skip
        why = f"failed the accuracy gate ({failed})" if verdict == "fail" else "was not evaluated (eval=none)"
        if not force:
            raise ConfigError(f"version {version} of {name} {why}: promote it anyway with force=true")
        log.warning("promoting version %s of %s, which %s (force=true)", version, name, why)
        client.set_model_version_tag(name, version, FORCED_TAG, f"{alias} by force=true")
    try:
        client.set_registered_model_alias(name, alias, version)
    except MlflowException as error:
        raise ConfigError(f"promote: {error.message}") from error
    return version


def gate_verdict(gate: dict[str, Any] | None) -> str:
    return "skipped" if gate is None else str(gate["verdict"])


def tag_gate(client: Any, name: str, version: str, gate: dict[str, Any] | None) -> None:
    """The version's accuracy gate: its verdict, and each task's delta with its interval."""
    client.set_model_version_tag(name, version, GATE_TAG, gate_verdict(gate))
    for task in (gate or {}).get("tasks", []):
        interval = f"{task['delta']:+.4f} [{task['ci_low']:+.4f}, {task['ci_high']:+.4f}]"
        client.set_model_version_tag(name, version, f"{GATE_TAG}.{task['task']}", interval)


def _parse(model_uri: str) -> tuple[str, str | None, str | None]:
    """(name, alias, version) of a models:/ URI, checked before anything is asked or written."""
    if not model_uri.startswith("models:/"):
        raise ConfigError(f"model_uri={model_uri}: give models:/<name>@<alias> or models:/<name>/<version>")
    rest = model_uri.removeprefix("models:/")
    if "@" in rest:
        name, _, alias = rest.partition("@")
        version = None
    else:
        name, _, version = rest.rpartition("/")
        alias = None
    if not NAME.match(name) or (alias is not None and not NAME.match(alias)):
        raise ConfigError(f"model_uri={model_uri}: names and aliases take letters, digits, '.', '_' and '-'")
    if version is not None and not version.isdigit():
        raise ConfigError(f"model_uri={model_uri}: a version is a number (models:/<name>/<n>)")
    return name, alias, version


def _verified(folder: Path, what: str) -> Path:
    """The repository in a downloaded version's folder, after its files match its manifest."""
    repository = folder / REPOSITORY_ARTIFACT
    recorded = folder / LOCAL_MANIFEST
    if not recorded.is_file():  # registered before manifests were: nothing to check it against
        log.warning("%s carries no manifest (registered by an older pipeline): it is served unverified", what)
        return repository
    found = manifest.problems(repository, json.loads(recorded.read_text()))
    if found:
        raise StageError(
            f"{what} at {folder} does not match its registered manifest ({'; '.join(found[:3])}): remove the folder "
            "and pull again, or find who changed it"
        )
    return repository


def _remember_alias(base: Path, alias: str, version: str) -> None:
    """A file per alias holding its version (written whole, so pulls of two versions never mix)."""
    path = base / ALIASES / alias
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{alias}.{version}.tmp")
    temporary.write_text(version)
    temporary.replace(path)


def _offline(base: Path, model_uri: str, alias: str | None, version: str | None) -> Path:
    """The tracking server does not answer: a version pulled before is served from disk."""
    if version is None and (base / ALIASES / str(alias)).is_file():
        version = (base / ALIASES / str(alias)).read_text().strip()
    folder = base / str(version)
    if version is None or not (folder / REPOSITORY_ARTIFACT / "repository.json").is_file():
        raise StageError(
            f"model_uri={model_uri}: the tracking server does not answer and this version was never pulled here: "
            "start the tracking server (or check tracking.uri), or serve a folder with repo=<path>"
        )
    log.warning("the tracking server does not answer: serving %s as version %s, pulled before", model_uri, version)
    return _verified(folder, f"version {version} of {model_uri}")


def download(model_uri: str, tracking_uri: str, into: Path) -> Path:
    """The repository a ``models:/<name>@<alias>`` (or ``/<version>``) URI names, downloaded once
    into ``into`` (a folder per version, written whole and verified before it is used; one
    download of a version at a time)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    name, alias, number = _parse(model_uri)
    base = into / name
    if not reachable(tracking_uri):
        return _offline(base, model_uri, alias, number)
    client = mlflow.MlflowClient(tracking_uri)  # the registry is the tracking server's
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, str(number))
    except MlflowException as error:
        raise ConfigError(f"model_uri={model_uri}: {error.message}") from error
    version, source = str(found.version), found.source  # runs:/<run>/triton_repository
    if not version.isdigit():  # never a path from the server: "../.." would be deleted below
        raise StageError(f"model_uri={model_uri}: the tracking server named version {version!r}, which is no number")
    folder = base / version
    what = f"version {version} of {model_uri}"
    with locked(base / f".{version}.lock"):
        if alias:
            _remember_alias(base, alias, version)
        if (folder / REPOSITORY_ARTIFACT / "repository.json").is_file():
            return _verified(folder, what)
        partial = base / f".{version}.partial"
        shutil.rmtree(partial, ignore_errors=True)  # what a killed download left
        shutil.rmtree(folder, ignore_errors=True)
        log.info("downloading %s (version %s) into %s", model_uri, version, folder)
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(partial), tracking_uri=tracking_uri)
            _fetch_manifest(found, partial, tracking_uri, what)
        except MlflowException as error:
            raise StageError(f"model_uri={model_uri}: the download failed: {error.message}") from error
        _verified(partial, what)
        partial.replace(folder)
    return folder / REPOSITORY_ARTIFACT


def _fetch_manifest(found: Any, partial: Path, tracking_uri: str, what: str) -> None:
    """The version's manifest, checked against the digest its tag holds, into the download."""
    import mlflow

    expected = found.tags.get(DIGEST_TAG)
    if expected is None:
        return  # registered by an older pipeline: served with a warning
    source = f"{found.source.rsplit('/', 1)[0]}/{MANIFEST_ARTIFACT}"
    where = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(partial), tracking_uri=tracking_uri)
    got = Path(where)
    files = json.loads(got.read_text())
    got.unlink()
    if manifest.digest(files) != expected:
        raise StageError(f"{what}: its manifest does not match the digest it was registered with: refused")
    (partial / LOCAL_MANIFEST).write_text(json.dumps(files, indent=1))
