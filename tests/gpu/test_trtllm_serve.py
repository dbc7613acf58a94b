"""The GPU repository served for real: the pipeline builds the embedded model's engine, renders the
repository for Triton's tensorrtllm backend, starts `tritonserver` from the container and asks the
reference question over HTTP. This is the test that would have caught a `tensorrt_llm` model that
never loads (missing backend parameters)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from pipeline import app, validate
from pipeline.deploy import server
from tests.conftest import free_ports, run_cli

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("quant", ["none", "fp8"])
def test_repository_loads_in_tritonserver_and_answers(tmp_path: Path, quant: str) -> None:
    http, grpc, metrics = free_ports(3)
    overrides = [
        f"workdir={tmp_path}",
        f"quant={quant}",
        "build=latency",
        "until=triton_repo",
        f"triton.http_port={http}",
        f"triton.grpc_port={grpc}",
        f"triton.metrics_port={metrics}",
    ]
    result = run_cli("build", *overrides, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]

    cfg = validate.load(overrides)
    target = app.built_target(cfg)
    assert target.on_gpu
    launch = server.launch_for(cfg.triton, target.repo, True, target.world_size, cfg.workdir_path)
    with server.Server(launch, cfg.triton, tmp_path / "server.log") as running:
        body = json.dumps({"text_input": "What is the capital of France?", "max_tokens": 30}).encode()
        request = urllib.request.Request(f"{running.url}/v2/models/{target.entry_model}/generate", data=body)
        with urllib.request.urlopen(request, timeout=300) as response:
            answer = json.loads(response.read())["text_output"]
    assert "Paris" in answer, answer
