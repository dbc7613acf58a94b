"""The whole job on the embedded model with a real Triton, a real MLflow sqlite store and the real
load generator: results read back through the MLflow client, `compare`, a multirun's parent and
children, and no secret anywhere in the store."""

from __future__ import annotations

import csv
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import cli, free_ports

pytestmark = pytest.mark.slow
SECRET = "hf_pipelinetestsecret0123456789"
ROOT = Path(__file__).parents[2]


def _ports() -> list[str]:
    ports = free_ports(3)
    return [f"triton.http_port={ports[0]}", f"triton.grpc_port={ports[1]}", f"triton.metrics_port={ports[2]}"]


def _common(workdir: Path, store: Path) -> list[str]:
    return [
        f"workdir={workdir}",
        "target=cpu",
        "quant=none",
        f"tracking.uri=sqlite:///{store / 'mlflow.db'}",
        "tracking.experiment=tests",
        "benchmark.concurrency=[1,2]",
        "benchmark.requests_per_point=3",
        "benchmark.warmup_requests=1",
        "workload.input_tokens=16",
        "workload.output_tokens=6",
        "slo.ttft_ms_p99=60000",
        "eval=none",  # the benchmark and the runs are under test here (test_eval.py evaluates)
        "tracking.register=false",  # test_registry.py registers; uploading the repository costs seconds
        *_ports(),
    ]


