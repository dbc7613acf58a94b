"""Serve a built target: the one place that decides how.

``serving(cfg, target, log_file)`` starts Triton on the repository (or, for ``backend=pytorch`` on
GPUs with ``serve.frontend=trtllm-serve``, trtllm-serve on its checkpoint), with the OpenAI gateway
in front when asked, waits until each is healthy, yields where they answer and stops everything on
exit, error or Ctrl-C. ``serve``, the benchmark stage and ``bench`` all go through it; only the
port rule differs: a server started for a measurement takes free ports in place of busy ones
(``free_ports``), ``serve`` keeps what the user configured and refuses busy ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.artifacts import REPO_CHECKPOINT_DIR, REPO_MODEL_YAML
from pipeline.config.schema import OpenAIConfig, PipelineConfig, served_model_name
from pipeline.deploy import llmapi, server
from pipeline.errors import StageError
from pipeline.redact import url_without_credentials

log = logging.getLogger(__name__)
# How long a server started for a measurement (the eval and benchmark stages, bench) waits for its
# models to unload when stopped. Nothing is in flight then, and the models unload in about a second;
# after an evaluation the engine model was seen not to be unloaded at all (the python stubs idle,
# finalize never called: Triton 2.51 still counting a request of it) until Triton's exit timeout,
# 30 s by default, held every eval stage 15 s before the stop killed it.
MEASUREMENT_EXIT_TIMEOUT_S = 3

TRTLLM_SERVE = "trtllm-serve"


@dataclass(frozen=True)
class Endpoints:
    """Where a served target answers. ``openai_url`` is the OpenAI base URL (the gateway's, or
    trtllm-serve's own) when one is served; the Triton URLs are None under trtllm-serve."""

    frontend: str  # "triton" or "trtllm-serve"
    entry_model: str
    log_file: Path
    alive: Callable[[], bool]
    http_url: str | None = None
    grpc_url: str | None = None
    metrics_url: str | None = None
    openai_url: str | None = None
    served_model: str | None = None  # the name OpenAI clients send as "model"


def frontend_of(cfg: PipelineConfig, target: server.Target) -> str:
    """trtllm-serve only where it can run: the LLM-API layout on a GPU target."""
    if cfg.serve.frontend != TRTLLM_SERVE:
        return "triton"
    if not (target.llmapi and target.on_gpu):
        raise StageError(
            "serve.frontend=trtllm-serve serves backend=pytorch builds of GPU targets: drop it (Triton serves "
            "this repository, with the OpenAI gateway in front)"
        )
    return TRTLLM_SERVE


@contextlib.contextmanager
def serving(
    cfg: PipelineConfig, target: server.Target, log_file: Path, openai: bool, free_ports: bool = False
) -> Iterator[Endpoints]:
    """``target`` served until the block ends; ``openai``: with an OpenAI API in front."""
    if frontend_of(cfg, target) == TRTLLM_SERVE:
        with _trtllm_serve(cfg, target, log_file, free_ports) as endpoints:
            yield endpoints
        return
    triton = cfg.triton
    if free_ports:  # a server for a measurement, stopped once its requests are done
        triton = dataclasses.replace(
            server.with_free_ports(triton), exit_timeout_s=min(triton.exit_timeout_s, MEASUREMENT_EXIT_TIMEOUT_S)
        )
    launch = server.launch_for(
        triton, target.repo, target.on_gpu, target.world_size, cfg.workdir_path, llmapi=target.llmapi
    )
    with server.Server(launch, triton, log_file) as running:
        endpoints = Endpoints(
            "triton",
            target.entry_model,
            log_file,
            running.alive,
            running.url,
            running.grpc_url,
            running.metrics_url,
        )
        if not openai:
            yield endpoints
            return
        with _gateway(cfg, target, running, free_ports) as (url, name):
            yield dataclasses.replace(endpoints, openai_url=url, served_model=name)


@contextlib.contextmanager
def _gateway(
    cfg: PipelineConfig, target: server.Target, running: server.Server, free_ports: bool
) -> Iterator[tuple[str, str]]:
    """The OpenAI gateway in front of a running Triton; yields its base URL and served name."""
    from pipeline.deploy.openai import serve as gateway

    settings = gateway.settings_for(
        cfg.openai, target.repo, served_model_name(cfg), running.grpc_url, running.metrics_url
    )
    openai = _free_or_configured(cfg.openai, cfg.triton.host, free_ports)
    started = gateway.start(openai, cfg.triton.host, settings)
    try:
        yield started.url, settings.served_model
    finally:
        started.stop()


def _free_or_configured(openai: OpenAIConfig, triton_host: str, free_ports: bool) -> OpenAIConfig:
    host = openai.host or triton_host
    if not free_ports or not server.port_busy(host, openai.port):
        return openai
    port = server.free_port(host)
    log.warning("port %d is in use: this OpenAI gateway takes %d instead", openai.port, port)
    return dataclasses.replace(openai, port=port)


@contextlib.contextmanager
def _trtllm_serve(cfg: PipelineConfig, target: server.Target, log_file: Path, free_ports: bool) -> Iterator[Endpoints]:
    """trtllm-serve on the repository's checkpoint with the LLM API arguments of its model.yaml
    (so a registered or copied repository serves as built)."""
    if shutil.which(TRTLLM_SERVE) is None:
        raise StageError("trtllm-serve not found: run inside the TensorRT-LLM container, or use serve.frontend=triton")
    settings = yaml.safe_load((target.repo / REPO_MODEL_YAML).read_text())
    options = {k: v for k, v in settings.items() if k not in ("model", "triton_config")}
    log_file.parent.mkdir(parents=True, exist_ok=True)
    options_file = log_file.with_name(llmapi.OPTIONS_FILE)
    options_file.write_text(llmapi.options_yaml(options))
    host, port = cfg.triton.host, cfg.serve.trtllm_serve_port
    if server.port_busy(host, port):
        if not free_ports:
            raise StageError(
                f"port {port} on {host} is in use (another server?): stop it or set serve.trtllm_serve_port"
            )
        port = server.free_port(host)
    argv = llmapi.trtllm_serve_argv(cfg, target.repo / REPO_CHECKPOINT_DIR, options_file, host, port)
    with server.TrtllmServe(argv, host, port, log_file, cfg.triton.ready_timeout_s) as running:
        yield Endpoints(
            TRTLLM_SERVE,
            target.entry_model,
            log_file,
            running.alive,
            openai_url=f"{running.url}/v1",
            served_model=None,  # trtllm-serve names the model itself: ask /v1/models
        )


def banner(target: server.Target, endpoints: Endpoints) -> list[str]:
    """What ``serve`` prints: every address, and a request to try."""
    if endpoints.frontend == TRTLLM_SERVE:
        return [
            f"serving {target.repo / REPO_CHECKPOINT_DIR} with trtllm-serve",
            f"  OpenAI API  {endpoints.openai_url}   (/health, /metrics)   log {endpoints.log_file}",
        ]
    generate = f"{endpoints.http_url}/v2/models/{target.entry_model}/generate"
    length = "sampling_param_max_tokens" if target.llmapi else "max_tokens"
    lines = [
        f"serving {target.repo}",
        f"  HTTP  {generate} (and /generate_stream)",
        f"  gRPC  {endpoints.grpc_url}   metrics {endpoints.metrics_url}   log {endpoints.log_file}",
        f'  try:  curl -s -d \'{{"text_input": "What is the capital of France?", "{length}": 20}}\' {generate}',
    ]
    if endpoints.openai_url:
        lines.append(
            f"  OpenAI API  {endpoints.openai_url}   (/chat/completions, /completions, /models; /health and /metrics)"
        )
    return lines


def served_model(url: str, key: str | None) -> str:
    """The first model an OpenAI-compatible server lists at ``url``/models."""
    import requests

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    where = f"{url_without_credentials(url).rstrip('/')}/models"
    try:
        response = requests.get(url.rstrip("/") + "/models", headers=headers, timeout=10)
        response.raise_for_status()
        return str(response.json()["data"][0]["id"])
    except (requests.RequestException, ValueError, KeyError, IndexError) as error:
        raise StageError(
            f"cannot list the models at {where}: {str(error).splitlines()[0][:200]} "
            "(give benchmark.model=<served name>, and check url= points at .../v1)"
        ) from error
