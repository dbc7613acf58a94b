"""Sweeps through Hydra's launcher plugins, for real: a 2-job sweep (fetching the tiny model) under
submitit_local (the SLURM launcher's code path, in local processes) and under a Ray instance
started for it, each leaving a parent run and two FINISHED children in a real `mlflow server`
with proxied artifact storage; the batch script a SLURM launcher would submit; a sweep with one bad
job submits nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import cli

pytestmark = pytest.mark.slow


def _sweep(workdir: Path, tiny_checkpoint: Path, uri: str, launcher: str) -> None:
    result = cli(
        "build",
        "-m",
        "quant=none,fp8",
        "model=local",
        f"model.path={tiny_checkpoint}",
        "target=cpu",
        "until=fetch",  # the launcher, not the work, is under test: each job is a short process
        f"workdir={workdir}",
        f"tracking.uri={uri}",
        f"tracking.experiment=sweep-{launcher}",
        f"hydra/launcher={launcher}",
    )
    assert result.returncode == 0, result.stderr[-3000:]


def _runs(uri: str, experiment: str) -> tuple[object, list[object]]:
    import mlflow

    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    runs = client.search_runs([found.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("pipeline.sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return parent, children


# the Ray case is in test_launchers_ray.py, on make test's serial tier: Ray gives its node a fixed
# 30 s to register, which two busy cores once exceeded
@pytest.mark.parametrize("launcher", ["local"])
def test_a_sweep_through_a_launcher_leaves_a_parent_and_two_finished_children(
    tmp_path: Path, tiny_checkpoint: Path, mlflow_server: str, launcher: str
) -> None:
    """``local`` is this project's preset of submitit_local."""
    check_sweep(tmp_path, tiny_checkpoint, mlflow_server, launcher)


def check_sweep(tmp_path: Path, tiny_checkpoint: Path, mlflow_server: str, launcher: str) -> None:
    """A 2-job sweep through ``launcher`` leaves a parent run and two FINISHED children, each with
    its config and log in the server's proxied artifact storage."""
    _sweep(tmp_path, tiny_checkpoint, mlflow_server, launcher)
    parent, children = _runs(mlflow_server, f"sweep-{launcher}")
    assert parent.info.status == "FINISHED"  # type: ignore[attr-defined]
    assert sorted(c.data.params["quant"] for c in children) == ["fp8", "none"]  # type: ignore[attr-defined]
    assert all(c.info.status == "FINISHED" for c in children)  # type: ignore[attr-defined]
    import mlflow

    # each child logged its resolved config and its log through the server's proxied artifact storage
    client = mlflow.MlflowClient(mlflow_server)
    for child in children:
        paths = {a.path for a in client.list_artifacts(child.info.run_id)}  # type: ignore[attr-defined]
        assert {"config.yaml", "job.log"} <= paths, paths
    assert list((tmp_path / "sweeps").glob("*/.submitit")) or launcher == "ray"


def test_one_bad_job_of_a_launched_sweep_submits_nothing(tmp_path: Path, tiny_checkpoint: Path) -> None:
    result = cli(
        "build",
        "-m",
        "parallel.tp=1,2",
        "model=local",
        f"model.path={tiny_checkpoint}",
        "target=cpu",
        f"workdir={tmp_path}",
        "hydra/launcher=local",
    )
    assert result.returncode == 1 and "parallel.tp=2 does not split" in result.stderr
    assert not (tmp_path / "sweeps").exists()
