"""The commands, one function each, with their arguments as parameters: what ``python -m pipeline``
runs once it has composed and validated each job's config (``__main__`` owns argv and exit codes).
A ``-m`` sweep is a list of jobs; ``run_jobs`` runs them in order, under one parent MLflow run for
``build``."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline import artifacts, proc, runner
from pipeline.config.schema import (
    DEFAULT_MAX_DROP,
    Backend,
    Endpoint,
    GateMode,
    PipelineConfig,
    QuantFormat,
    served_model_name,
    to_yaml,
)
from pipeline.deploy import kubernetes, llmapi, server, serving
from pipeline.errors import ConfigError, PipelineError, StageError
from pipeline.redact import redact, url_without_credentials
from pipeline.runner import Step
from pipeline.sizing import memory
from pipeline.stages import STAGES
from pipeline.stages.benchmark import stage as benchmark
from pipeline.stages.evaluate import paired
from pipeline.stages.evaluate import stage as eval_stage
from pipeline.stages.triton_repo import render
from pipeline.tracking import compare as run_table
from pipeline.tracking import registry, runs
from pipeline.tracking import ui as tracking_ui
from pipeline.workspace import write_json_atomic

log = logging.getLogger("pipeline")


def _repository_step(steps: list[Step]) -> Step:
    return next(s for s in steps if s.name == "triton_repo")


@dataclasses.dataclass
class Built:
    """What one ``build`` job did: its stages, the accuracy gate's verdict (None: not evaluated)
    and its MLflow run (None: tracking=none)."""

    steps: list[Step]
    gate: dict[str, Any] | None
    run_id: str | None


def build_recorded(cfg: PipelineConfig, sweep_parent: str | None = None) -> Built:
    """Every stage not already done, the accuracy gate, and one MLflow run (a child of
    ``sweep_parent`` in a sweep or a tune) recording them; the gate's verdict is not enforced here."""
    planned = runner.plan(cfg, STAGES)
    runner.preflight(cfg, planned)  # a refused build opens no MLflow run
    with runs.job_run(cfg, sweep_parent) as run:
        steps = runner.build(cfg, STAGES, planned)
        gate = accuracy_gate(cfg, steps)
        if run is not None:
            run.record(cfg, steps, gate)
    return Built(steps, gate, run.run_id if run is not None else None)


def build(cfg: PipelineConfig, sweep_parent: str | None = None) -> list[Step]:
    """Run every stage not already done; one MLflow run (a child of ``sweep_parent`` in a sweep)."""
    if cfg.dry_run:
        print(runner.format_plan(runner.plan(cfg, STAGES), cfg))
        print("dry run: nothing was run (drop dry_run=true to build)")
        return []
    built = build_recorded(cfg, sweep_parent)
    steps, gate = built.steps, built.gate
    for step in steps:
        took = f"{step.seconds:.1f} s" if step.seconds is not None else "cached"
        print(f"{step.name:<10} {took:<10} {step.dirs.final}")
    if gate is not None:
        print(
            f"\n# accuracy gate: {gate['verdict']} (against the unquantized build, {gate['confidence']:.0%} one-sided)"
        )
        print("\n".join(gate["lines"]))
        failed = [task for task in gate["tasks"] if not task["passed"]]
        if failed and cfg.eval.gate is GateMode.fail:
            worst = min(failed, key=lambda task: task["lower_bound"])
            raise PipelineError(
                f"the accuracy gate failed: {worst['task']} lost {-worst['delta']:.3f} "
                f"[{-worst['ci_high']:+.3f}, {-worst['ci_low']:+.3f}] against a budget of {worst['max_drop']:.3f} "
                "(eval.gate=warn reports without failing; eval.max_drop.<format> sets the budget)"
            )
    return steps


