"""Benchmark workloads: prompts of exact token lengths (fixed or normally distributed), or prompts
from a JSONL file, reproducible from a seed.

Synthetic prompts are cut from the held-out text (not the calibration text) at random offsets and
trimmed to the exact number of tokens with the model's own tokenizer; that count is what is
reported as input tokens (the chat template, when on, adds its own few tokens in the server).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from pipeline import datasets, textfiles
from pipeline.assets import HELDOUT_TEXT
from pipeline.config.schema import WorkloadConfig
from pipeline.stages.benchmark.loadgen import Prompt


def _length(rng: random.Random, mean: int, stddev: float) -> int:
    return max(1, round(rng.gauss(mean, stddev))) if stddev > 0 else mean


def synthetic(tokenizer: Any, count: int, work: WorkloadConfig, seed: int) -> list[Prompt]:
    rng = random.Random(seed)
    corpus = tokenizer.encode(HELDOUT_TEXT.read_text(), add_special_tokens=False)
    prompts = []
    for _ in range(count):
        n_in = _length(rng, work.input_tokens, work.input_tokens_stddev)
        n_out = _length(rng, work.output_tokens, work.output_tokens_stddev)
        ids: list[int] = []
        while len(ids) < n_in:  # the corpus repeats for prompts longer than it
            start = rng.randrange(len(corpus))
            ids += corpus[start : start + n_in - len(ids)]
        text = tokenizer.decode(ids)
        # decode/encode can merge tokens at the seams: trim or pad until the count is exact
        exact = tokenizer.encode(text, add_special_tokens=False)[:n_in]
        text = tokenizer.decode(exact)
        prompts.append(Prompt(text, len(tokenizer.encode(text, add_special_tokens=False)), n_out))
    return prompts


def described(work: WorkloadConfig, seed: int, texts: list[str]) -> dict[str, Any]:
    """The prompts a sweep sent, as the run's dataset input."""
    if work.prompts_file:
        name, source = Path(work.prompts_file).name, str(Path(work.prompts_file).expanduser().resolve())
    else:
        lengths = f"{work.input_tokens}/{work.output_tokens} tokens"
        name, source = f"synthetic prompts {lengths}", f"pipeline/data/{HELDOUT_TEXT.name} (random cuts, seed {seed})"
    return datasets.described("benchmark", name, source, texts)


def from_file(path: str, tokenizer: Any, count: int, default_max_tokens: int) -> list[Prompt]:
    """JSONL lines with ``text`` (or ``text_input``) and optional ``max_tokens``; cycled to ``count``."""
    file = Path(path).expanduser()
    rows = []
    for row in textfiles.jsonl_rows(file, "workload.prompts_file", ("text", "text_input")):
        text = str(row.get("text", row.get("text_input")))  # checked: a non-empty string
        rows.append(
            Prompt(
                text, len(tokenizer.encode(text, add_special_tokens=False)), row.get("max_tokens", default_max_tokens)
            )
        )
    return [rows[i % len(rows)] for i in range(count)]


def prompts(tokenizer: Any, count: int, work: WorkloadConfig, seed: int) -> list[Prompt]:
    if work.prompts_file:
        return from_file(work.prompts_file, tokenizer, count, work.output_tokens)
    return synthetic(tokenizer, count, work, seed)
