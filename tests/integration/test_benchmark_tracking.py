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

from tests.conftest import cli
from tests.integration.conftest import SECRET, TrackedSweep, tracked_overrides

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]


def _common(workdir: Path, store: Path) -> list[str]:
    return [*tracked_overrides(workdir, store), "quant=none"]


def _client(store: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{store / 'mlflow.db'}")


def test_benchmark_results_are_complete(tracked_sweep: TrackedSweep) -> None:
    _, children = tracked_sweep.runs()
    client = tracked_sweep.client()
    folder = Path(client.download_artifacts(children["none"].info.run_id, "benchmark"))
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


def test_run_params_metrics_and_artifacts_read_back(tracked_sweep: TrackedSweep) -> None:
    client = tracked_sweep.client()
    _, children = tracked_sweep.runs()
    run = children["none"]
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
    assert metrics["load/c1/output_tokens_per_s"] > 0 and metrics["load/c2/ttft_ms_p99"] > 0
    assert metrics["quality/kl_divergence_mean"] == 0 and metrics["stage/benchmark_seconds"] > 0
    # the headline: the highest load's figures, under short names
    for headline, detail in (("output_tok_s", "output_tokens_per_s"), ("ttft_p99_ms", "ttft_ms_p99"),
                             ("itl_p50_ms", "itl_ms_p50"), ("goodput_req_s", "goodput_requests_per_s")):  # fmt: skip
        assert metrics[headline] == pytest.approx(metrics[f"load/c2/{detail}"], rel=1e-3)
    assert metrics["ppl_change_pct"] == 0 and 0.1 < metrics["server_peak_rss_gb"] < 16
    assert "output_tok_s_per_gpu" not in metrics and "usd_per_mtok" not in metrics  # a CPU target, no price
    history = client.get_metric_history(run.info.run_id, "sweep/output_tokens_per_s")
    assert sorted(m.step for m in history) == [1, 2]
    assert client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert run.data.tags["fingerprint.quantize"] and run.data.tags["pipeline.git_commit"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "job.log", "benchmark", "triton_repo", "quantize"} <= artifacts
    bench = {a.path for a in client.list_artifacts(run.info.run_id, "benchmark")}
    assert {"benchmark/benchmark.json", "benchmark/benchmark.csv", "benchmark/latency_throughput.png"} <= bench
    repo = {a.path for a in client.list_artifacts(run.info.run_id, "triton_repo")}
    assert "triton_repo/ensemble" in repo


def test_runs_describe_themselves_and_their_data(tracked_sweep: TrackedSweep) -> None:
    parent, children = tracked_sweep.runs()
    fp8, none = children["fp8"], children["none"]
    note = fp8.data.tags["mlflow.note.content"]
    assert note.startswith("**smollm2-135m** · fp8 · tp1 pp1 · cpu · tensorrt backend")
    assert "| output tok/s |" in note and "At c=2, the benchmark's highest load" in note
    assert "**Quality**: perplexity" in note and "not evaluated (eval=none)" in note
    assert f"get-artifact?path=benchmark%2Flatency_throughput.png&run_uuid={fp8.info.run_id}" in note
    # the data each run read: the prompts alike, the calibration set only where something was calibrated
    inputs = {quant: {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs} for quant, run in children.items()}
    assert set(inputs["fp8"]) == {"calibration", "evaluation", "benchmark"}
    assert set(inputs["none"]) == {"evaluation", "benchmark"}
    assert inputs["fp8"]["benchmark"].digest == inputs["none"]["benchmark"].digest
    assert inputs["fp8"]["calibration"].name == "builtin"
    assert json.loads(inputs["fp8"]["calibration"].profile) == {"rows": 2, "tokens": 64}
    # the sweep: named by what varies, never by the workdir, with its children side by side
    assert parent.data.tags["mlflow.runName"] == "sweep: quant=none,fp8"
    assert parent.info.status == "FINISHED" and fp8.info.status == none.info.status == "FINISHED"
    table = parent.data.tags["mlflow.note.content"]
    assert fp8.info.run_name in table and none.info.run_name in table and "| run | status | gate |" in table
    experiment = tracked_sweep.client().get_experiment_by_name("tests")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert json.loads(experiment.tags["mlflow.sharedViewState.pipeline-headline"])["selectedColumns"][0] == (
        "metrics.`output_tok_s`"
    )


def test_no_secret_reaches_the_store(tracked_sweep: TrackedSweep, smollm2_workdir: Path) -> None:
    for folder in (tracked_sweep.store, smollm2_workdir):
        for file in folder.rglob("*"):
            if file.is_file() and file.stat().st_size < 50_000_000:
                assert SECRET.encode() not in file.read_bytes(), file


def test_compare_lists_the_runs_sorted_and_filtered(tracked_sweep: TrackedSweep) -> None:
    uri = f"tracking.uri={tracked_sweep.uri}"
    result = cli("compare", uri, "sort=-tok/s@c2")
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert "tok/s@c1" in header and "TTFT p50@c1" in header and "ppl change %" in header
    assert len(rows) == 2 and all("smollm2-135m" in row and "FINISHED" in row for row in rows)
    only = cli("compare", uri, "filter=params.quant = 'fp8'")
    assert only.returncode == 0 and len(only.stdout.splitlines()) == 2 and " fp8 " in only.stdout
    bad = cli("compare", uri, "sort=nope")
    assert bad.returncode == 1 and "no column 'nope'" in bad.stderr


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