def reference_config(cfg: PipelineConfig) -> PipelineConfig:
    """The unquantized build of the same model, target and serving settings, up to its evaluation:
    what a quantized deployment's accuracy is compared with (for quant=none, the build itself)."""
    reference = copy.deepcopy(cfg)
    # the user's other quant settings kept: a sweep's quant=none job is then the reference itself
    reference.quant = dataclasses.replace(reference.quant, format=QuantFormat.none, kv_cache_dtype=None)
    reference.until, reference.redo, reference.force = eval_stage.NAME, [], False
    return reference


def accuracy_gate(cfg: PipelineConfig, steps: list[Step]) -> dict[str, Any] | None:
    """The deployment's evaluated items paired with the unquantized reference's, per task; None
    when this build was not evaluated (eval=none, or until= stopped before it)."""
    ours = next((s for s in steps if s.name == eval_stage.NAME), None)
    if ours is None or not cfg.eval.enabled or not ours.dirs.final.is_dir():
        return None
    reference_steps = runner.build(reference_config(cfg), STAGES)
    theirs = next(s for s in reference_steps if s.name == eval_stage.NAME)
    if theirs.fingerprint != ours.fingerprint:
        log.info("the unquantized reference: %s", theirs.dirs.final)
    budget = cfg.eval.max_drop.get(str(cfg.quant.format), DEFAULT_MAX_DROP["int4_awq"])
    comparisons = []
    # the base model, then each LoRA adapter against the same adapter on the unquantized base
    # ("<adapter>/<task>"): an adapter can lose more to quantization than the base does
    pairs = [("", ours.dirs.final, theirs.dirs.final)]
    for adapter in sorted((ours.results or {}).get("adapters", {})):  # those the eval stage evaluated
        mine_dir, their_dir = (eval_stage.adapter_dir(step.dirs.final, adapter) for step in (ours, theirs))
        pairs.append((f"{adapter}/", mine_dir, their_dir))
    for prefix, mine_dir, their_dir in pairs:
        scores = {s["task"]: s for s in json.loads((mine_dir / artifacts.EVAL_JSON).read_text())}
        mine, reference = _items(mine_dir), _items(their_dir)
        for task, score in scores.items():
            found = reference.get(task, [])
            confidence = cfg.eval.confidence
            comparisons.append(
                paired.compare(f"{prefix}{task}", mine[task], found, budget, confidence, score["at_chance"])
            )
    return {
        "verdict": "pass" if all(c.passed for c in comparisons) else "fail",
        "confidence": cfg.eval.confidence,
        "tasks": [c.to_dict() for c in comparisons],
        "lines": [c.verdict() for c in comparisons],
        "reference_dir": str(theirs.dirs.final),
    }


def _items(folder: Path) -> dict[str, list[dict[str, Any]]]:
    by_task: dict[str, list[dict[str, Any]]] = {}
    for line in (folder / artifacts.EVAL_ITEMS).read_text().splitlines():
        item = json.loads(line)
        by_task.setdefault(item["task"], []).append(item)
    return by_task


def plan(cfg: PipelineConfig) -> None:
    """The resolved config, the memory plan (GPU targets), each stage and how to serve the result."""
    print("# resolved config")
    print(redact(to_yaml(cfg)).rstrip())  # a tracking.uri may carry user:password
    print("\n# engine limits")
    build_limits = f"max_batch_size {cfg.build.batch}, max_num_tokens {cfg.build.tokens}"
    print(f"{build_limits}: {cfg.build.sized_because or f'set by build={cfg.build.name} or the command line'}")
    _print_memory_plan(cfg)
    print("\n# stages")
    steps = runner.plan(cfg, STAGES)
    print(runner.format_plan(steps, cfg))
    names = [s.name for s in steps]
    if "quantize" in names:
        print(f"\n# quantize {memory.quantize_placement(cfg)}")
    if "triton_repo" in names and cfg.backend is Backend.pytorch:
        _print_llmapi_plan(cfg, steps)
    elif "triton_repo" in names:
        params = render.engine_parameters(cfg)
        print(f"\n# {artifacts.ENGINE_MODEL} model parameters (Triton repository)")
        print("\n".join(f'{key}: "{value}"' for key, value in params.items()))
        print("\n# serve (python -m pipeline serve)")
        print(_serve_line(cfg, _repository_step(steps)))
        _print_gateway_line(cfg)
    verdict = memory.problems(cfg)
    if verdict:  # after the table, so the user sees what does not fit and what would
        raise ConfigError("; ".join(verdict))


