"""Command line: ``python -m pipeline <command> [-m] [key=value ...]``.

The command is taken off argv before Hydra sees the rest (Hydra rejects a bare word). Every
configuration of a job, or of all jobs of a multirun sweep, is composed and validated before any
stage runs. A PipelineError becomes one line on stderr and exit status 1 (``PIPELINE_DEBUG=1``
adds the traceback); a bad or missing command prints usage and exits 2.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError, PipelineError

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig
    from pipeline.runner import Step

log = logging.getLogger("pipeline")

USAGE = """\
usage: python -m pipeline <command> [-m] [key=value ...]

Compile and deploy LLMs with TensorRT-LLM: fetch a checkpoint, quantize it, build engines, serve
them with Triton, benchmark, and track every run.

commands:
  build   run every stage; finished stages are reused (force=true redoes them)
  plan    show what build would do: each stage, its fingerprint, cached or not, and the config
  serve   serve the repository of the last build with the same overrides (or repo=<path>) until Ctrl-C
  compare table of the runs in the MLflow store: sort=<column> filter="params.quant = 'fp8'"
  bench   benchmark a running server (url=host:grpc_port) or the last build's repository
  manifests  Kubernetes YAML (Deployment or LeaderWorkerSet, Service, KServe InferenceService)

options:
  -m, --multirun  one job per combination of comma-separated values, e.g. parallel.tp=1,3
  -h, --help      this help; `python -m pipeline build --help` lists config groups and keys

examples:
  python -m pipeline build                                  # embedded SmolLM2-135M, CPU
  python -m pipeline build model=llama70b parallel.tp=2 workdir=/data/artifacts
  python -m pipeline plan model=llama8b
  python -m pipeline build -m parallel.tp=1,3
  python -m pipeline serve triton.http_port=9000
"""


def _cmd_plan(overrides: list[str]) -> None:
    from pipeline import config, runner

    cfg = config.load(overrides)
    print("# resolved config")
    print(config.to_yaml(cfg).rstrip())
    _print_memory_plan(cfg)
    print("\n# stages")
    steps = runner.plan(cfg)
    print(runner.format_plan(steps, cfg))
    _print_stage_details(cfg, [s.name for s in steps])
    print("\n# serve (python -m pipeline serve)")
    print(_serve_command(cfg, steps))


def _print_stage_details(cfg: PipelineConfig, stages: list[str]) -> None:
    from pipeline import model_repo, planner

    if "quantize" in stages:
        print(f"\n# quantize {planner.quantize_placement(cfg)}")
    if "triton_repo" in stages:
        params = model_repo.engine_parameters(cfg)
        print(f"\n# {model_repo.ENGINE_MODEL} model parameters (Triton repository)")
        print("\n".join(f'{key}: "{value}"' for key, value in params.items()))


def _print_memory_plan(cfg: PipelineConfig) -> None:
    import json

    from pipeline import planner, runner

    if not planner.applies(cfg):
        print("\n# memory plan: for GPU targets only (this is the CPU target)")
        return
    print("\n# memory plan")
    print(planner.format_table(cfg))
    out = runner.workdir_of(cfg) / "plan.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    options = [p.to_dict() for p in planner.alternatives(cfg)]
    out.write_text(json.dumps({"requested": planner.plan_for(cfg).to_dict(), "options": options}, indent=2) + "\n")
    print(f"(written to {out})")


def _serve_command(cfg: PipelineConfig, steps: list[Step]) -> str:
    from pipeline import proc, runner, serve
    from pipeline.config import TargetKind

    repo = next(s for s in steps if s.name == "triton_repo").dirs.final / "repository"
    on_gpu = cfg.target.kind is TargetKind.gpu
    world_size = cfg.parallel.tp * cfg.parallel.pp
    try:
        launch = serve.launch_for(cfg.triton, repo, on_gpu, world_size, runner.workdir_of(cfg), create=False)
    except PipelineError as error:
        return f"(cannot serve here: {error})"
    return f"(cd {repo} && {proc.quote(launch.argv)})"


def _cmd_build(overrides: list[str]) -> None:
    from pipeline import config, runner

    cfg = config.load(overrides)
    if cfg.dry_run:
        print(runner.format_plan(runner.plan(cfg), cfg))
        print("dry run: nothing was run (drop dry_run=true to build)")
        return
    from pipeline import tracking

    with tracking.job_run(cfg, _SWEEP.get("parent")) as run:
        steps = runner.build(cfg)
        if run is not None:
            run.record(cfg, steps)
    for step in steps:
        took = f"{step.seconds:.1f} s" if step.seconds is not None else "cached"
        print(f"{step.name:<10} {took:<10} {step.dirs.final}")


def _cmd_compare(overrides: list[str]) -> None:
    from pipeline import compare, config

    cfg = config.load(overrides)
    print(compare.table(cfg, sort=_COMMAND_ARGS.get("sort"), where=_COMMAND_ARGS.get("filter")))


def _cmd_bench(overrides: list[str]) -> None:
    """Benchmark a server that is already running (url=host:grpc_port), or start one on the
    repository of the last build with the same overrides; results go to <workdir>/bench/<time>/."""
    import time

    from pipeline import config, runner, serve
    from pipeline.stages import benchmark

    cfg = config.load(overrides)
    target = serve.target_of_build(cfg)  # its tokenizer gives exact prompt lengths
    out = runner.workdir_of(cfg) / "bench" / time.strftime("%Y%m%d-%H%M%S")
    benchmark.measure(cfg, target, out, runner.workdir_of(cfg), url=_COMMAND_ARGS.get("url"))
    print(f"results in {out}")


def _cmd_manifests(overrides: list[str]) -> None:
    from pipeline import config, manifests, runner

    cfg = config.load(overrides)
    step = next(s for s in runner.plan(cfg) if s.name == "triton_repo")
    folder = runner.workdir_of(cfg) / "manifests" / step.fingerprint
    for path in manifests.write(cfg, folder):
        print(path)
    built = "" if step.cached else " (not built yet: run build with the same overrides)"
    print(f"copy {step.dirs.final / 'repository'}{built} into the PersistentVolumeClaim 'triton-repo', then:")
    print(f"  kubectl apply -f {folder}/deployment.yaml -f {folder}/service.yaml   (or inferenceservice.yaml)")


def _cmd_serve(overrides: list[str]) -> None:
    from pipeline import config, runner, serve

    repo = _COMMAND_ARGS.get("repo")
    cfg = config.load(overrides)
    target = serve.target_of_folder(repo, runner.workdir_of(cfg)) if repo else serve.target_of_build(cfg)
    serve.serve_until_stopped(cfg, target)


COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "build": _cmd_build,
    "plan": _cmd_plan,
    "serve": _cmd_serve,
    "compare": _cmd_compare,
    "manifests": _cmd_manifests,
    "bench": _cmd_bench,
}
# Arguments that belong to a command rather than to the config (e.g. `serve repo=<path>`); they are
# taken off argv before Hydra sees it.
COMMAND_KEYS = {"serve": ("repo",), "compare": ("sort", "filter"), "bench": ("url",)}
_COMMAND_ARGS: dict[str, str] = {}
_SWEEP: dict[str, str | None] = {}  # the MLflow parent run of a -m sweep


def command_help(command: str) -> str:
    """Hydra-style help: config groups with their options, then every key with its default."""
    from pipeline import config

    lines = [f"usage: python -m pipeline {command} [-m] [key=value ...]", "", "config groups:"]
    defaults = config.to_typed(config.compose([]))
    for group in config.groups():
        options = [o for o in config.group_options(group) if not o.endswith(config.SCHEMA_SUFFIX)]
        current = getattr(getattr(defaults, group, None), "name", None)
        lines.append(f"  {group}={'|'.join(options)}" + (f"   (default: {current})" if current else ""))
    lines += ["", "config keys and defaults (override any of them as key=value):", ""]
    lines.append(config.to_yaml(defaults).rstrip())
    return "\n".join(lines)


def expand_sweep(overrides: Sequence[str]) -> list[list[str]]:
    """Hydra's sweep syntax (``a=1,2``, ``range()``, ``choice()``) -> one override list per job."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as error:
        from pipeline.config_errors import describe

        raise ConfigError(describe(error, overrides)) from error
    choices = []
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override():
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line or f"{key}={override.get_value_element_as_str()}"])
    return [list(job) for job in itertools.product(*choices)]


