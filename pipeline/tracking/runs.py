"""MLflow tracking: one run per ``build`` job, a parent run with one child per job for a ``-m``
sweep. The tracking URI is always set explicitly (default ``sqlite:///<workdir>/mlflow.db``, with
artifacts beside it in ``<workdir>/mlartifacts``), so runs never land in a stray ``./mlruns``.

A job that fails ends as FAILED with its log attached. Everything logged passes through the
redaction filter or comes from the config, which holds no secrets (tokens come from the
environment only).

A tracking server that dies mid-run costs seconds, not minutes: MLflow's client retries a call
twice here (its default is seven times with backoff, about four minutes a call), a failure ends
the command in one line (the CLI says so), and a run that could not be marked FAILED is recorded
in the workdir and marked when the server answers again (``settle_unfinished``). The stages'
results are on disk before anything is recorded, so the next build finds them in its cache.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline import __version__, artifacts
from pipeline.assets import PROJECT
from pipeline.config.schema import Backend, Endpoint, PipelineConfig, to_yaml
from pipeline.errors import ConfigError, Terminated
from pipeline.logs import captured_to
from pipeline.redact import redact
from pipeline.runner import Step
from pipeline.tracking import card, metrics, registry, system, ui
from pipeline.tracking.store import reachable, unreachable
from pipeline.workspace import MANIFEST, installed_version, locked

log = logging.getLogger(__name__)
BENCHMARK_FILES = (
    artifacts.BENCHMARK_JSON,
    artifacts.BENCHMARK_CSV,
    artifacts.PLOT,
    artifacts.CLIENT_JSON,
    artifacts.SERVER_LOG,
)
# Files of a stage's folder attached to the run (the checkpoints and engines stay in the workdir).
LOGGED_FILES = (
    MANIFEST,
    artifacts.QUALITY_JSON,
    artifacts.BUILD_LOG,
    artifacts.STAGE_LOG,
    artifacts.ENGINE_JSON,
    artifacts.REPOSITORY_JSON,
    artifacts.EVAL_JSON,
    artifacts.EVAL_ITEMS,
    *BENCHMARK_FILES,
)


# MLflow's HTTP retry budget for this process (users may set their own)
MLFLOW_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
UNFINISHED = "unfinished-runs"  # a workdir folder: runs that ended while the server was away

# MLflow 3's UI opens an experiment by its kind: without one, on the GenAI traces overview (empty
# here); a model-development experiment opens on its runs. A kind chosen in the UI is left alone.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")

# a bench of a server this config did not build: only what describes the measurement
BENCH_ONLY_PARAMS = ("model", "benchmark_preset", "pipeline_version", "tritonclient_version")


def tracking_uri(cfg: PipelineConfig) -> str:
    """The store's URI; every user of the store asks for it first, so MLflow's retry budget for
    this process is set here."""
    import os

    for name, value in MLFLOW_RETRIES.items():
        os.environ.setdefault(name, value)
    return cfg.tracking.uri or f"sqlite:///{artifacts.mlflow_store(cfg.workdir_path)}"


def probe_store(cfg: PipelineConfig, timeout_s: float = 5.0) -> None:
    """An HTTP tracking server is asked once, briefly, before anything is recorded: MLflow's own
    client would retry an unreachable one for minutes."""
    uri = tracking_uri(cfg)
    reason = unreachable(uri, timeout_s)
    if reason is not None:
        raise ConfigError(
            f"tracking.uri={redact(uri)} does not answer within {timeout_s:.0f} s ({redact(reason)[:160]}): start "
            "the tracking server, fix the address, or use tracking=none"
        )


def _client_and_experiment(cfg: PipelineConfig) -> tuple[Any, str]:
    """The store's client and the id of the run's experiment (created on first use, with its
    artifacts in the workdir rather than a stray ./mlruns)."""
    from mlflow.tracking import MlflowClient

    probe_store(cfg)
    store = artifacts.mlflow_store(cfg.workdir_path)
    store.parent.mkdir(parents=True, exist_ok=True)
    # two builds starting at once in one workdir: one creates the store's tables and the
    # experiment, the other waits and finds them
    with locked(store.with_name(".mlflow.lock")):
        client = MlflowClient(tracking_uri(cfg))
        settle_unfinished(client, cfg.workdir_path)
        name = cfg.tracking.experiment or cfg.model.name
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            if EXPERIMENT_KIND[0] not in experiment.tags:  # created by an older pipeline: marked now
                client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
            ui.ensure_view(client, experiment.experiment_id, experiment.tags)
            return client, experiment.experiment_id
        location = artifacts.mlflow_artifacts(cfg.workdir_path)
        tags = {EXPERIMENT_KIND[0]: EXPERIMENT_KIND[1], ui.VIEW_TAG: ui.view_state()}
        return client, client.create_experiment(name, artifact_location=location.as_uri(), tags=tags)


def experiments(cfg: PipelineConfig) -> list[tuple[str, str]]:
    """(name, id) of the store's experiments that hold runs of this pipeline, each made to open
    on its runs with the headline view."""
    from mlflow.tracking import MlflowClient

    probe_store(cfg)
    client = MlflowClient(tracking_uri(cfg))
    found = []
    for experiment in client.search_experiments():
        if experiment.experiment_id == "0" and not client.search_runs(["0"], max_results=1):
            continue  # MLflow's empty Default experiment
        ui.ensure_view(client, experiment.experiment_id, experiment.tags)
        found.append((experiment.name, experiment.experiment_id))
    return found


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _version(dist: str) -> str:
    return installed_version(dist) or "not installed"


def run_name(cfg: PipelineConfig) -> str:
    name = f"{cfg.model.name} {cfg.quant.format} tp{cfg.parallel.tp}pp{cfg.parallel.pp} {cfg.target.name}"
    return f"{name} pytorch" if cfg.backend is Backend.pytorch else name


def params(cfg: PipelineConfig) -> dict[str, Any]:
    return {
        "model": cfg.model.name,
        "model_repo_id": cfg.model.repo_id or cfg.model.path or cfg.model.file,
        "quant": str(cfg.quant.format),
        "kv_cache_dtype": str(cfg.quant.kv_cache_dtype) if cfg.quant.kv_cache_dtype else "none",
        "tp": cfg.parallel.tp,
        "pp": cfg.parallel.pp,
        "target": cfg.target.name,
        "backend": str(cfg.backend),
        "gpu": cfg.target.gpu or "cpu",
        "build_preset": cfg.build.name,
        "max_batch_size": cfg.build.batch,
        "max_num_tokens": cfg.build.tokens,
        "max_seq_len": cfg.build.max_seq_len,
        "benchmark_preset": cfg.benchmark.name,
        # what the build's benchmark talks to: an LLM-API repository is measured with its inputs
        "endpoint": "llmapi"
        if cfg.backend is Backend.pytorch and cfg.benchmark.endpoint is Endpoint.triton
        else str(cfg.benchmark.endpoint),
        "pipeline_version": __version__,
        "modelopt_version": _version("nvidia-modelopt"),
        "tensorrt_llm_version": _version("tensorrt_llm"),
        "tritonclient_version": _version("tritonclient"),
    }


def _metrics(
    steps: list[Step], results: dict[str, dict[str, Any]], cfg: PipelineConfig, gate: dict[str, Any] | None
) -> tuple[dict[str, float], dict[str, float], metrics.Series]:
    """(headline, detail, series) of a build: see ``metrics``."""
    detail: dict[str, float] = {}
    series: metrics.Series = []
    for step in steps:
        detail.update(metrics.stage_metrics(step.name, step.seconds, step.results or {}))
        point_flat, point_series = metrics.benchmark_metrics((step.results or {}).get("points", []), cfg)
        detail.update(point_flat)
        series += point_series
    detail.update(metrics.gate_metrics(gate))
    bench = results.get("benchmark", {})
    headline = metrics.headline(
        cfg, bench.get("points", []), results.get("quantize", {}).get("quality"), gate, bench.get("server_peak_rss_mb")
    )
    return headline, detail, series


def _log_datasets(client: Any, run_id: str, found: list[dict[str, Any]]) -> None:
    """What the stages read (calibration text, held-out text, benchmark prompts) as the run's
    MLflow dataset inputs: name, digest, source and size, with the stage's use as the context."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = []
    for record in found:
        profile = json.dumps({key: record[key] for key in ("rows", "tokens") if key in record})
        source = json.dumps({"uri": record["source"]})
        dataset = Dataset(record["name"], record["digest"], "local", source, None, profile)
        inputs.append(DatasetInput(dataset, [InputTag("mlflow.data.context", record["context"])]))
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