def _print_llmapi_plan(cfg: PipelineConfig, steps: list[Step]) -> None:
    """backend=pytorch: the LLM API's arguments and both ways to serve them."""
    print(f"\n# LLM API arguments ({artifacts.REPO_MODEL_YAML}, and trtllm-serve's {llmapi.OPTIONS_FILE})")
    print(llmapi.options_yaml(llmapi.options(cfg)).rstrip())
    print("\n# serve with Triton's LLM-API model (python -m pipeline serve)")
    print(_serve_line(cfg, _repository_step(steps)))
    _print_gateway_line(cfg)
    engine = next(s for s in steps if s.name == "engine").dirs.final
    argv = llmapi.trtllm_serve_argv(
        cfg,
        engine / artifacts.ENGINE,
        engine / llmapi.OPTIONS_FILE,
        cfg.triton.host,
        cfg.serve.trtllm_serve_port,
    )
    print("\n# or with trtllm-serve's OpenAI API (python -m pipeline serve serve.frontend=trtllm-serve, GPU targets)")
    print(proc.quote(argv))


def _print_gateway_line(cfg: PipelineConfig) -> None:
    if cfg.openai.enabled:
        url = f"http://{cfg.openai.host or cfg.triton.host}:{cfg.openai.port}/v1"
        print(f"# and the OpenAI-compatible API at {url} (model {served_model_name(cfg)!r})")


