"""Kubernetes manifests for a rendered repository (``python -m pipeline manifests``).

The repository is served from a PersistentVolumeClaim (copy the repository folder into it), by the
project's image running ``serve repo=/models/repo`` (which starts one ``tritonserver`` or, for
world_size > 1, upstream's ``mpirun`` layout). A Deployment whose pod holds every rank (validation
refuses more ranks than one node has GPUs: leader mode across hosts needs one ``mpirun`` spanning
the pods, which a per-pod ``serve`` cannot give); a Service for HTTP, gRPC and metrics; Prometheus
scrape annotations on the pods; readiness on ``/v2/health/ready``. A KServe ``InferenceService``
is written as an alternative to Deployment + Service.
"""

from __future__ import annotations

from typing import Any

from pipeline.config.schema import PipelineConfig, served_model_name

MOUNT = "/models/repo"
DEFAULT_IMAGE = "pipeline:latest"  # docker build -t pipeline . (see the Dockerfile)


def _name(cfg: PipelineConfig) -> str:
    raw = f"{cfg.model.name}-{cfg.quant.format}-tp{cfg.parallel.tp}pp{cfg.parallel.pp}"
    return "".join(c if c.isalnum() else "-" for c in raw.lower()).strip("-")[:63]


def _ports(cfg: PipelineConfig) -> dict[str, int]:
    triton = cfg.triton
    ports = {"http": triton.http_port, "grpc": triton.grpc_port, "metrics": triton.metrics_port}
    if cfg.openai.enabled:
        ports["openai"] = cfg.openai.port
    return ports


def _container(cfg: PipelineConfig, gpus: int) -> dict[str, Any]:
    triton = cfg.triton
    ports = _ports(cfg)
    args = ["serve", f"repo={MOUNT}", f"target={cfg.target.name}", "triton.host=0.0.0.0"]
    args += [f"triton.{k}_port={ports[k]}" for k in ("http", "grpc", "metrics")]
    if cfg.openai.enabled:  # the OpenAI-compatible API beside Triton, under the model's name
        args += ["openai.host=0.0.0.0", f"openai.port={cfg.openai.port}"]
        args += [f"openai.served_model_name={served_model_name(cfg)}"]
    container: dict[str, Any] = {
        "name": "triton",
        "image": DEFAULT_IMAGE,
        "args": args,
        "ports": [{"name": k, "containerPort": v} for k, v in ports.items()],
        "readinessProbe": {
            "httpGet": {"path": "/v2/health/ready", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "startupProbe": {  # large engines take minutes to load
            "httpGet": {"path": "/v2/health/ready", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": max(30, triton.ready_timeout_s // 10),
        },
        "volumeMounts": [{"name": "repo", "mountPath": MOUNT}, {"name": "shm", "mountPath": "/dev/shm"}],
    }
    if cfg.openai.enabled:
        # the gateway's API key, when the Secret exists (optional: without it no key is asked for)
        secret = {"name": f"{_name(cfg)}-openai", "key": "api-key", "optional": True}
        container["env"] = [{"name": cfg.openai.api_key_env, "valueFrom": {"secretKeyRef": secret}}]
        container["livenessProbe"] = {"httpGet": {"path": "/health", "port": "openai"}, "periodSeconds": 30}
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}, "requests": {"nvidia.com/gpu": str(gpus)}}
    return container


def _pod_spec(cfg: PipelineConfig, gpus: int, claim: str) -> dict[str, Any]:
    return {
        "containers": [_container(cfg, gpus)],
        "volumes": [
            {"name": "repo", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}},
            {"name": "shm", "emptyDir": {"medium": "Memory"}},  # python backend and NCCL need shared memory
        ],
    }


def _pod_template(cfg: PipelineConfig, gpus: int, claim: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"metadata": {"labels": labels, "annotations": _annotations(cfg)}, "spec": _pod_spec(cfg, gpus, claim)}


def _annotations(cfg: PipelineConfig) -> dict[str, str]:
    return {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(cfg.triton.metrics_port),
        "prometheus.io/path": "/metrics",
    }


def gpus_per_node(cfg: PipelineConfig) -> int:
    return cfg.target.count if cfg.target.is_gpu else 0


def build(cfg: PipelineConfig, claim: str = "triton-repo") -> dict[str, dict[str, Any]]:
    """file name -> Kubernetes object (as a dict)."""
    name, labels = _name(cfg), {"app": _name(cfg)}
    gpus = cfg.parallel.world_size if gpus_per_node(cfg) else 0
    objects: dict[str, dict[str, Any]] = {}
    objects["deployment.yaml"] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": _pod_template(cfg, gpus, claim, labels),
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
    predictor_container = _container(cfg, gpus)
    objects["inferenceservice.yaml"] = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name, "annotations": _annotations(cfg)},
        "spec": {
            "predictor": {
                "containers": [{**predictor_container, "name": "kserve-container"}],
                "volumes": _pod_spec(cfg, 0, claim)["volumes"],
            }
        },
    }
    return objects


def write(cfg: PipelineConfig, folder: Any) -> list[Any]:
    import json

    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for file, obj in build(cfg).items():
        path = folder / file
        plain = json.loads(json.dumps(obj))  # no shared sub-objects, so no YAML anchors
        path.write_text(yaml.safe_dump(plain, sort_keys=False))
        written.append(path)
    return written
