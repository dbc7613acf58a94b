"""Evaluation through the served OpenAI API with lm-evaluation-harness, and the accuracy gate's
paired comparison, against the shared Triton serving SmolLM2 and a copy of its repository whose
weights were damaged on purpose."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline import validate
from pipeline.artifacts import EVAL_ITEMS, REPO_ENGINE_DIR, REPOSITORY_JSON
from pipeline.config.schema import OpenAIConfig
from pipeline.deploy import server
from pipeline.deploy.openai import serve as gateway
from pipeline.stages.evaluate import paired
from pipeline.stages.evaluate import stage as eval_stage
from tests.conftest import cli, free_ports
from tests.integration.conftest import Served

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
ITEMS = 8  # per task: enough for a damaged model to fail clearly, few enough for seconds of work


@pytest.fixture(scope="module")
def api(served: Served) -> Iterator[str]:
    (port,) = free_ports(1)
    config = OpenAIConfig(port=port)
    settings = gateway.settings_for(
        config, served.final / "repository", MODEL, served.server.grpc_url, served.server.metrics_url
    )
    running = gateway.start(config, "127.0.0.1", settings)
    yield running.url
    running.stop()


def _cfg(served: Served) -> Any:
    return validate.load([*served.overrides, f"eval.limit={ITEMS}", "eval.tasks=[pipeline_capitals]"])


def _items(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / EVAL_ITEMS).read_text().splitlines()]


@pytest.fixture(scope="module")
def evaluated(served: Served, api: str) -> tuple[Any, Path]:
    """`eval url=` against the gateway, once for this module: the command's result and its folder."""
    result = cli("eval", f"url={api}", *served.overrides, f"eval.limit={ITEMS}", "tracking=none")
    assert result.returncode == 0, result.stderr[-2000:]
    return result, Path(result.stdout.strip().splitlines()[-1].removeprefix("results in "))


def test_eval_url_scores_a_running_gateway_on_the_shipped_tasks(evaluated: tuple[Any, Path]) -> None:
    result, folder = evaluated
    lines = {line.split(":")[0]: line for line in result.stdout.splitlines() if line.startswith("pipeline_")}
    assert set(lines) == {"pipeline_capitals", "pipeline_arithmetic"}
    capitals = float(lines["pipeline_capitals"].split()[2])
    assert capitals > 0.6 and "chance" not in lines["pipeline_capitals"]  # SmolLM2 knows most capitals
    records = _items(folder)
    assert len(records) == 2 * ITEMS and {"prompt", "target", "answer", "score"} <= set(records[0])


def test_the_gate_fails_a_damaged_deployment_and_passes_an_intact_one(
    served: Served, evaluated: tuple[Any, Path], tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    intact = [item for item in _items(evaluated[1]) if item["task"] == "pipeline_capitals"]
    copy = tmp_path / "repository"
    shutil.copytree(served.final / "repository", copy, copy_function=os.link)  # links: seconds, not copies
    for model in ("tensorrt_llm_bls", "postprocessing", "ensemble"):  # scoring needs only the engine model
        shutil.rmtree(copy / model)
    # the base model alone is compared here (test_lora_gate.py gates adapters): the copy lists none,
    # in a new file (the linked one is the shared repository's)
    info = json.loads((copy / REPOSITORY_JSON).read_text())
    (copy / REPOSITORY_JSON).unlink()
    (copy / REPOSITORY_JSON).write_text(json.dumps({**info, "adapters": []}))
    weights = copy / REPO_ENGINE_DIR / "rank0.safetensors"
    tensors = load_file(weights)
    generator = torch.Generator().manual_seed(0)
    for name, tensor in tensors.items():
        if name.endswith("mlp.fc.weight"):  # noise as large as the weights in every MLP
            tensors[name] = tensor + torch.randn(tensor.shape, generator=generator) * tensor.float().std()
    save_file(tensors, tmp_path / "damaged.safetensors")
    os.replace(tmp_path / "damaged.safetensors", weights)  # a new file in the copy: the shared one is untouched
    cfg = _cfg(served)
    target = server.target_of_folder(str(copy), tmp_path)
    eval_stage.evaluate_target(cfg, target, tmp_path / "damaged")
    damaged = _items(tmp_path / "damaged")
    failed = paired.compare("pipeline_capitals", damaged, intact, 0.03, 0.95, at_chance=False)
    assert not failed.passed and failed.delta < -0.2 and failed.ci_high < 0, failed
    assert "FAIL" in failed.verdict() and "not ruled out" in failed.verdict()
    same = paired.compare("pipeline_capitals", intact, intact, 0.01, 0.95, at_chance=False)
    assert same.passed and same.delta == 0 and same.agreement == 1.0 and len(intact) == ITEMS