def _print_memory_plan(cfg: PipelineConfig) -> None:
    if not memory.applies(cfg):
        print("\n# memory plan: for GPU targets only (this is the CPU target)")
        return
    print("\n# memory plan")
    print(memory.format_table(cfg))
    out = artifacts.memory_plan(cfg.workdir_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    options = [p.to_dict() for p in memory.alternatives(cfg)]
    write_json_atomic(out, {"requested": memory.plan_for(cfg).to_dict(), "options": options})
    print(f"(written to {out})")


def _serve_line(cfg: PipelineConfig, step: Step) -> str:
    repo = step.dirs.final / artifacts.REPOSITORY
    world_size = cfg.parallel.world_size
    try:
        llmapi_layout = cfg.backend is Backend.pytorch
        launch = server.launch_for(
            cfg.triton, repo, cfg.target.is_gpu, world_size, cfg.workdir_path, create=False, llmapi=llmapi_layout
        )
    except PipelineError as error:
        return f"(cannot serve here: {error})"
    return f"(cd {repo} && {proc.quote(launch.argv)})"


def _built(cfg: PipelineConfig) -> server.Target | None:
    step = _repository_step(runner.plan(cfg, STAGES))
    if not step.cached:
        return None
    repo = step.dirs.final / artifacts.REPOSITORY
    return server.target_of_repository(repo, artifacts.serve_logs(cfg.workdir_path, step.fingerprint))


def built_target(cfg: PipelineConfig) -> server.Target:
    """The repository that ``build`` with the same overrides rendered."""
    target = _built(cfg)
    if target is None:
        raise StageError(
            "no finished Triton repository for these overrides: run `python -m pipeline build` with the same "
            "overrides first, or serve a folder with repo=<path>"
        )
    return target


def serve(cfg: PipelineConfig, repo: str | None = None, model_uri: str | None = None) -> None:
    """Serve the last build's repository (or the folder ``repo``, or the registered version
    ``model_uri=models:/<name>@<alias>``) until Ctrl-C, with the OpenAI-compatible API in front
    (openai.enabled; with serve.frontend=trtllm-serve, trtllm-serve's own)."""
    if model_uri:
        repo = str(registry.download(model_uri, runs.tracking_uri(cfg), artifacts.registry_downloads(cfg.workdir_path)))
    target = server.target_of_folder(repo, cfg.workdir_path) if repo else built_target(cfg)
    log_file = target.log_dir / f"server-{time.strftime('%Y%m%d-%H%M%S')}.log"
    with serving.serving(cfg, target, log_file, openai=cfg.openai.enabled) as endpoints:
        print("\n".join(serving.banner(target, endpoints)), flush=True)
        if server.wait_until_interrupted(endpoints.alive, endpoints.frontend):
            return
    raise StageError(f"{endpoints.frontend} exited unexpectedly; see {log_file}")


def bench(cfg: PipelineConfig, url: str | None = None) -> None:
    """Benchmark a running server (``url``: Triton's host:grpc_port, or with
    ``benchmark.endpoint=openai`` any OpenAI-compatible base URL, http://host:port/v1) or the last
    build's repository served here for the sweep. Results go to <workdir>/bench/<time>/ and to an
    MLflow run that ``compare`` lists beside the builds."""
    problems = (benchmark.url_problems(cfg, url) if url else []) + benchmark.preflight(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    target = _built(cfg) if url else built_target(cfg)  # a remote server may have no build here
    tokenizer = _bench_tokenizer(cfg, target, url)
    if url and cfg.benchmark.endpoint is Endpoint.openai and not cfg.benchmark.model:
        # asked before the MLflow run opens: an unreachable server leaves no FAILED run
        cfg.benchmark.model = serving.served_model(url, benchmark.api_key(cfg))
    out = artifacts.bench_results(cfg.workdir_path, time.strftime("%Y%m%d-%H%M%S"))
    with runs.job_run(cfg, command="bench") as run:
        results = benchmark.measure(cfg, out, tokenizer, target=target, url=url)
        if run is not None:
            run.record_bench(cfg, results, out, served_here=not url)
    print(f"results in {out}")


def evaluate(cfg: PipelineConfig, url: str | None = None) -> None:
    """Evaluate a running OpenAI-compatible server (``url=http://host:port/v1``) on ``eval.tasks``,
    or the last build's repository served here; scores and per-item records go to
    <workdir>/eval-runs/<time>/ and to an MLflow run."""
    if url is not None and not url.startswith(("http://", "https://")):
        raise ConfigError(f"url={url}: eval takes an OpenAI base URL, e.g. http://127.0.0.1:9000/v1")
    names = eval_stage.task_names(cfg)
    problems = eval_stage.preflight(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, enabled=True)))
    if problems:
        raise ConfigError("; ".join(problems))
    out = artifacts.eval_results(cfg.workdir_path, time.strftime("%Y%m%d-%H%M%S"))
    target = _built(cfg) if url else built_target(cfg)
    with runs.job_run(cfg, command="eval") as run:
        if url:
            key = benchmark.api_key(cfg)
            tokenizer = _bench_tokenizer(cfg, target, url)
            model = cfg.benchmark.model or serving.served_model(url, key)
            scores = eval_stage.evaluate_url(cfg, url, model, tokenizer, out, names, key)
            adapted: dict[str, list[Any]] = {}
        else:
            assert target is not None
            adapted = eval_stage.evaluate_target(cfg, target, out)
            scores = adapted.pop("")
        if run is not None:
            run.record_eval(scores, out)
    for prefix, each in [("", scores), *((f"{name}/", found) for name, found in adapted.items())]:
        for score in each:
            flag = "  (within noise of chance: suspect)" if score.at_chance else ""
            print(f"{prefix}{score.task}: {score.metric} {score.score:.3f} +- {score.stderr:.3f} over {score.items} "
                  f"items{flag}")  # fmt: skip
    print(f"results in {out}")