def _artifacts(client: Any, run_id: str, cfg: PipelineConfig, steps: list[Step]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp) / "config.yaml"
        resolved.write_text(redact(to_yaml(cfg)))
        client.log_artifact(run_id, str(resolved))
    for step in steps:
        final = step.dirs.final
        if not final.is_dir():
            continue
        for name in LOGGED_FILES:
            for file in final.glob(name):
                client.log_artifact(run_id, str(file), artifact_path=step.name)  # a stage's records under its name
        for pbtxt in final.glob(f"{artifacts.REPOSITORY}/*/config.pbtxt"):
            client.log_artifact(run_id, str(pbtxt), artifact_path=f"triton_repo/{pbtxt.parent.name}")


class JobRun:
    def __init__(self, client: Any, run_id: str):
        self.client, self.run_id = client, run_id

    def record(self, cfg: PipelineConfig, steps: list[Step], gate: dict[str, Any] | None = None) -> None:
        """The build's metrics, inputs, artifacts, registered version and description; ``gate``:
        the accuracy gate's verdict and per-task comparisons (None: the build was not evaluated)."""
        for step in steps:
            self.client.set_tag(self.run_id, f"fingerprint.{step.name}", step.fingerprint)
        results = {step.name: step.results or {} for step in steps}
        headline, detail, series = _metrics(steps, results, cfg, gate)
        self.client.set_tag(self.run_id, registry.GATE_TAG, registry.gate_verdict(gate))
        if gate is not None:  # what the deployment's items were paired with
            for name in (artifacts.EVAL_JSON, artifacts.EVAL_ITEMS):
                self.client.log_artifact(self.run_id, str(Path(gate["reference_dir"]) / name), "eval/reference")
        sha = results.get("fetch", {}).get("revision_sha")
        if sha:  # hub models: the commit the revision resolved to
            self.client.log_param(self.run_id, "model_revision", sha)
        shipped = results.get("triton_repo", {}).get("adapters", [])
        for key, value in registry.adapter_tags(shipped).items():
            self.client.log_param(self.run_id, key, value)
        self._log_metrics(headline, detail, series)
        _log_datasets(self.client, self.run_id, [d for s in steps for d in (s.results or {}).get("datasets", [])])
        _artifacts(self.client, self.run_id, cfg, steps)
        repository = next((s for s in steps if s.name == "triton_repo"), None)
        folder = repository.dirs.final / artifacts.REPOSITORY if repository is not None else None
        facts = card.BuildFacts(
            headline,
            results.get("benchmark", {}).get("points", []),
            results.get("quantize", {}).get("quality"),
            gate,
            sha,
            folder if folder is not None and folder.is_dir() else None,
            adapters=shipped,
        )
        name = registry.model_name(cfg)
        if cfg.tracking.register and repository is not None and facts.repository is not None:
            facts.version = registry.register(
                self.client, self.run_id, cfg, facts.repository, repository.fingerprint, headline, shipped
            )
            registry.tag_gate(self.client, name, facts.version, gate)
        text = card.build_card(cfg, self.run_id, facts, name)
        self.client.set_tag(self.run_id, card.NOTE_TAG, text)
        # a version registered by this run is described by it (a cached rebuild's keeps its own)
        if facts.version is not None and self.client.get_model_version(name, facts.version).run_id == self.run_id:
            self.client.update_model_version(name, facts.version, description=text)

    def record_bench(self, cfg: PipelineConfig, results: dict[str, Any], folder: Path, served_here: bool) -> None:
        """A ``bench`` command's sweep: what was measured and where. ``served_here``: the server
        was started from this config's build, so the build's parameters describe it too."""
        names = {"endpoint": results["endpoint"], "url": results["url"], "served_model": results["model"]}
        values = params(cfg) if served_here else {k: params(cfg)[k] for k in BENCH_ONLY_PARAMS}
        for key, value in {**values, **names}.items():
            self.client.log_param(self.run_id, key, value)
        headline = metrics.headline(cfg, results["points"], server_peak_rss_mb=results.get("server_peak_rss_mb"))
        self._log_metrics(headline, *metrics.benchmark_metrics(results["points"], cfg))
        _log_datasets(self.client, self.run_id, results.get("datasets", []))
        for name in BENCHMARK_FILES:
            for file in folder.glob(name):
                self.client.log_artifact(self.run_id, str(file), artifact_path="benchmark")

    def record_eval(self, scores: list[Any], folder: Path) -> None:
        """An ``eval`` command: each task's score and standard error, and the per-item records."""
        self._log_metrics({}, metrics.score_metrics(scores), [])
        for file in sorted(folder.glob("*.json*")):
            self.client.log_artifact(self.run_id, str(file), artifact_path="eval")

    def _log_metrics(self, headline: dict[str, float], detail: dict[str, float], series: metrics.Series) -> None:
        """The headline metrics in a batch of their own, first: MLflow lists a run's metrics in
        the order they were first logged, and its compare view plots the first."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        if headline:
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, 0) for k, v in headline.items()])
        rest = [Metric(k, v, now, 0) for k, v in detail.items()]
        rest += [Metric(k, v, now, s) for k, v, s in series]
        for start in range(0, len(rest), 1000):  # MLflow takes at most 1000 metrics per call
            self.client.log_batch(self.run_id, metrics=rest[start : start + 1000])


@contextlib.contextmanager
def job_run(cfg: PipelineConfig, parent_run_id: str | None = None, command: str = "build") -> Iterator[JobRun | None]:
    """An MLflow run around one ``build`` (or ``bench``) job; FAILED with the job's log when it
    raises. A build's parameters are logged at once; a bench's when it records (the server it
    measured is known then)."""
    if not cfg.tracking.enabled:
        yield None
        return
    client, experiment_id = _client_and_experiment(cfg)
    name = run_name(cfg) if command == "build" else f"bench {cfg.model.name} {cfg.benchmark.endpoint}"
    tags = {"pipeline.git_commit": _git_commit() or "unknown", "mlflow.runName": name, "pipeline.command": command}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, tags=tags)
    run_id = run.info.run_id
    if command == "build":
        for key, value in params(cfg).items():
            client.log_param(run_id, key, value)
    log.info("MLflow run %s in experiment %s at %s", run_id, experiment_id, redact(tracking_uri(cfg)))
    with tempfile.TemporaryDirectory() as tmp:
        job_log = Path(tmp) / "job.log"
        try:
            with captured_to(job_log), system.sampled(client, run_id, tracking_uri(cfg)):
                yield JobRun(client, run_id)
        except BaseException as error:
            job_log.write_text(redact(job_log.read_text()))
            stopped_by = _stopper(error) if isinstance(error, KeyboardInterrupt) else None  # say which signal
            _end_failed(client, cfg, run_id, job_log, stopped_by)
            raise
        client.log_artifact(run_id, str(job_log))
        client.set_terminated(run_id, status="FINISHED")
    log.info("%s: %s", ui.where(tracking_uri(cfg)), ui.run_url(ui.base_url(tracking_uri(cfg)), experiment_id, run_id))


def _end_failed(client: Any, cfg: PipelineConfig, run_id: str, job_log: Path, stopped_by: str | None) -> None:
    """Mark the run FAILED, best effort: the job's own error is what the user must see, and a
    tracking server that is gone must not hide it behind retries and a traceback."""
    workdir = cfg.workdir_path
    try:
        if not reachable(tracking_uri(cfg), timeout_s=2):
            raise ConnectionError("the tracking server does not answer")
        client.log_artifact(run_id, str(job_log))
        if stopped_by:
            client.set_tag(run_id, "pipeline.stopped_by", stopped_by)
        client.set_terminated(run_id, status="FAILED")
    except Exception as error:
        folder = workdir / UNFINISHED
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{run_id}.json").write_text(json.dumps({"status": "FAILED", "stopped_by": stopped_by}))
        first = redact(str(error).splitlines()[0] if str(error) else type(error).__name__)[:200]
        log.warning("run %s could not be marked FAILED (%s): the next build here marks it", run_id, first)


def settle_unfinished(client: Any, workdir: Path) -> None:
    """Mark the runs that ended while the tracking server was away, now that it answers."""
    folder = workdir / UNFINISHED
    for record in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            ended = json.loads(record.read_text())
            client.set_tag(record.stem, "pipeline.ended_while", "the tracking server was unreachable")
            if ended.get("stopped_by"):
                client.set_tag(record.stem, "pipeline.stopped_by", ended["stopped_by"])
            client.set_terminated(record.stem, status=ended.get("status", "FAILED"))
        except Exception as error:  # another store, or still away: kept for the next time
            log.debug("run %s is not settled yet: %s", record.stem, error)
            continue
        record.unlink()
        log.info("run %s, which ended while the tracking server was away, is now marked FAILED", record.stem)


def _stopper(error: KeyboardInterrupt) -> str:
    return signal.Signals(error.signum).name if isinstance(error, Terminated) else "SIGINT"


@contextlib.contextmanager
def parent_run(
    cfg: PipelineConfig, name: str, tags: dict[str, str], resume: str | None = None
) -> Iterator[tuple[Any, str] | None]:
    """(client, run id) of a run whose children are builds: a sweep's or a tune's. ``resume``: a
    run id to continue (a resumed tune), if the store still has it."""
    if not cfg.tracking.enabled:
        yield None
        return
    from mlflow.exceptions import MlflowException

    client, experiment_id = _client_and_experiment(cfg)
    run_id = None
    if resume:
        try:
            client.update_run(resume, status="RUNNING")
            run_id = resume
        except MlflowException:
            log.info("run %s is not in this store: a new one is opened", resume)
    if run_id is None:
        # names may carry credentials (a tracking URI with a password): redacted before they are stored
        run_id = client.create_run(experiment_id, tags={"mlflow.runName": redact(name)[:200], **tags}).info.run_id
    try:
        yield client, run_id
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")


def child_run(cfg: PipelineConfig, parent: str, repository_fingerprint: str) -> str | None:
    """The newest build run under ``parent`` that recorded this repository (a launched job's)."""
    client, experiment_id = _client_and_experiment(cfg)
    found = client.search_runs(
        [experiment_id],
        f"tags.mlflow.parentRunId = '{parent}' and tags.`fingerprint.triton_repo` = '{repository_fingerprint}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0].info.run_id if found else None


def sweep_name(jobs: list[list[str]]) -> str:
    """A sweep named by what varies across its jobs (``sweep: quant=none,fp8``), never by the
    overrides every job shares (the workdir, the tracking URI)."""
    values: dict[str, list[str]] = {}
    for job in jobs:
        for override in job:
            key, _, value = override.partition("=")
            values.setdefault(key, [])
            if value not in values[key]:
                values[key].append(value)
    varying = [f"{key}={','.join(found)}" for key, found in values.items() if len(found) > 1]
    return "sweep: " + (" ".join(varying) or f"{len(jobs)} jobs")


@contextlib.contextmanager
def sweep_run(cfg: PipelineConfig, jobs: list[list[str]]) -> Iterator[str | None]:
    """A parent run for a ``-m`` sweep; its children are the jobs."""
    with parent_run(cfg, sweep_name(jobs), {"pipeline.sweep": "true"}) as opened:
        if opened is None:
            yield None
            return
        client, run_id = opened
        client.log_param(run_id, "jobs", redact(json.dumps([" ".join(j) for j in jobs]))[:6000])
        try:
            yield run_id
        finally:
            describe_children(client, run_id, sweep_name(jobs))


def describe_children(client: Any, parent: str, name: str) -> None:
    """A parent run's description: its children's headline metrics side by side (best effort: a
    sweep's own outcome must not be hidden by a store that went away)."""
    try:
        experiment_id = client.get_run(parent).info.experiment_id
        children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent}'", max_results=1000)
        client.set_tag(parent, card.NOTE_TAG, card.sweep_card(name, children))
    except Exception as error:
        first = redact(str(error).splitlines()[0] if str(error) else type(error).__name__)[:200]
        log.warning("the sweep run %s got no description of its jobs (%s)", parent, first)