@pytest.fixture(scope="module")
def tracked(smollm2_workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    store = tmp_path_factory.mktemp("mlflow")
    overrides = _common(smollm2_workdir, store)
    result = cli("build", *overrides, env={"HF_TOKEN": SECRET})
    assert result.returncode == 0, result.stderr[-3000:]
    return store, overrides


def _client(store: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{store / 'mlflow.db'}")


def test_benchmark_results_are_complete(tracked: tuple[Path, list[str]], smollm2_workdir: Path) -> None:
    (folder,) = [p for p in smollm2_workdir.glob("benchmark/*") if (p / "benchmark.json").is_file()]
    points = json.loads((folder / "benchmark.json").read_text())
    assert [p["load"] for p in points] == ["c=1", "c=2"]
    for point in points:
        assert point["successful"] == 3 and point["errors"] == 0
        assert point["ramp_up_requests"] == point["concurrency"]  # each worker's first request, unmeasured
        assert point["input_tokens_mean"] == 16 and point["output_tokens_mean"] == 6
        assert 0 < point["ttft_ms_p50"] <= point["ttft_ms_p99"] < point["e2e_ms_p99"]
        assert point["output_tokens_per_s"] > 0 and point["goodput_requests_per_s"] == point["requests_per_s"]
        assert point["client_cpu_fraction"] < 0.5  # the client is not the bottleneck
    rows = list(csv.DictReader((folder / "benchmark.csv").open()))
    assert len(rows) == 2 and (folder / "latency_throughput.png").stat().st_size > 1000


def test_run_params_metrics_and_artifacts_read_back(tracked: tuple[Path, list[str]]) -> None:
    store, _ = tracked
    client = _client(store)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert (params["model"], params["quant"], params["tp"], params["pp"], params["target"]) == (
        "smollm2-135m",
        "none",
        "1",
        "1",
        "cpu",
    )
    metrics = run.data.metrics
    assert metrics["c1_output_tokens_per_s"] > 0 and metrics["c2_ttft_ms_p99"] > 0
    assert metrics["quality_kl_divergence_mean"] == 0
    history = client.get_metric_history(run.info.run_id, "sweep_output_tokens_per_s")
    assert sorted(m.step for m in history) == [1, 2]
    assert run.data.tags["fingerprint.quantize"] and run.data.tags["pipeline.git_commit"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "job.log", "benchmark", "triton_repo", "quantize"} <= artifacts
    bench = {a.path for a in client.list_artifacts(run.info.run_id, "benchmark")}
    assert {"benchmark/benchmark.json", "benchmark/benchmark.csv", "benchmark/latency_throughput.png"} <= bench
    repo = {a.path for a in client.list_artifacts(run.info.run_id, "triton_repo")}
    assert "triton_repo/ensemble" in repo


def test_no_secret_reaches_the_store(tracked: tuple[Path, list[str]], smollm2_workdir: Path) -> None:
    store, _ = tracked
    for folder in (store, smollm2_workdir):
        for file in folder.rglob("*"):
            if file.is_file() and file.stat().st_size < 50_000_000:
                assert SECRET.encode() not in file.read_bytes(), file


def test_compare_lists_the_run_sorted_and_filtered(tracked: tuple[Path, list[str]]) -> None:
    _, overrides = tracked
    uri = [o for o in overrides if o.startswith("tracking.uri=")]
    result = cli("compare", *uri, "sort=-tok/s@c2")
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()[:2]
    assert "tok/s@c1" in header and "TTFT p50@c1" in header and "ppl change %" in header
    assert "smollm2-135m" in row and "FINISHED" in row
    none = cli("compare", *uri, "filter=params.quant = 'fp8'")
    assert none.returncode == 0 and "no runs" in none.stdout
    bad = cli("compare", *uri, "sort=nope")
    assert bad.returncode == 1 and "no column 'nope'" in bad.stderr


def test_multirun_gives_a_parent_with_a_child_per_job(smollm2_workdir: Path, tmp_path: Path) -> None:
    overrides = [*_common(smollm2_workdir, tmp_path), "benchmark=none"]  # the runs, not the load, matter here
    result = cli("build", "-m", "triton.streaming=true,false", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    client = _client(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("pipeline.sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert parent.info.status == "FINISHED"
    # named by what varies, never by the workdir; the experiment opens on its runs in MLflow 3's UI
    assert parent.data.tags["mlflow.runName"] == "sweep: triton.streaming=True,False"  # as Hydra expands it
    assert client.get_experiment_by_name("tests").tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_job_refused_at_validation_opens_no_run(smollm2_workdir: Path, tmp_path: Path) -> None:
    missing = cli("build", *_common(smollm2_workdir, tmp_path), "workload.prompts_file=/nonexistent.jsonl")
    assert missing.returncode == 1 and "workload.prompts_file=/nonexistent.jsonl does not exist" in missing.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_sigterm_mid_benchmark_stops_triton_and_fails_the_run(smollm2_workdir: Path, tmp_path: Path) -> None:
    """`kill -TERM` (timeout, CI cancel, systemd, docker stop) of a build whose benchmark is
    running: Triton and its stubs stop, the ports are free, the run is FAILED with the signal named
    and the job's log. The configured HTTP port is taken by someone else: the benchmark's server
    takes free ports and says so."""
    overrides = [*_common(smollm2_workdir, tmp_path), "benchmark.requests_per_point=200", "triton.exit_timeout_s=3"]
    http_port = int(next(o for o in overrides if o.startswith("triton.http_port=")).split("=")[1])
    taken = socket.socket()
    taken.bind(("127.0.0.1", http_port))
    taken.listen()
    build = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "build", *overrides], stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert build.stderr is not None
    said = []
    for line in build.stderr:  # once the load runs, every process of the server is up
        said.append(line)
        if "warming up" in line:
            break
    taken.close()
    assert any(f"port {http_port} on 127.0.0.1 is in use" in line and "instead" in line for line in said), said
    family = psutil.Process(build.pid).children(recursive=True)
    assert any("tritonserver" in p.name() for p in family)
    started = time.monotonic()
    build.send_signal(signal.SIGTERM)
    assert build.wait(timeout=30) == 128 + signal.SIGTERM
    assert time.monotonic() - started < 15
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    ports = [int(o.split("=")[1]) for o in overrides if o.startswith("triton.") and o.split("=")[0].endswith("_port")]
    for port in ports:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Triton binds
            probe.bind(("127.0.0.1", port))  # free again
    client = _client(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["pipeline.stopped_by"] == "SIGTERM"
    assert "job.log" in {a.path for a in client.list_artifacts(run.info.run_id)}
