"""backend=pytorch on a GPU: the pipeline builds nothing, the recorded LLM API arguments load the
unified checkpoint in `tensorrt_llm.LLM` and it answers the reference question; the rendered
LLM-API repository loads in the container's `tritonserver` with upstream's model."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipeline import app, artifacts, runner, validate
from pipeline.deploy import llmapi, server
from pipeline.stages import STAGES
from tests.conftest import free_ports, run_cli

pytestmark = [pytest.mark.gpu, pytest.mark.no_build]


def _build(tmp_path: Path, *extra: str) -> list[str]:
    overrides = [f"workdir={tmp_path}", "backend=pytorch", "quant=fp8", "until=triton_repo", *extra]
    result = run_cli("build", *overrides, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return overrides


def test_the_llm_api_serves_the_unified_checkpoint_with_the_recorded_arguments(tmp_path: Path) -> None:
    overrides = _build(tmp_path)
    cfg = validate.load(overrides)
    engine = next(s for s in runner.plan(cfg, STAGES) if s.name == "engine").dirs.final
    assert not list((engine / artifacts.ENGINE).glob("*.engine"))  # nothing was built
    from tensorrt_llm import LLM, SamplingParams

    options = yaml.safe_load((engine / llmapi.OPTIONS_FILE).read_text())
    llm = LLM(model=str(engine / artifacts.ENGINE), **options)
    try:
        (output,) = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8))
        assert "Paris" in output.outputs[0].text
    finally:
        llm.shutdown()


def test_the_llmapi_repository_loads_in_tritonserver_and_answers(tmp_path: Path) -> None:
    http, grpc, metrics = free_ports(3)
    ports = [f"triton.http_port={http}", f"triton.grpc_port={grpc}", f"triton.metrics_port={metrics}"]
    cfg = validate.load(_build(tmp_path, *ports))
    target = app.built_target(cfg)
    launch = server.launch_for(cfg.triton, target.repo, True, target.world_size, cfg.workdir_path, llmapi=True)
    with server.Server(launch, cfg.triton, tmp_path / "server.log") as running:
        body = json.dumps({"text_input": "The capital of France is", "sampling_param_max_tokens": 8}).encode()
        request = urllib.request.Request(f"{running.url}/v2/models/tensorrt_llm/generate", data=body)
        with urllib.request.urlopen(request, timeout=300) as response:
            assert "Paris" in json.loads(response.read())["text_output"]