def _bench_tokenizer(cfg: PipelineConfig, target: server.Target | None, url: str | None) -> Path:
    """The tokenizer that makes prompt lengths exact: benchmark.tokenizer, else the build's."""
    if cfg.benchmark.tokenizer:
        folder = Path(cfg.benchmark.tokenizer).expanduser()
        if not (folder / "tokenizer_config.json").is_file():
            raise ConfigError(
                f"benchmark.tokenizer={cfg.benchmark.tokenizer} holds no tokenizer_config.json: "
                "point it at a folder with the served model's tokenizer"
            )
        return folder
    if target is None:
        raise ConfigError(
            f"bench url={url_without_credentials(url or '')} needs the served model's tokenizer for exact prompt "
            "lengths: build with the same overrides first, or give benchmark.tokenizer=<folder>"
        )
    return target.tokenizer_dir


def promote(cfg: PipelineConfig, run: str | None = None, version: str | None = None, alias: str = "production") -> None:
    """Point an alias of the registered model (the model config's, tracking.registered_model) at
    the version a build run registered (``run=<id>``) or at ``version=<n>``."""
    import mlflow

    if not cfg.tracking.enabled:
        raise ConfigError("promote works on the MLflow registry: drop tracking=none")
    runs.probe_store(cfg)
    client = mlflow.MlflowClient(runs.tracking_uri(cfg))
    name = registry.model_name(cfg)
    chosen = registry.promote(client, name, alias, version=version, run=run, force=cfg.force)
    print(f"models:/{name}@{alias} -> version {chosen}")
    print(f"serve it with: python -m pipeline serve model_uri=models:/{name}@{alias}")


def compare(cfg: PipelineConfig, sort: str | None = None, filter: str | None = None) -> None:
    """The runs of the MLflow store as a table."""
    print(run_table.table(cfg, sort=sort, where=filter))


# mlflow server can take many seconds to stop after SIGTERM; what it serves is in the store already
UI_STOP_GRACE_S = 3
# MLflow 3's server starts four job-runner processes (huey consumers for its GenAI scoring and trace
# archival), each an interpreter with MLflow imported, polling all the while: the runs, charts and
# registry need none of them
NO_JOB_RUNNER = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def ui(cfg: PipelineConfig, port: str = "5000") -> None:
    """The MLflow UI on this config's tracking store, with links that open each experiment on its
    runs and the headline metrics: the store's own server for an HTTP store, else ``mlflow
    server`` started here on the workdir's sqlite store until Ctrl-C."""
    uri = runs.tracking_uri(cfg)
    if tracking_ui.is_server(uri):
        _print_ui_links(cfg, tracking_ui.base_url(uri))
        return
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"port={port}: give a TCP port number, e.g. port=5000")
    if server.port_busy("127.0.0.1", int(port)):
        raise ConfigError(f"port {port} is in use (another MLflow UI?): give another one, e.g. port={int(port) + 1}")
    argv = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", port, "--workers", "1"]
    argv += ["--backend-store-uri", uri]
    running = proc.Background(argv, cfg.workdir_path / "mlflow-ui.log", env=NO_JOB_RUNNER)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while not tracking_ui.answers(base):
            if not running.alive() or time.monotonic() > deadline:
                raise PipelineError(f"mlflow server did not start: {' | '.join(running.tail[-3:])}")
            time.sleep(0.5)
        _print_ui_links(cfg, base)
        server.wait_until_interrupted(running.alive, "the MLflow UI")
    finally:
        running.stop(grace_s=UI_STOP_GRACE_S)


def _print_ui_links(cfg: PipelineConfig, base: str) -> None:
    experiments = runs.experiments(cfg)
    if not experiments:
        print(f"no experiments yet in {redact(runs.tracking_uri(cfg))}: build something first")
    for name, experiment_id in experiments:
        print(f"{name}: {tracking_ui.runs_url(base, experiment_id)}")
    print(f"models: {base}/#/models?{tracking_ui.MODE}", flush=True)


