"""How the pipeline's MLflow experiments and sweep runs present themselves in MLflow's UI, against a
real sqlite store."""

from __future__ import annotations

from pathlib import Path

from pipeline import validate
from pipeline.tracking import runs


def test_a_sweep_is_named_by_what_varies() -> None:
    jobs = [["quant=none", "workdir=/a/b", "parallel.tp=1"], ["quant=fp8", "workdir=/a/b", "parallel.tp=1"]]
    assert runs.sweep_name(jobs) == "sweep: quant=none,fp8"
    two = [["quant=none", "parallel.tp=1"], ["quant=fp8", "parallel.tp=2"]]
    assert runs.sweep_name(two) == "sweep: quant=none,fp8 parallel.tp=1,2"
    assert runs.sweep_name([["workdir=/x"], ["workdir=/x"]]) == "sweep: 2 jobs"


def test_experiments_are_model_development_ones_and_older_ones_are_marked(tmp_path: Path) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = validate.load([f"workdir={tmp_path}", "target=cpu", f"tracking.uri={uri}"])
    client = mlflow.MlflowClient(uri)
    older = client.create_experiment("made-before", artifact_location=(tmp_path / "a").as_uri())
    chosen = client.create_experiment("chosen-in-the-ui", artifact_location=(tmp_path / "b").as_uri())
    client.set_experiment_tag(chosen, "mlflow.experimentKind", "finetuning")
    for name in ("new-one", "made-before", "chosen-in-the-ui"):
        cfg.tracking.experiment = name
        _, experiment_id = runs._client_and_experiment(cfg)
        kind = client.get_experiment(experiment_id).tags["mlflow.experimentKind"]
        assert kind == ("finetuning" if name == "chosen-in-the-ui" else "custom_model_development"), name
    assert client.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"
