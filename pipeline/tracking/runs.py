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
from pipeline.tracking import registry
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
            return client, experiment.experiment_id
        location = artifacts.mlflow_artifacts(cfg.workdir_path)
        tags = dict([EXPERIMENT_KIND])
        return client, client.create_experiment(name, artifact_location=location.as_uri(), tags=tags)


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


def _flat_metrics(steps: list[Step], cfg: PipelineConfig) -> tuple[dict[str, float], list[tuple[str, float, int]]]:
    """Flat metrics for comparison, and (name, value, step) series for the benchmark sweep."""
    flat: dict[str, float] = {}
    series: list[tuple[str, float, int]] = []
    for step in steps:
        flat[f"stage_seconds_{step.name}"] = float(step.seconds or 0.0)
        results = step.results or {}
        for key, value in (results.get("quality") or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                flat[f"quality_{key}"] = float(value)
        for phase, cost in (results.get("costs") or {}).items():
            for key in ("seconds", "peak_rss_mb"):
                if key in cost:
                    flat[f"cost_{phase}_{key}"] = float(cost[key])
        point_flat, point_series = benchmark_metrics(results.get("points", []), cfg)
        flat.update(point_flat)
        series += point_series
    return flat, series


def gate_metrics(gate: dict[str, Any] | None) -> dict[str, float]:
    """eval_<task>_acc, _acc_ref, _delta, _ci_low, _ci_high, _agreement per evaluated task."""
    flat: dict[str, float] = {}
    for task in (gate or {}).get("tasks", []):
        name = task["task"]
        for key, metric in (("accuracy", "acc"), ("reference", "acc_ref"), ("delta", "delta"), ("ci_low", "ci_low"),
                            ("ci_high", "ci_high"), ("agreement", "agreement")):  # fmt: skip
            flat[f"eval_{name}_{metric}"] = float(task[key])
    return flat


def benchmark_metrics(
    points: list[dict[str, Any]], cfg: PipelineConfig
) -> tuple[dict[str, float], list[tuple[str, float, int]]]:
    """A sweep's points as flat metrics (``c8_ttft_ms_p50``) and per-concurrency series."""
    flat: dict[str, float] = {}
    series: list[tuple[str, float, int]] = []
    for point in points:
        prefix = point["load"].replace("=", "").replace(".", "_")  # c=8 -> c8, rate=2.5 -> rate2_5
        for key, value in point.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and value == value:
                flat[f"{prefix}_{key}"] = float(value)
        cost = cost_per_million_tokens(cfg, point.get("output_tokens_per_s"))
        if cost is not None:
            flat[f"{prefix}_usd_per_million_output_tokens"] = cost
        if point.get("concurrency"):
            for key in ("output_tokens_per_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "e2e_ms_p50"):
                series.append((f"sweep_{key}", float(point[key]), int(point["concurrency"])))
    return flat, series


def cost_per_million_tokens(cfg: PipelineConfig, tokens_per_s: float | None) -> float | None:
    price, gpus = cfg.target.price_per_gpu_hour, cfg.parallel.world_size
    if not price or not tokens_per_s:
        return None
    return price * gpus / 3600 / tokens_per_s * 1e6


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
        """The build's metrics, artifacts and registered version; ``gate``: the accuracy gate's
        verdict and per-task comparisons (None: the build was not evaluated)."""
        for step in steps:
            self.client.set_tag(self.run_id, f"fingerprint.{step.name}", step.fingerprint)
        flat, series = _flat_metrics(steps, cfg)
        flat.update(gate_metrics(gate))
        self.client.set_tag(self.run_id, registry.GATE_TAG, registry.gate_verdict(gate))
        if gate is not None:  # what the deployment's items were paired with
            for name in (artifacts.EVAL_JSON, artifacts.EVAL_ITEMS):
                self.client.log_artifact(self.run_id, str(Path(gate["reference_dir"]) / name), "eval/reference")
        sha = next((s.results.get("revision_sha") for s in steps if s.name == "fetch" and s.results), None)
        if sha:  # hub models: the commit the revision resolved to
            self.client.log_param(self.run_id, "model_revision", sha)
        self._log_metrics(flat, series)
        _artifacts(self.client, self.run_id, cfg, steps)
        repository = next((s for s in steps if s.name == "triton_repo"), None)
        if cfg.tracking.register and repository is not None and repository.dirs.final.is_dir():
            folder = repository.dirs.final / artifacts.REPOSITORY
            version = registry.register(self.client, self.run_id, cfg, folder, repository.fingerprint, flat)
            registry.tag_gate(self.client, registry.model_name(cfg), version, gate)

    def record_bench(self, cfg: PipelineConfig, results: dict[str, Any], folder: Path, served_here: bool) -> None:
        """A ``bench`` command's sweep: what was measured and where. ``served_here``: the server
        was started from this config's build, so the build's parameters describe it too."""
        names = {"endpoint": results["endpoint"], "url": results["url"], "served_model": results["model"]}
        values = params(cfg) if served_here else {k: params(cfg)[k] for k in BENCH_ONLY_PARAMS}
        for key, value in {**values, **names}.items():
            self.client.log_param(self.run_id, key, value)
        self._log_metrics(*benchmark_metrics(results["points"], cfg))
        for name in BENCHMARK_FILES:
            for file in folder.glob(name):
                self.client.log_artifact(self.run_id, str(file), artifact_path="benchmark")

    def record_eval(self, scores: list[Any], folder: Path) -> None:
        """An ``eval`` command: each task's score and standard error, and the per-item records."""
        flat = {}
        for score in scores:
            flat[f"eval_{score.task}_acc"] = float(score.score)
            flat[f"eval_{score.task}_stderr"] = float(score.stderr)
        self._log_metrics(flat, [])
        for file in sorted(folder.glob("*.json*")):
            self.client.log_artifact(self.run_id, str(file), artifact_path="eval")

    def _log_metrics(self, flat: dict[str, float], series: list[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in flat.items()]
        metrics += [Metric(k, v, now, s) for k, v, s in series]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per call
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])


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
            with captured_to(job_log):
                yield JobRun(client, run_id)
        except BaseException as error:
            job_log.write_text(redact(job_log.read_text()))
            stopped_by = _stopper(error) if isinstance(error, KeyboardInterrupt) else None  # say which signal
            _end_failed(client, cfg, run_id, job_log, stopped_by)
            raise
        client.log_artifact(run_id, str(job_log))
        client.set_terminated(run_id, status="FINISHED")


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
        yield run_id
