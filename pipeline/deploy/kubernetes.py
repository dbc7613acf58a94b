"""Kubernetes manifests for a rendered repository (``python -m pipeline manifests``).

The repository is served from a PersistentVolumeClaim (copy the repository folder into it), by the
project's image running ``serve repo=/models/repo`` (which starts one ``tritonserver`` or, for
world_size > 1, upstream's ``mpirun`` layout). A Deployment whose pod holds every rank (validation
refuses more ranks than one node has GPUs: leader mode across hosts needs one ``mpirun`` spanning
the pods, which a per-pod ``serve`` cannot give); a Service; Prometheus scrape annotations on the
pods. A KServe ``InferenceService`` is written as an alternative to Deployment + Service.

With the OpenAI gateway (openai.enabled) the gateway is the only way in: Triton listens on the
pod's loopback (its ports take no key and serve every model, the raw engine included), the Service
publishes the gateway and the metrics port, the probes ask the gateway's ``/health`` (which also
sees a stalled engine), and the API key Secret is required unless ``openai.allow_unauthenticated``
says otherwise. ``openai.expose_triton=true`` publishes Triton's ports too. CPU pods get memory
requests and limits sized from the built repository (the KV pool sizes itself from that limit).

With ``model_uri=models:/<name>@<alias>`` the repository comes from MLflow's registry instead: an
init container pulls that version into the pod (tracking URI and credentials from the Secret
``pipeline-tracking``) and ``serve`` runs it. ``kind=build`` writes a Job that runs ``build`` itself
on a GPU node, its workdir on a PersistentVolumeClaim, its tracking server from the same Secret.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.artifacts import REPO_ENGINE_DIR
from pipeline.config.schema import PipelineConfig, served_model_name
from pipeline.sizing import memory

MOUNT = "/models/repo"
REGISTRY_WORKDIR = "/models"  # model_uri: the init container pulls the version here, serve reads it
DEFAULT_IMAGE = "pipeline:latest"  # docker build -t pipeline . (see the Dockerfile)
TRACKING_SECRET = "pipeline-tracking"  # keys: uri, and optionally username, password (MLflow's basic auth)
BUILD_WORKDIR = "/workdir"


def _name(cfg: PipelineConfig) -> str:
    raw = f"{cfg.model.name}-{cfg.quant.format}-tp{cfg.parallel.tp}pp{cfg.parallel.pp}"
    return "".join(c if c.isalnum() else "-" for c in raw.lower()).strip("-")[:63]


PROBE_TIMEOUT_S = 5  # a saturated CPU pod answers health slowly: Kubernetes' default of 1 s restarts it


def has_gateway(cfg: PipelineConfig) -> bool:
    """Whether ``serve`` starts the OpenAI gateway in the pod (in front of Triton, for either
    repository layout; trtllm-serve is its own OpenAI server)."""
    return cfg.openai.enabled and cfg.serve.frontend == "triton"


def gateway_only(cfg: PipelineConfig) -> bool:
    """Whether the gateway is the pod's only way in (Triton on loopback, its ports unpublished)."""
    return has_gateway(cfg) and not cfg.openai.expose_triton


def _ports(cfg: PipelineConfig) -> dict[str, int]:
    """The ports the pod publishes, the first one the one a single-port frontend routes."""
    triton = cfg.triton
    ports = {} if gateway_only(cfg) else {"http": triton.http_port, "grpc": triton.grpc_port}
    if has_gateway(cfg):
        ports = {"openai": cfg.openai.port, **ports}
    return {**ports, "metrics": triton.metrics_port}


def notes(cfg: PipelineConfig) -> list[str]:
    """What an operator must know before applying the manifests (also written into them)."""
    said = []
    if has_gateway(cfg) and cfg.openai.allow_unauthenticated:
        said.append(
            "the OpenAI API takes requests without a key unless the Secret "
            f"{_name(cfg)}-openai (key api-key) exists: anyone who reaches the Service can use the model"
        )
    if not gateway_only(cfg):
        said.append(
            "Triton's HTTP and gRPC ports are published: they take no API key and serve every model "
            "(with the OpenAI gateway, openai.expose_triton=false keeps them inside the pod)"
        )
    return said


def _probe(cfg: PipelineConfig, period_s: int, failures: int) -> dict[str, Any]:
    path, port = ("/health", "openai") if gateway_only(cfg) else ("/v2/health/ready", "http")
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period_s,
        "timeoutSeconds": PROBE_TIMEOUT_S,
        "failureThreshold": failures,
    }


def _tracking_env() -> list[dict[str, Any]]:
    """MLflow's own variables from the Secret: the URI, and basic-auth credentials when present
    (never in an argument or the URI, so they reach no log)."""
    env = [{"name": "MLFLOW_TRACKING_URI", "valueFrom": {"secretKeyRef": {"name": TRACKING_SECRET, "key": "uri"}}}]
    for name, key in (("MLFLOW_TRACKING_USERNAME", "username"), ("MLFLOW_TRACKING_PASSWORD", "password")):
        env.append(
            {"name": name, "valueFrom": {"secretKeyRef": {"name": TRACKING_SECRET, "key": key, "optional": True}}}
        )
    return env


