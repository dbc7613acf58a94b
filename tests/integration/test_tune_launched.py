"""tune's trials as jobs of a Hydra launcher (submitit's local one, the SLURM launcher's code
path), two at a time. In make test's second tier: the two jobs start two Triton servers at once,
which the first tier's load-sensitive tests should not share the cores with."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import cli

pytestmark = pytest.mark.slow


def test_tune_launches_a_batch_of_trials_through_a_launcher(
    tmp_path: Path, tiny_checkpoint: Path, mlflow_server: str
) -> None:
    """tune's trials as jobs of the submitit launcher, two at a time: both built and benchmarked in
    their own processes, read back as the tune run's children, the winner registered."""
    import mlflow

    result = cli(
        "tune",
        "model=local",
        f"model.path={tiny_checkpoint}",
        "target=cpu",
        "quant.eval_tokens=0",
        "build.max_seq_len=512",
        "build.max_input_len=256",
        "eval=none",  # a random tiny model is at chance: the launcher is under test here
        "workload.input_tokens=8",
        "workload.output_tokens=4",
        "tune.formats=[none]",
        "tune.cpu_max_batch_size=[2]",
        "tune.cpu_max_num_tokens=[32,64]",
        "tune.concurrency=[1]",
        "tune.requests_per_point=2",
        "tune.max_trials=2",
        "tune.parallel_trials=2",
        f"workdir={tmp_path}",
        f"tracking.uri={mlflow_server}",
        "tracking.experiment=tune-local",
        "tracking.registered_model=tune-launched",
        "hydra/launcher=local",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "launching 2 jobs" in result.stderr
    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("tune-local")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("pipeline.tune") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert all(client.get_metric_history(c.info.run_id, "predicted/itl_ms_p99") for c in children)
    assert client.get_model_version_by_alias("tune-launched", "tuned").run_id in {c.info.run_id for c in children}