def _run(command: str, overrides: list[str], multirun: bool) -> int:
    from pipeline import config, logs

    logs.setup()
    jobs = expand_sweep(overrides) if multirun else [overrides]
    for job in jobs:  # refuse a bad combination before the first job does any work
        config.load(job)
    if len(jobs) == 1:
        COMMANDS[command](jobs[0])
        return 0
    failed = []
    parent = contextlib.nullcontext(None)
    if command == "build":
        from pipeline import tracking

        parent = tracking.sweep_run(config.load(jobs[0]), jobs)
    with parent as parent_id:
        _SWEEP["parent"] = parent_id
        for index, job in enumerate(jobs, 1):
            log.info("job %d/%d: %s", index, len(jobs), " ".join(job) or "(defaults)")
            try:
                COMMANDS[command](job)
            except PipelineError as error:
                log.error("job %d/%d failed: %s", index, len(jobs), error)
                failed.append(" ".join(job))
    if failed:
        raise PipelineError(f"{len(failed)} of {len(jobs)} jobs failed: {'; '.join(failed)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="", file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"error: unknown command '{command}' (choose {', '.join(COMMANDS)})\n", file=sys.stderr)
        print(USAGE, end="", file=sys.stderr)
        return 2
    if "-h" in rest or "--help" in rest:
        print(command_help(command))
        return 0
    multirun = "-m" in rest or "--multirun" in rest
    overrides = [a for a in rest if a not in ("-m", "--multirun")]
    for key in COMMAND_KEYS.get(command, ()):
        _COMMAND_ARGS.update(a.split("=", 1) for a in overrides if a.startswith(f"{key}="))
        overrides = [a for a in overrides if not a.startswith(f"{key}=")]
    try:
        return _run(command, overrides, multirun)
    except PipelineError as error:
        if os.environ.get("PIPELINE_DEBUG") == "1":
            traceback.print_exc()
        from pipeline.redact import redact

        print(f"error: {redact(str(error))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
