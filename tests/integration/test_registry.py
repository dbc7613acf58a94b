"""The model registry as the hand-off from build to deploy, against a real `mlflow server`: a build
registers its repository once (a cached rebuild finds its version), `promote` sets an alias, and
`serve model_uri=models:/<name>@<alias>` downloads that version and answers a request."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import cli, first_answer, free_ports

pytestmark = pytest.mark.slow


def test_build_registers_promote_aliases_and_serve_runs_the_registered_version(
    tmp_path: Path, tiny_checkpoint: Path, mlflow_server: str
) -> None:
    import mlflow

    from tests.fixtures.tiny_model import write_tiny_adapter

    name = "tiny-registry"
    helper = write_tiny_adapter(tiny_checkpoint, tmp_path / "helper", 4)
    overrides = [
        f"lora.adapters=[{{name: helper, path: {helper}}}]",
        "model=local",
        f"model.path={tiny_checkpoint}",
        "target=cpu",
        "quant=none",
        "benchmark=none",
        "eval=none",  # the version is registered with accuracy_gate=skipped: promote needs force=true
        "quant.eval_tokens=0",
        "build.max_seq_len=512",
        "build.max_input_len=256",
        f"workdir={tmp_path / 'build'}",
        f"tracking.uri={mlflow_server}",
        f"tracking.registered_model={name}",
    ]
    first = cli("build", *overrides)
    assert first.returncode == 0, first.stderr[-2000:]
    again = cli("build", *overrides)  # cached: the same repository, no second version
    assert again.returncode == 0 and "already" in again.stderr, again.stderr[-2000:]
    client = mlflow.MlflowClient(mlflow_server)
    (version,) = client.search_model_versions(f"name='{name}'")
    assert {k: version.tags[k] for k in ("format", "tp", "pp", "target", "backend")} == {
        "format": "none",
        "tp": "1",
        "pp": "1",
        "target": "cpu",
        "backend": "tensorrt",
    }
    assert version.tags["accuracy_gate"] == "skipped"
    # the adapters it ships: on the version and as the run's params
    assert version.tags["lora_adapters"] == "helper"
    assert version.tags["lora.helper"].startswith(f"{helper} rank=4 digest=")
    run_params = client.get_run(version.run_id).data.params
    assert run_params["lora.helper"] == version.tags["lora.helper"]
    assert "with LoRA adapters served by name beside the base model: `helper` (rank 4)" in version.description
    # the version's page explains itself: the run's description, which names the version and how to serve it
    assert version.description.startswith("**local** · none · tp1 pp1 · cpu")
    assert f"serve it with `python -m pipeline serve model_uri=models:/{name}/{version.version}`" in version.description
    assert version.description == client.get_run(version.run_id).data.tags["mlflow.note.content"]
    refused = cli("promote", f"run={version.run_id}", "alias=production", *overrides)
    assert refused.returncode == 1 and "was not evaluated" in refused.stderr and "force=true" in refused.stderr
    promoted = cli("promote", f"run={version.run_id}", "alias=production", "force=true", *overrides)
    assert promoted.returncode == 0 and f"models:/{name}@production -> version {version.version}" in promoted.stdout
    forced = client.get_model_version(name, version.version).tags
    assert forced["accuracy_gate.forced"] == "production by force=true"
    assert client.get_model_version_by_alias(name, "production").version == version.version

    http, grpc, metrics = free_ports(3)
    serve = [
        sys.executable,
        "-m",
        "pipeline",
        "serve",
        f"model_uri=models:/{name}@production",
        f"workdir={tmp_path / 'deploy'}",  # another host's workdir: nothing of the build is there
        f"tracking.uri={mlflow_server}",
        "openai.enabled=false",
        "triton.exit_timeout_s=3",  # nothing is in flight when it is stopped
        f"triton.http_port={http}",
        f"triton.grpc_port={grpc}",
        f"triton.metrics_port={metrics}",
    ]
    process = subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        answer = first_answer(process, http, {"text_input": "the capital of france is", "max_tokens": 4})
        assert answer is not None and "text_output" in answer, (
            process.stdout.read().decode()[-3000:] if process.stdout else ""
        )
    finally:
        _stop(process)
    downloaded = tmp_path / "deploy" / "registry" / name / str(version.version) / "triton_repository"
    assert (downloaded / "repository.json").is_file()


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, which the CLI turns into Ctrl-C's stop with a handler of its own. (Ctrl-C itself was
    seen not to stop this subprocess on clean-clone runs of the full parallel tier, twice in a row:
    consistent with SIGINT inherited as ignored there, as Python then leaves it; not reproduced.)"""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)
        raise AssertionError("serve did not stop within 60 s of SIGTERM") from None