def manifests(
    cfg: PipelineConfig, kind: str = "serve", model_uri: str | None = None, overrides: list[str] | None = None
) -> None:
    """Kubernetes objects: serving the repository these overrides build (or the registered version
    ``model_uri``), or with ``kind=build`` a Job that runs the build itself."""
    step = _repository_step(runner.plan(cfg, STAGES))
    folder = artifacts.manifests(cfg.workdir_path, step.fingerprint)
    secret = kubernetes.TRACKING_SECRET
    if kind == "build":
        for path in kubernetes.write(cfg, folder, {"build-job.yaml": kubernetes.build_job(cfg, overrides or [])}):
            print(path)
        print(f"create the Secret {secret!r} (uri; username and password for basic auth) and the claim")
        print("'pipeline-workdir', then:")
        print(f"  kubectl apply -f {folder}/build-job.yaml")
        return
    if kind != "serve":
        raise ConfigError(f"kind={kind}: use kind=serve (Deployment, Service, InferenceService) or kind=build (a Job)")
    memory = None if cfg.target.is_gpu else kubernetes.cpu_memory_bytes(cfg, step.dirs.final / artifacts.REPOSITORY)
    for note in kubernetes.notes(cfg):
        log.warning("%s", note)
    for path in kubernetes.write(cfg, folder, kubernetes.build(cfg, model_uri=model_uri, memory_bytes=memory)):
        print(path)
    if model_uri:
        print(f"the init container pulls {model_uri}: create the Secret {secret!r} (uri, username, password), then:")
    else:
        built = "" if step.cached else " (not built yet: run build with the same overrides)"
        print(
            f"copy {step.dirs.final / artifacts.REPOSITORY}{built} into the PersistentVolumeClaim 'triton-repo', then:"
        )
    print(f"  kubectl apply -f {folder}/deployment.yaml -f {folder}/service.yaml   (or inferenceservice.yaml)")


def pull(cfg: PipelineConfig, model_uri: str | None = None) -> None:
    """Download a registered version (``models:/<name>@<alias>``) into the workdir; print its path."""
    if not model_uri:
        raise ConfigError("pull needs model_uri=models:/<name>@<alias> (or models:/<name>/<version>)")
    print(registry.download(model_uri, runs.tracking_uri(cfg), artifacts.registry_downloads(cfg.workdir_path)))


# name -> (function, the arguments it takes besides the config: `key=value` on the command line)
COMMANDS: dict[str, tuple[Callable[..., Any], tuple[str, ...]]] = {
    "build": (build, ()),
    "plan": (plan, ()),
    "serve": (serve, ("repo", "model_uri")),
    "promote": (promote, ("run", "version", "alias")),
    "compare": (compare, ("sort", "filter")),
    "ui": (ui, ("port",)),
    "manifests": (manifests, ("kind", "model_uri")),
    "pull": (pull, ("model_uri",)),
    "bench": (bench, ("url",)),
    "eval": (evaluate, ("url",)),
}


def run_jobs(command: str, jobs: list[tuple[list[str], PipelineConfig]], args: dict[str, str]) -> None:
    """One job runs as it is; a sweep runs every job, logs each failure and raises at the end."""
    function = COMMANDS[command][0]
    if len(jobs) == 1:
        # a build Job (manifests kind=build) runs build with the same overrides
        extra: dict[str, Any] = {"overrides": jobs[0][0]} if command == "manifests" else {}
        function(jobs[0][1], **args, **extra)
        return
    failed = []
    parent: contextlib.AbstractContextManager[str | None] = contextlib.nullcontext(None)
    if command == "build":
        parent = runs.sweep_run(jobs[0][1], [overrides for overrides, _ in jobs])
    with parent as parent_id:
        for index, (overrides, cfg) in enumerate(jobs, 1):
            log.info("job %d/%d: %s", index, len(jobs), " ".join(overrides) or "(defaults)")
            extra = {"sweep_parent": parent_id} if command == "build" else {}
            try:
                function(cfg, **args, **extra)
            except PipelineError as error:
                log.error("job %d/%d failed: %s", index, len(jobs), error)
                failed.append(" ".join(overrides))
    if failed:
        raise PipelineError(f"{len(failed)} of {len(jobs)} jobs failed: {'; '.join(failed)}")
