"""``tune`` on the CPU target for real: the embedded model built and benchmarked per trial, every
trial an MLflow child run with the model's figures beside the measured ones, the Pareto chart and
the card as artifacts, the winner gated, registered as @tuned and served from the registry; a tune
resumed after a killed trial measures only what it had not; an SLO nothing meets ends with the
closest candidate and the limit it broke. One test, so the trials are built and measured once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import validate
from pipeline.tune import search
from tests.conftest import cli, first_answer, free_ports
from tests.integration.test_registry import _stop

pytestmark = pytest.mark.slow


def _overrides(workdir: Path, store: str, *extra: str) -> list[str]:
    return [
        f"workdir={workdir}",
        f"tracking.uri={store}",
        "target=cpu",
        "tune.formats=[none]",
        "tune.cpu_max_batch_size=[2]",
        "tune.cpu_max_num_tokens=[32,64]",
        "tune.concurrency=[1,2]",  # c=1 is where an SLO nothing meets is missed by the least
        "tune.requests_per_point=4",
        "workload.input_tokens=16",
        "workload.output_tokens=8",
        "eval.tasks=[pipeline_capitals]",  # SmolLM2 is far above chance on it, even on 10 items
        "eval.limit=10",
        *extra,
    ]


def test_tune_measures_registers_resumes_and_serves_the_winner(smollm2_workdir: Path, tmp_path: Path) -> None:
    import mlflow
    import optuna

    # a workdir of its own (the session's SmolLM2 fetch linked in): its trials' benchmark and
    # registry folders stay out of the shared one, whatever order the tests run in
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "fetch").symlink_to(smollm2_workdir / "fetch")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = _overrides(workdir, store, "slo.itl_ms_p99=5000")
    first = cli("tune", *overrides, "tune.max_trials=1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "models:/smollm2-135m@tuned -> version" in first.stdout
    assert "# trials: predicted against measured" in first.stdout and "pred ITL p99" in first.stdout

    client = mlflow.MlflowClient(store)
    (experiment,) = [e for e in client.search_experiments() if e.name == "smollm2-135m"]
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`pipeline.tune` = 'true'")
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 1
    child = client.get_run(children[0].info.run_id)
    history = client.get_metric_history(child.info.run_id, "predicted/itl_ms_p99")
    assert sorted(m.step for m in history) == [1, 2]  # one per load, step = concurrency
    assert client.get_metric_history(child.info.run_id, "residual/itl_ms_p99")
    assert child.data.tags["pipeline.tune_gate"] == "pass"
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pareto.png", "deployment_card.md", "trials.txt"} <= names
    assert "Deployment card" in parent.data.tags["mlflow.note.content"]

    version = client.get_model_version_by_alias("smollm2-135m", "tuned")
    assert version.tags["accuracy_gate"] == "pass"
    assert version.description.startswith("# Deployment card") and "itl_ms_p99 <= 5000 ms" in version.description

    # a tune killed mid-trial leaves that trial RUNNING in its study: the next run fails it and
    # measures its candidate again, and measures nothing already measured
    study_db = search.study_dir(validate.load(overrides), overrides) / search.STUDY_FILE
    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{study_db}")
    study.ask()  # what the killed run left behind
    second = cli("tune", *overrides, "tune.max_trials=2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming: 1 trial(s) already measured" in second.stderr
    assert "was interrupted" in second.stderr
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2  # one new build run: the first trial was not measured again
    states = [t.state.name for t in optuna.load_study(study_name="tune", storage=f"sqlite:///{study_db}").trials]
    assert states.count("COMPLETE") == 2 and "FAIL" in states

    # a stricter SLO asked of the same study is judged on what was measured: no new trial, and
    # nothing meets it: the closest candidate and the limit it broke, exit 1
    strict = _overrides(workdir, store, "slo.ttft_ms_p99=1", "tune.max_trials=2")
    missed = cli("tune", *strict)
    assert missed.returncode == 1
    assert "no candidate met the SLO; the closest, trial" in missed.stderr
    assert "misses the SLO even at c=1: ttft_ms_p99" in missed.stderr and "> 1 ms (by" in missed.stderr
    assert "resuming: 2 trial(s) already measured" in missed.stderr

    _serve_answers(store, tmp_path)


def _serve_answers(store: str, tmp_path: Path) -> None:
    http, grpc, metrics = free_ports(3)
    serve = [
        sys.executable, "-m", "pipeline", "serve", "model_uri=models:/smollm2-135m@tuned",
        f"workdir={tmp_path / 'deploy'}", f"tracking.uri={store}", "openai.enabled=false", "triton.exit_timeout_s=3",
        f"triton.http_port={http}", f"triton.grpc_port={grpc}", f"triton.metrics_port={metrics}",
    ]  # fmt: skip
    process = subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        answer = first_answer(process, http, {"text_input": "What is the capital of France?", "max_tokens": 8})
        assert answer is not None and "Paris" in answer["text_output"], answer
    finally:
        _stop(process)
