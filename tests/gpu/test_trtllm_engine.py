"""A real TensorRT-LLM engine of the embedded model: built by the pipeline with trtllm-build, then
asked the reference question with TensorRT-LLM's own runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import runner, validate
from pipeline.stages import STAGES
from tests.conftest import run_cli

pytestmark = pytest.mark.gpu
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.parametrize("quant", ["none", "fp8"])
def test_engine_builds_and_answers(tmp_path: Path, quant: str) -> None:
    import torch
    from tensorrt_llm.runtime import ModelRunner
    from transformers import AutoTokenizer

    overrides = [f"workdir={tmp_path}", f"quant={quant}", "build=latency", "until=engine"]
    result = run_cli("build", *overrides, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]

    steps = runner.plan(validate.load(overrides), STAGES)
    engine_dir = steps[-1].dirs.final / "engine"
    manifest = json.loads((steps[-1].dirs.final / "engine.json").read_text())
    assert manifest["runtime"] == "tensorrt_llm" and manifest["sm"] >= 80
    assert sorted(p.name for p in engine_dir.glob("rank*.engine")) == ["rank0.engine"]

    tokenizer = AutoTokenizer.from_pretrained(steps[1].dirs.final / "tokenizer")
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    engine = ModelRunner.from_dir(str(engine_dir))
    output = engine.generate(
        [torch.tensor(ids, dtype=torch.int32)],
        max_new_tokens=30,
        end_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    answer = tokenizer.decode(output[0, 0, len(ids) :].tolist(), skip_special_tokens=True)
    assert "Paris" in answer
