"""Command line: ``python -m pipeline <command> [-m] [key=value ...]``.

The command and its own arguments (``repo=``, ``url=``, ``sort=``, ``filter=``) are taken off argv
before Hydra sees the rest (Hydra rejects a bare word). Every configuration of a job, or of all
jobs of a multirun sweep, is composed and validated once, before any stage runs, and handed to the
command in ``pipeline.app``. A PipelineError becomes one line on stderr and exit status 1
(``PIPELINE_DEBUG=1`` adds the traceback, redacted), as does an unusable file or folder (OSError,
ValueError, KeyError); a bad or missing command prints usage and exits 2. SIGTERM and SIGHUP stop
a command as Ctrl-C does (exit 128 + the signal's number).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence

from pipeline import app, launchers, logs, validate
from pipeline.config import compose
from pipeline.config.schema import to_yaml
from pipeline.errors import ConfigError, PipelineError, Terminated
from pipeline.redact import redact
from pipeline.tune import command as tune_command

USAGE = """\
usage: python -m pipeline <command> [-m] [key=value ...]

Compile and deploy LLMs with TensorRT-LLM: fetch a checkpoint, quantize it, build engines, serve
them with Triton, benchmark, and track every run.

commands:
  build   run every stage; finished stages are reused (force=true redoes them)
  plan    show what build would do: each stage, its fingerprint, cached or not, and the config
  serve   serve the repository of the last build with the same overrides (or repo=<path>, or a
          registered version: model_uri=models:/<name>@<alias>) until Ctrl-C
  promote point an alias of the registered model at a build's version: run=<id>|version=<n> alias=production
  compare table of the runs in the MLflow store: sort=<column> filter="params.quant = 'fp8'"
  ui      the MLflow UI on the store (port=5000), opened on the runs and their headline metrics
  bench   benchmark a running server (url=host:grpc_port) or the last build's repository
  eval    evaluate a running OpenAI-compatible server (url=http://host:port/v1) or the last build's
          repository on eval.tasks (lm-evaluation-harness; the pipeline's own tasks by default)
  manifests  Kubernetes YAML (Deployment or LeaderWorkerSet, Service, KServe InferenceService)
  tune    search the deployments that meet slo.* on workload.* for the cheapest: candidates ranked by
          a performance model, the best built and measured, the winner gated and registered (@tuned)

options:
  -m, --multirun  one job per combination of comma-separated values, e.g. parallel.tp=1,3; with
                  hydra/launcher=slurm|submitit_slurm|local|ray|ray_cluster the jobs go to SLURM,
                  local processes or Ray through Hydra's launcher plugins
  -h, --help      this help; `python -m pipeline build --help` lists config groups and keys

examples:
  python -m pipeline build                                  # embedded SmolLM2-135M, CPU
  python -m pipeline build model=llama70b parallel.tp=2 workdir=/data/artifacts
  python -m pipeline plan model=llama8b
  python -m pipeline build -m parallel.tp=1,3
  python -m pipeline serve triton.http_port=9000
  python -m pipeline build -m quant=fp8,int4_awq parallel.tp=1,2 hydra/launcher=slurm
  python -m pipeline promote run=<id> alias=production
  python -m pipeline serve model_uri=models:/smollm2-135m@production
  python -m pipeline tune model=llama70b target=h100 workload.input_tokens=2048 slo.itl_ms_p99=30 dry_run=true
"""
COMMANDS = (*app.COMMANDS, "tune")


def command_help(command: str) -> str:
    """Hydra-style help: config groups with their options, then every key with its default."""
    lines = [f"usage: python -m pipeline {command} [-m] [key=value ...]", "", "config groups:"]
    defaults = compose.typed([])
    for group in compose.groups():
        options = [o for o in compose.group_options(group) if not o.endswith(compose.SCHEMA_SUFFIX)]
        current = getattr(getattr(defaults, group, None), "name", None)
        lines.append(f"  {group}={'|'.join(options)}" + (f"   (default: {current})" if current else ""))
    lines += ["", "config keys and defaults (override any of them as key=value):", ""]
    lines.append(to_yaml(defaults).rstrip())
    return "\n".join(lines)


def parse(command: str, rest: list[str]) -> tuple[list[str], bool, dict[str, str]]:
    """A command's argv (after the command) -> (config overrides, multirun, command arguments)."""
    multirun = "-m" in rest or "--multirun" in rest
    overrides = [a for a in rest if a not in ("-m", "--multirun")]
    keys = app.COMMANDS[command][1] if command in app.COMMANDS else ()
    args = dict(a.split("=", 1) for a in overrides if a.split("=", 1)[0] in keys)
    return [a for a in overrides if a.split("=", 1)[0] not in keys], multirun, args


def run(command: str, rest: list[str]) -> None:
    overrides, multirun, args = parse(command, rest)
    refuse_interpolation(overrides)
    logs.setup()
    launchers.check_choice(overrides)
    job_overrides = compose.expand_sweep(overrides) if multirun else [overrides]
    # every job's config is composed and checked once, before the first job does any work
    # (plan prints its memory table before the verdict on it; tune searches for what fits)
    jobs = [(job, validate.load(job, check_memory=command not in ("plan", "tune"))) for job in job_overrides]
    if command == "tune":
        if multirun:
            raise ConfigError("tune searches by itself: drop -m (list the choices in tune.* instead)")
        tune_command.tune(jobs[0][1], overrides)
        return
    if command == "build" and multirun and launchers.chosen_launcher(overrides) not in launchers.IN_PROCESS:
        if jobs[0][1].dry_run:
            print(redact(launchers.describe(jobs)))
            print("dry run: nothing was submitted (drop dry_run=true to launch)")
            return
        launchers.launch(jobs)  # SLURM, Ray or local processes, through Hydra's launcher plugins
        return
    app.run_jobs(command, jobs, args)


def _debug_traceback() -> None:
    if os.environ.get("PIPELINE_DEBUG") == "1":
        print(redact(traceback.format_exc()), file=sys.stderr, end="")


def refuse_interpolation(overrides: Sequence[str]) -> None:
    """``${oc.env:HF_TOKEN}`` and other resolvers would copy the environment into the printed and
    recorded config: values on the command line are taken literally or not at all."""
    for override in overrides:
        key = override.split("=", 1)[0]
        if "${" in override:
            raise ConfigError(
                f"{key}: overrides cannot use ${{...}} interpolation (it can read the "
                "environment into logs and the MLflow store); give the value itself"
            )
        if "$(" in override:  # the kubelet expands $(VAR) in the args of the manifests' containers
            raise ConfigError(
                f"{key}: overrides cannot hold $(...) (Kubernetes would expand it); give the value itself"
            )
        if "\n" in override or "\r" in override:  # a line of its own in a SLURM batch script
            raise ConfigError(f"{key}: an override cannot hold a line break; give the value on one line")


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP (``kill``, ``timeout``, systemd, ``docker stop``, a closed terminal) end
    every command the way Ctrl-C does, instead of killing Python before any cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    received: list[int] = []

    def interrupt(signum: int, _frame: object) -> None:
        # the first signal starts the stop; repeats must not cut the cleanup short (it ends
        # with SIGKILL for whatever does not stop in time), so they are ignored from now on
        received.append(signum)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        raise Terminated(signum)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        if not received:  # a stopping process keeps ignoring repeats until it exits
            for sig, handler in previous.items():
                signal.signal(sig, handler)


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
    try:
        with stop_signals_interrupt():
            run(command, rest)
        return 0
    except PipelineError as error:
        _debug_traceback()
        print(f"error: {redact(str(error))}", file=sys.stderr)
        return 1
    except (OSError, ValueError, KeyError) as error:  # a file or folder we were given, unusable
        _debug_traceback()
        detail = f"{type(error).__name__}: {error}"
        print(f"error: {redact(detail)} (PIPELINE_DEBUG=1 shows where)", file=sys.stderr)
        return 1
    except Exception as error:
        if not type(error).__module__.startswith("mlflow"):
            raise
        _debug_traceback()  # the tracking server failed mid-run: one line, and the stages are kept
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"error: the tracking server failed: {redact(first)[:300]} (the stages done are kept: run the "
              "same command again once it answers)", file=sys.stderr)  # fmt: skip
        return 1
    except Terminated as stop:
        print(f"stopped by {signal.Signals(stop.signum).name}: run the same command again to resume", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
