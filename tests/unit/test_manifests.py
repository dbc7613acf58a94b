"""Kubernetes manifests, checked against the Kubernetes object schemas of the official client:
every field must survive a round trip through the typed models (a misspelled field would be
dropped and the comparison would fail)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import validate
from pipeline.deploy import kubernetes
from pipeline.errors import ConfigError
from tests.conftest import cli

k8s = pytest.importorskip("kubernetes")


def _round_trip(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    client = k8s.client.ApiClient()
    typed = client._ApiClient__deserialize(obj, kind)  # the client's own schema-driven loader
    return client.sanitize_for_serialization(typed)


def _assert_schema(obj: dict[str, Any], kind: str) -> None:
    assert _round_trip(obj, kind) == obj


def test_embedded_model_gets_a_valid_deployment_service_and_inferenceservice(tmp_path: Path) -> None:
    result = cli("manifests", f"workdir={tmp_path}", "target=cpu")
    assert result.returncode == 0, result.stderr
    folder = next((tmp_path / "manifests").iterdir())
    docs = {p.name: yaml.safe_load(p.read_text()) for p in folder.glob("*.yaml")}
    assert set(docs) == {"deployment.yaml", "service.yaml", "inferenceservice.yaml"}
    _assert_schema(docs["deployment.yaml"], "V1Deployment")
    _assert_schema(docs["service.yaml"], "V1Service")
    pod = docs["deployment.yaml"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    # the gateway is the only way in: Triton on the pod's loopback, its ports published nowhere
    assert "triton.host=127.0.0.1" in container["args"] and "openai.host=0.0.0.0" in container["args"]
    assert {p["name"] for p in container["ports"]} == {"openai", "metrics"}
    assert {p["name"] for p in docs["service.yaml"]["spec"]["ports"]} == {"openai", "metrics"}
    for probe in ("readinessProbe", "startupProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "openai"}, probe
        assert container[probe]["timeoutSeconds"] == 5
    assert "openai.served_model_name=smollm2-135m" in container["args"]
    (key,) = container["env"]
    assert key["name"] == "PIPELINE_OPENAI_API_KEY" and key["valueFrom"]["secretKeyRef"]["optional"] is False
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "8002"
    assert "nvidia.com/gpu" not in str(container.get("resources"))  # the CPU target asks for no GPU
    assert "WARNING" not in (folder / "deployment.yaml").read_text()
    assert pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "triton-repo"
    isvc = docs["inferenceservice.yaml"]
    assert isvc["kind"] == "InferenceService"
    for predictor_container in isvc["spec"]["predictor"]["containers"]:
        _assert_schema(predictor_container, "V1Container")
        assert predictor_container["ports"] == [{"name": "openai", "containerPort": 9000}]  # Knative: one port


@pytest.mark.parametrize(
    ("overrides", "warning"),
    [
        (["openai.allow_unauthenticated=true"], "without a key"),
        (["openai.expose_triton=true"], "take no API key"),
        (["openai.enabled=false"], "take no API key"),
    ],
)
def test_an_open_door_is_said_in_the_manifest_and_on_the_terminal(
    tmp_path: Path, overrides: list[str], warning: str
) -> None:
    result = cli("manifests", f"workdir={tmp_path}", "target=cpu", *overrides)
    assert result.returncode == 0 and warning in result.stderr, result.stderr
    folder = next((tmp_path / "manifests").iterdir())
    assert warning in (folder / "deployment.yaml").read_text().split("apiVersion")[0]


def test_a_cpu_pod_gets_memory_sized_from_the_built_repository(tmp_path: Path) -> None:
    cfg = validate.load(["target=cpu", "build.max_batch_size=4", "build.max_seq_len=1024", "build.max_input_len=512"])
    engine = tmp_path / "repository" / "tensorrt_llm" / "1" / "engine"
    engine.mkdir(parents=True)
    (engine / "rank0.safetensors").write_bytes(b"\0" * 2**20)
    memory = kubernetes.cpu_memory_bytes(cfg, tmp_path / "repository")
    per_token = 2 * 30 * 3 * 64 * 4  # 46080 bytes: SmolLM2-135M's 30 layers, 3 KV heads of 64, in float32
    assert memory == 2 * 2**20 + 4 * 1024 * per_token + 2 * 2**30
    container = kubernetes.build(cfg, memory_bytes=memory)["deployment.yaml"]["spec"]["template"]["spec"]["containers"]
    resources = container[0]["resources"]
    assert resources["limits"] == resources["requests"] == {"memory": "3Gi"}
    assert kubernetes.cpu_memory_bytes(cfg, tmp_path / "not-built") is None


def test_gpu_requests_equal_world_size_on_one_node() -> None:
    cfg = validate.load(["model=llama70b", "quant=fp8", "parallel.tp=2", "target=h100"])
    objects = kubernetes.build(cfg)
    deployment = objects["deployment.yaml"]
    _assert_schema(deployment, "V1Deployment")
    limits = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"nvidia.com/gpu": "2"}
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # a rolling update needs a second set of GPUs


def test_multi_node_is_refused_in_one_line() -> None:
    """One mpirun per pod would start unconnected engines: refused until one launch spans the pods."""
    with pytest.raises(ConfigError, match=r"target.nodes=2: multi-node serving is not supported yet") as error:
        validate.load(
            ["model=llama70b", "quant=none", "parallel.tp=8", "parallel.pp=2", "target=h100", "target.nodes=2"]
        )
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=r"needs 16 GPUs but target=h100 has 8"):
        validate.load(["model=llama70b", "quant=none", "parallel.tp=8", "parallel.pp=2", "target=h100"])


def test_a_registered_version_is_pulled_by_an_init_container_with_mlflows_credentials(tmp_path: Path) -> None:
    uri = "models:/llama70b@production"
    result = cli(
        "manifests",
        f"workdir={tmp_path}",
        "model=llama70b",
        "quant=fp8",
        "parallel.tp=2",
        "target=h100",
        f"model_uri={uri}",
    )
    assert result.returncode == 0, result.stderr
    folder = next((tmp_path / "manifests").iterdir())
    deployment = yaml.safe_load((folder / "deployment.yaml").read_text())
    _assert_schema(deployment, "V1Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (pull,) = pod["initContainers"]
    assert pull["args"][:2] == ["pull", f"model_uri={uri}"] and "tracking.uri=$(MLFLOW_TRACKING_URI)" in pull["args"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in pull["env"]}
    assert env["MLFLOW_TRACKING_URI"] == {"name": "pipeline-tracking", "key": "uri"}
    assert env["MLFLOW_TRACKING_PASSWORD"]["optional"] is True  # basic auth only when the Secret has it
    serve = pod["containers"][0]
    assert f"model_uri={uri}" in serve["args"] and not any(a.startswith("repo=") for a in serve["args"])
    assert {v["name"] for v in pod["volumes"]} == {"repo", "shm"} and "emptyDir" in pod["volumes"][0]
    isvc = yaml.safe_load((folder / "inferenceservice.yaml").read_text())
    _assert_schema(isvc["spec"]["predictor"]["initContainers"][0], "V1Container")


def test_a_build_job_runs_build_with_the_same_overrides_on_a_gpu_node(tmp_path: Path) -> None:
    overrides = ["model=llama70b", "quant=fp8", "parallel.tp=2", "target=h100", "backend=pytorch"]
    result = cli("manifests", f"workdir={tmp_path}", *overrides, "kind=build")
    assert result.returncode == 0, result.stderr
    (path,) = (tmp_path / "manifests").glob("*/build-job.yaml")
    job = yaml.safe_load(path.read_text())
    _assert_schema(job, "V1Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][0] == "build" and all(o in container["args"] for o in overrides)
    assert "workdir=/workdir/artifacts" in container["args"] and f"workdir={tmp_path}" not in container["args"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 0
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in job["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claims == ["pipeline-workdir"]
    assert "MLFLOW_TRACKING_URI" in {e["name"] for e in container["env"]}
    assert cli("manifests", f"workdir={tmp_path}", "kind=job").returncode == 1


def test_a_pytorch_backend_pod_is_probed_on_the_gateway_that_serves_it() -> None:
    """The gateway serves the LLM-API layout too: a backend=pytorch pod is reached and probed
    through it as an engine-path pod is; with the gateway off, its probes ask Triton."""
    overrides = ["model=llama70b", "quant=fp8", "target=h100", "backend=pytorch"]
    container = kubernetes.build(validate.load(overrides))["deployment.yaml"]["spec"]["template"]["spec"]
    container = container["containers"][0]
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "openai"}
    assert {p["name"] for p in container["ports"]} == {"openai", "metrics"}
    bare = kubernetes.build(validate.load([*overrides, "openai.enabled=false"]))["deployment.yaml"]["spec"]["template"][
        "spec"
    ]
    bare = bare["containers"][0]
    assert "livenessProbe" not in bare and not any(a.startswith("openai.") for a in bare["args"])
    for probe in ("readinessProbe", "startupProbe"):
        assert bare[probe]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert "triton.host=0.0.0.0" in bare["args"] and {p["name"] for p in bare["ports"]} >= {"http", "grpc"}
