"""Sweeps through Hydra's launcher plugins:

    python -m pipeline build -m quant=fp8,int4_awq parallel.tp=1,2 hydra/launcher=submitit_slurm

The CLI composes each job's config itself (rather than under ``@hydra.main``) so that every job is
validated before the first is submitted. A sweep that names a launcher other than Hydra's basic one
is then handed to that launcher through Hydra's launcher API: ``submitit_slurm`` (a SLURM array
job), ``submitit_local`` (local processes, the same code path), ``ray`` (a Ray cluster), or this
project's presets in ``conf/hydra/launcher/``. Each job runs ``build`` with its own overrides as a
child of the sweep's MLflow run, wherever the launcher puts it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pipeline import app
from pipeline.assets import CONF_DIR
from pipeline.config import compose
from pipeline.config.schema import PipelineConfig
from pipeline.errors import ConfigError, PipelineError
from pipeline.tracking import runs

log = logging.getLogger(__name__)

LAUNCHER_GROUP = "hydra/launcher"
IN_PROCESS = (None, "basic")  # Hydra's basic launcher: the jobs run here, one after another
JOB_NAME = "pipeline-build"  # what SLURM and submitit call the sweep's jobs


def chosen_launcher(overrides: Sequence[str]) -> str | None:
    """The ``hydra/launcher=<name>`` of a job's overrides, or None."""
    for override in overrides:
        key, _, value = override.partition("=")
        if key == LAUNCHER_GROUP:
            return value
    return None


def available() -> list[str]:
    """Every ``hydra/launcher`` choice: the installed plugins' and this project's presets."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()  # discovers the plugins, which register their configs
    group = ConfigStore.instance().repo.get("hydra", {}).get("launcher", {})
    # ray_aws needs boto3, which this project leaves out (see the cluster extra in pyproject.toml)
    plugins = {name.removesuffix(".yaml") for name in group} - {"ray_aws"}
    presets = {path.stem for path in (CONF_DIR / "hydra" / "launcher").glob("*.yaml")}
    return sorted(plugins | presets)


def check_choice(overrides: Sequence[str]) -> None:
    """An unknown launcher is refused by name, with the choices, before any config is composed."""
    name = chosen_launcher(overrides)
    if name is not None and name not in available():
        raise ConfigError(f"{LAUNCHER_GROUP}={name} is not a launcher here: use one of {', '.join(available())}")


def launcher_config(first: Sequence[str], sweep_dir: Path) -> tuple[Any, DictConfig]:
    """Hydra's config loader and the sweep's config for the first job's overrides: the launcher's
    settings are the sweep's, resolved against that job (``${target.count}`` GPUs per node)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode
    from hydra.version import setbase

    setbase("1.3")
    compose.register()
    GlobalHydra.instance().clear()
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF_DIR)))
    overrides = [*first, f"hydra.sweep.dir={sweep_dir}", "hydra.job.chdir=false", f"hydra.job.name={JOB_NAME}"]
    for group in ("hydra/job_logging", "hydra/hydra_logging"):  # the jobs log as every build does
        if not any(o.startswith(f"{group}=") for o in first):
            overrides.append(f"{group}=none")
    try:
        config = loader.load_configuration("config", overrides=overrides, run_mode=RunMode.MULTIRUN)
    except Exception as error:  # Hydra raises several types, all meaning "this launcher cannot be set up"
        raise ConfigError(f"{LAUNCHER_GROUP}: {str(error).splitlines()[0]}") from error
    return loader, config


def launch(jobs: list[tuple[list[str], PipelineConfig]], parent: str | None = None) -> None:
    """Run validated ``build`` jobs through their launcher, as children of ``parent`` (a tune's
    run) or, without one, of a new sweep run; raise when any job failed."""
    if parent is not None:
        _launch(jobs, parent)
        return
    with runs.sweep_run(jobs[0][1], [overrides for overrides, _ in jobs]) as sweep:
        _launch(jobs, sweep)


