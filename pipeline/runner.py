"""The ordered stage loop. For each stage: fingerprint what it depends on, skip it when a finished
result with that fingerprint exists, otherwise run it into a partial folder under a lock and seal
it with a manifest (see ``workspace``). ``plan()`` decides; ``build()`` acts on the same decision,
so ``plan`` and ``dry_run`` show exactly what ``build`` would do. The stages are passed in (the
pipeline's are ``pipeline.stages.STAGES``): the loop knows the stage contract, not the stages."""

from __future__ import annotations

import datetime as dt
import logging
import resource
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import __version__, proc
from pipeline.artifacts import STAGE_LOG
from pipeline.config.schema import PipelineConfig
from pipeline.errors import ConfigError, PipelineError
from pipeline.logs import captured_to
from pipeline.tables import aligned
from pipeline.workspace import (
    Stage,
    StageDirs,
    StageWorkspace,
    fingerprint,
    locked,
    no_space,
    remove_stale,
    tool_versions,
)

log = logging.getLogger(__name__)


@dataclass
class Step:
    """One stage's place in a plan, and after ``build`` its outcome."""

    stage: Stage
    fingerprint: str
    dirs: StageDirs
    depends_on: dict[str, Any]
    tools: dict[str, str]
    cached: bool
    command: list[str] | None = None  # the external command this stage will run, for plan/dry_run
    seconds: float | None = None
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.stage.NAME


def plan(cfg: PipelineConfig, stages: Sequence[Stage]) -> list[Step]:
    """Fingerprint every stage in order and look up which results already exist. Cheap: reads
    config and manifests only."""
    workdir = cfg.workdir_path
    names = [stage.NAME for stage in stages]
    if cfg.until is not None and cfg.until not in names:
        raise ConfigError(f"until={cfg.until} is not a stage: use until={'|'.join(names)}")
    if unknown := sorted(set(cfg.redo) - set(names)):
        raise ConfigError(f"redo={unknown} names no stage: use stage names from {', '.join(names)}")
    steps: list[Step] = []
    upstream: str | None = None
    inputs: dict[str, Path] = {}
    for stage in stages:
        if steps and steps[-1].name == cfg.until:
            break
        depends = stage.depends_on(cfg)
        tools = tool_versions(stage.TOOLS)
        fp = fingerprint(stage.NAME, stage.VERSION, depends, upstream, tools)
        dirs = StageDirs(workdir / stage.NAME, fp)
        describe = getattr(stage, "command", None)
        command = describe(cfg, inputs, dirs.final, workdir) if describe else None
        # a stage that measures the machine (benchmark) is never taken from the cache
        cached = dirs.is_done() and not getattr(stage, "ALWAYS_RUN", False)
        steps.append(Step(stage, fp, dirs, depends, tools, cached=cached, command=command))
        inputs[stage.NAME] = dirs.final
        upstream = fp
    return steps


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux; it is the process's peak so far, not the stage's alone.
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _redo(cfg: PipelineConfig, step: Step) -> bool:
    return cfg.force or step.name in cfg.redo or getattr(step.stage, "ALWAYS_RUN", False)


def _run_step(step: Step, cfg: PipelineConfig, inputs: dict[str, Path], workdir: Path) -> None:
    dirs = step.dirs
    with locked(dirs.lock):
        if not _redo(cfg, step) and (manifest := dirs.manifest()) is not None:
            log.info("%s: finished meanwhile by another process (%s)", step.name, dirs.final)
            step.results = manifest.get("results", {})
            return
        out = dirs.start()
        started = dt.datetime.now(dt.UTC)
        clock = time.perf_counter()
        log.info("%s: running (fingerprint %s)", step.name, step.fingerprint)
        try:
            with captured_to(out / STAGE_LOG):
                step.results = step.stage.run(cfg, StageWorkspace(out, dict(inputs), workdir)) or {}
        except PipelineError:
            if getattr(step.stage, "KEEP_ON_ERROR", False):  # e.g. benchmark points measured before a crash
                log.error("%s failed; what it measured is kept at %s", step.name, out)
            else:
                shutil.rmtree(out, ignore_errors=True)  # a user-fixable failure: nothing worth keeping
            raise
        except OSError as error:
            full = no_space(error)
            if full is None:
                log.error("%s failed; its unfinished output is kept for inspection at %s", step.name, out)
                raise
            shutil.rmtree(out, ignore_errors=True)  # half an output on a full disk helps nobody
            raise full from error
        except BaseException:
            log.error("%s failed; its unfinished output is kept for inspection at %s", step.name, out)
            raise
        step.seconds = round(time.perf_counter() - clock, 3)
        dirs.commit(
            {
                "stage": step.name,
                "fingerprint": step.fingerprint,
                "stage_version": step.stage.VERSION,
                "pipeline_version": __version__,
                "depends_on": step.depends_on,
                "tools": step.tools,
                "started": started.isoformat(timespec="seconds"),
                "seconds": step.seconds,
                "process_peak_rss_mb": _peak_rss_mb(),
                "results": step.results,
            }
        )
        log.info("%s: done in %.1f s -> %s", step.name, step.seconds, dirs.final)


def preflight(cfg: PipelineConfig, steps: list[Step]) -> None:
    """Refuse what cannot work here (a missing tool or package) before any stage does heavy work:
    the checks of every stage that will run."""
    problems = []
    for step in steps:
        check = getattr(step.stage, "preflight", None)
        if check is not None and (_redo(cfg, step) or not step.cached):
            problems += check(cfg)
    if problems:
        raise PipelineError("; ".join(problems))


def build(cfg: PipelineConfig, stages: Sequence[Stage], planned: list[Step] | None = None) -> list[Step]:
    """Run every stage that is not already done (all of them with ``force``). ``planned``: the
    steps ``plan`` made and ``preflight`` passed for these stages, so they are not made again."""
    workdir = cfg.workdir_path
    steps = planned if planned is not None else plan(cfg, stages)
    if planned is None:
        preflight(cfg, steps)
    remove_stale(workdir, [stage.NAME for stage in stages])
    inputs: dict[str, Path] = {}
    for step in steps:
        verify = getattr(step.stage, "verify", None)
        if step.cached and not _redo(cfg, step):
            manifest = step.dirs.manifest() or {}
            step.results = manifest.get("results", {})
            log.info("%s: cached (fingerprint %s) at %s", step.name, step.fingerprint, step.dirs.final)
        else:
            _run_step(step, cfg, inputs, workdir)
        if verify is not None:  # checks that hold for fresh and cached results alike
            verify(cfg, step.dirs.final)
        inputs[step.name] = step.dirs.final
    return steps


def format_plan(steps: Sequence[Step], cfg: PipelineConfig) -> str:
    rows = [("stage", "fingerprint", "status", "artifacts")]
    for step in steps:
        redo = _redo(cfg, step)
        status = "cached" if step.cached and not redo else ("redo" if step.cached else "will run")
        rows.append((step.name, step.fingerprint, status, str(step.dirs.final)))
    lines = aligned(rows)
    for step in steps:
        if step.command:
            lines += ["", f"# {step.name} runs:", proc.quote(step.command)]
    return "\n".join(lines)