def _source_args(model_uri: str | None) -> list[str]:
    """Where serve finds the repository: the claim's folder, or the registered version the init
    container pulled (Kubernetes expands $(MLFLOW_TRACKING_URI) from the container's env)."""
    if model_uri is None:
        return [f"repo={MOUNT}"]
    return [f"model_uri={model_uri}", f"workdir={REGISTRY_WORKDIR}", "tracking.uri=$(MLFLOW_TRACKING_URI)"]


def _container(
    cfg: PipelineConfig, gpus: int, model_uri: str | None = None, memory_bytes: int | None = None
) -> dict[str, Any]:
    triton = cfg.triton
    ports = _ports(cfg)
    host = "127.0.0.1" if gateway_only(cfg) else "0.0.0.0"
    args = ["serve", *_source_args(model_uri), f"target={cfg.target.name}", f"triton.host={host}"]
    args += [f"triton.{k}_port={getattr(triton, f'{k}_port')}" for k in ("http", "grpc", "metrics")]
    if has_gateway(cfg):  # the OpenAI-compatible API beside Triton, under the model's name
        args += ["openai.host=0.0.0.0", f"openai.port={cfg.openai.port}"]
        args += [f"openai.served_model_name={served_model_name(cfg)}"]
    container: dict[str, Any] = {
        "name": "triton",
        "image": DEFAULT_IMAGE,
        "args": args,
        "ports": [{"name": k, "containerPort": v} for k, v in ports.items()],
        "readinessProbe": _probe(cfg, 10, 3),
        # large engines take minutes to load (the gateway starts once Triton is ready)
        "startupProbe": _probe(cfg, 10, max(30, triton.ready_timeout_s // 10)),
        "volumeMounts": [
            {"name": "repo", "mountPath": REGISTRY_WORKDIR if model_uri else MOUNT},
            {"name": "shm", "mountPath": "/dev/shm"},
        ],
    }
    env = _tracking_env() if model_uri else []
    if has_gateway(cfg):
        # the gateway's API key: the pod does not start without its Secret, unless that is meant
        optional = cfg.openai.allow_unauthenticated
        secret = {"name": f"{_name(cfg)}-openai", "key": "api-key", "optional": optional}
        env.append({"name": cfg.openai.api_key_env, "valueFrom": {"secretKeyRef": secret}})
    if env:
        container["env"] = env
    if has_gateway(cfg):  # the gateway's /health fails when the engine's scheduler stalls or dies
        container["livenessProbe"] = {
            "httpGet": {"path": "/health", "port": "openai"},
            "periodSeconds": 30,
            "timeoutSeconds": PROBE_TIMEOUT_S,
            "failureThreshold": 3,
        }
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}, "requests": {"nvidia.com/gpu": str(gpus)}}
    elif memory_bytes:  # the CPU target: a Guaranteed pod, and the KV pool sizes itself from this limit
        memory = f"{-(-memory_bytes // 2**30)}Gi"
        container["resources"] = {"limits": {"memory": memory}, "requests": {"memory": memory}}
    return container


def cpu_memory_bytes(cfg: PipelineConfig, repository: Path) -> int | None:
    """What a CPU pod serving ``repository`` needs: the weights twice over (the files and the
    runtime's float32 tensors), the KV pool a full batch of the longest sequences can fill (or
    triton.max_tokens_in_paged_kv_cache), and 2 GiB for Triton, its stubs and activations. None
    before the repository is built."""
    engine = repository / REPO_ENGINE_DIR
    if not engine.is_dir():
        return None
    sixteen_bit, _ = memory.kv_bytes_per_token(cfg.model.arch, 1, 1, None)
    per_token = 2 * sixteen_bit  # the reference runtime keeps its KV cache in float32
    tokens = cfg.triton.max_tokens_in_paged_kv_cache or cfg.build.batch * cfg.build.max_seq_len
    weights = sum(f.stat().st_size for f in engine.rglob("*") if f.is_file())
    return 2 * weights + tokens * per_token + 2 * 2**30


def _pull_container(model_uri: str) -> dict[str, Any]:
    """Fetches the registered version before Triton starts (its download does not count against
    the startup probe)."""
    return {
        "name": "pull-model",
        "image": DEFAULT_IMAGE,
        "args": [
            "pull",
            f"model_uri={model_uri}",
            f"workdir={REGISTRY_WORKDIR}",
            "tracking.uri=$(MLFLOW_TRACKING_URI)",
        ],
        "env": _tracking_env(),
        "volumeMounts": [{"name": "repo", "mountPath": REGISTRY_WORKDIR}],
    }