def _launch(jobs: list[tuple[list[str], PipelineConfig]], parent: str | None) -> None:
    from hydra._internal.callbacks import Callbacks
    from hydra.core.plugins import Plugins
    from hydra.core.utils import JobStatus
    from hydra.types import HydraContext

    first = jobs[0][1]
    workdir = first.workdir_path
    sweep_dir = workdir / "sweeps" / time.strftime("%Y%m%d-%H%M%S")
    loader, config = launcher_config(jobs[0][0], sweep_dir)
    context = HydraContext(config_loader=loader, callbacks=Callbacks(config))
    launcher = Plugins.instance().instantiate_launcher(hydra_context=context, task_function=build_job, config=config)
    name = chosen_launcher(jobs[0][0])
    job_overrides = [
        # every job sees the sweep's workdir as an absolute path (a SLURM job or Ray worker starts
        # elsewhere) and its parent run; launcher settings stay with the sweep
        [o for o in overrides if not o.startswith(("hydra", "workdir=", "tracking.parent_run="))]
        + [f"workdir={cfg.workdir_path}", f"tracking.parent_run={parent or 'null'}"]
        for overrides, cfg in jobs
    ]
    log.info("launching %d jobs with %s %s=%s (logs under %s)", len(jobs), "Hydra's", LAUNCHER_GROUP, name, sweep_dir)
    try:
        returns = launcher.launch(job_overrides, initial_job_idx=0)
    except PipelineError:
        raise
    except Exception as error:  # submitit re-raises a failed job's error wrapped in its own
        lines = [line for line in str(error).splitlines() if line.strip()]
        raise PipelineError(
            f"a job of the sweep failed: {lines[-1] if lines else error} (logs under {sweep_dir})"
        ) from error
    failed = []
    for overrides, result in zip(job_overrides, returns, strict=True):
        if result.status is not JobStatus.COMPLETED:
            failed.append(" ".join(overrides[:-2]) or "(defaults)")
            log.error("job failed: %s: %s", " ".join(overrides[:-2]), getattr(result, "_return_value", None))
    if failed:
        raise PipelineError(f"{len(failed)} of {len(jobs)} jobs failed: {'; '.join(failed)}")


# the submitit plugin's own settings, not sbatch's
PLUGIN_ONLY = ("_target_", "submitit_folder", "max_num_timeout", "wait_for_completion")


def _is_slurm(config: DictConfig) -> bool:
    return str(config.hydra.launcher.get("_target_", "")).endswith(".SlurmLauncher")


def batch_script(config: DictConfig, jobs: int) -> str:
    """The sbatch script a SLURM launcher (``config``, the sweep's config) would submit for
    ``jobs`` jobs (an array job, one task per job), written by submitit itself."""
    import sys

    from omegaconf import OmegaConf
    from submitit.slurm import slurm

    params = OmegaConf.to_container(config.hydra.launcher, resolve=True)
    assert isinstance(params, dict)
    # the plugin's generic names (timeout_min, gpus_per_node...) -> sbatch's, as submitit maps them
    rename: dict[str, str] = {str(k): str(v) for k, v in slurm.SlurmExecutor._equivalence_dict().items()}
    values = {rename.get(str(k), str(k)): v for k, v in params.items() if k not in PLUGIN_ONLY and v is not None}
    if "mem" in values:
        values["mem"] = f"{values['mem']}GB"
    folder = str(params["submitit_folder"])
    command = f"{sys.executable} -u -m submitit.core._submit {folder}"
    return str(slurm._make_sbatch_string(command=command, folder=folder, map_count=jobs, **values))


def describe(jobs: list[tuple[list[str], PipelineConfig]]) -> str:
    """What ``launch`` would do, submitting nothing (``dry_run=true``)."""
    name = chosen_launcher(jobs[0][0])
    sweep_dir = jobs[0][1].workdir_path / "sweeps" / time.strftime("%Y%m%d-%H%M%S")
    lines = [f"# {len(jobs)} jobs through {LAUNCHER_GROUP}={name} (logs under {sweep_dir})"]
    lines += [f"  {' '.join(o for o in overrides if not o.startswith('hydra'))}" for overrides, _ in jobs]
    _, config = launcher_config(jobs[0][0], sweep_dir)
    if _is_slurm(config):
        lines += ["", "# the batch script submitted to SLURM", batch_script(config, len(jobs))]
    return "\n".join(lines)


def build_job(cfg: DictConfig) -> None:
    """One launched job: ``build`` with the job's config, wherever the launcher runs it."""
    from pipeline import logs, validate

    logs.setup()
    typed = validate.checked(compose.to_typed(cfg))  # as validate.load makes it: the same fingerprints
    app.build(typed, sweep_parent=typed.tracking.parent_run)