def _pod_spec(
    cfg: PipelineConfig, gpus: int, claim: str, model_uri: str | None = None, memory_bytes: int | None = None
) -> dict[str, Any]:
    # the repository: a claim holding it, or (model_uri) a pod-local folder the init container fills
    repo = (
        {"name": "repo", "emptyDir": {}}
        if model_uri
        else {"name": "repo", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
    )
    spec: dict[str, Any] = {
        "containers": [_container(cfg, gpus, model_uri, memory_bytes)],
        "volumes": [
            repo,
            {"name": "shm", "emptyDir": {"medium": "Memory"}},
        ],  # python backend and NCCL need shared memory
    }
    if model_uri:
        spec["initContainers"] = [_pull_container(model_uri)]
    return spec


def _pod_template(
    cfg: PipelineConfig,
    gpus: int,
    claim: str,
    labels: dict[str, str],
    model_uri: str | None = None,
    memory_bytes: int | None = None,
) -> dict[str, Any]:
    spec = _pod_spec(cfg, gpus, claim, model_uri, memory_bytes)
    return {"metadata": {"labels": labels, "annotations": _annotations(cfg)}, "spec": spec}


def _annotations(cfg: PipelineConfig) -> dict[str, str]:
    return {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(cfg.triton.metrics_port),
        "prometheus.io/path": "/metrics",
    }


def gpus_per_node(cfg: PipelineConfig) -> int:
    return cfg.target.count if cfg.target.is_gpu else 0


def build(
    cfg: PipelineConfig, claim: str = "triton-repo", model_uri: str | None = None, memory_bytes: int | None = None
) -> dict[str, dict[str, Any]]:
    """file name -> Kubernetes object (as a dict); ``memory_bytes``: a CPU pod's memory."""
    name, labels = _name(cfg), {"app": _name(cfg)}
    gpus = cfg.parallel.world_size if gpus_per_node(cfg) else 0
    objects: dict[str, dict[str, Any]] = {}
    objects["deployment.yaml"] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": 1,
            # a rolling update would need a second set of GPUs for the new pod: the old one goes first
            **({"strategy": {"type": "Recreate"}} if gpus else {}),
            "selector": {"matchLabels": labels},
            "template": _pod_template(cfg, gpus, claim, labels, model_uri, memory_bytes),
        },
    }
    objects["service.yaml"] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels, "annotations": _annotations(cfg)},
        "spec": {
            "selector": labels,
            "ports": [{"name": k, "port": v, "targetPort": k} for k, v in _ports(cfg).items()],
        },
    }
    predictor_container = _container(cfg, gpus, model_uri, memory_bytes)
    # Knative (KServe's default Serverless mode) takes a container with one port: the routed one
    predictor_container["ports"] = predictor_container["ports"][:1]
    pod = _pod_spec(cfg, 0, claim, model_uri, memory_bytes)
    predictor: dict[str, Any] = {
        "containers": [{**predictor_container, "name": "kserve-container"}],
        "volumes": pod["volumes"],
    }
    if model_uri:
        predictor["initContainers"] = pod["initContainers"]
    objects["inferenceservice.yaml"] = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name, "annotations": _annotations(cfg)},
        "spec": {"predictor": predictor},
    }
    return objects


def build_job(cfg: PipelineConfig, overrides: list[str], claim: str = "pipeline-workdir") -> dict[str, Any]:
    """A Job running ``build`` with these overrides on a GPU node: the workdir (artifacts, the
    Hugging Face cache) on a claim, the tracking server and its credentials from the Secret, the
    Hub token from the Secret ``pipeline-hf`` when it exists."""
    skipped = ("workdir=", "tracking.uri=", "kind=")
    args = ["build", *(o for o in overrides if not o.startswith(skipped))]
    args += [f"workdir={BUILD_WORKDIR}/artifacts", "tracking.uri=$(MLFLOW_TRACKING_URI)"]
    hf_token = {"secretKeyRef": {"name": "pipeline-hf", "key": "token", "optional": True}}
    container: dict[str, Any] = {
        "name": "build",
        "image": DEFAULT_IMAGE,
        "args": args,
        "env": [
            *_tracking_env(),
            {"name": "HF_TOKEN", "valueFrom": hf_token},
            {"name": "HF_HOME", "value": f"{BUILD_WORKDIR}/huggingface"},
        ],
        "volumeMounts": [{"name": "workdir", "mountPath": BUILD_WORKDIR}, {"name": "shm", "mountPath": "/dev/shm"}],
    }
    gpus = gpus_per_node(cfg)  # the whole node: calibration spreads the model over every GPU it sees
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}, "requests": {"nvidia.com/gpu": str(gpus)}}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": f"build-{_name(cfg)}"[:63].rstrip("-"), "labels": {"app": "pipeline-build"}},
        "spec": {
            "backoffLimit": 0,  # a failed build is read in its logs and MLflow run, not retried blindly
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [container],
                    "volumes": [
                        {"name": "workdir", "persistentVolumeClaim": {"claimName": claim}},
                        {"name": "shm", "emptyDir": {"medium": "Memory"}},
                    ],
                }
            },
        },
    }


def write(cfg: PipelineConfig, folder: Any, objects: dict[str, dict[str, Any]]) -> list[Any]:
    import json

    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    header = "".join(f"# WARNING: {note}\n" for note in notes(cfg))
    written = []
    for file, obj in objects.items():
        path = folder / file
        plain = json.loads(json.dumps(obj))  # no shared sub-objects, so no YAML anchors
        path.write_text((header if obj.get("kind") != "Job" else "") + yaml.safe_dump(plain, sort_keys=False))
        written.append(path)
    return written
