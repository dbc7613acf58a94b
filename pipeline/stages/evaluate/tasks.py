"""The tasks shipped with the pipeline, written as lm-evaluation-harness task YAMLs over data that
code here generates (nothing copied from a benchmark), so that evaluation runs where no dataset can
be downloaded. Fixed seeds: the same items every time.

- ``pipeline_capitals`` (log-likelihood, multiple choice): "What is the capital of X?" with the
  capital and three other capitals as choices, from ``pipeline/data/capitals.txt``; chance 1/4.
- ``pipeline_arithmetic`` (generate until a newline): two-shot sums of two numbers up to 50, scored
  by exact match of the number; chance is near 0.

Any other task name is lm-evaluation-harness's own, run where its data is at hand.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from pipeline.assets import CAPITALS

SEED = 20261204
ARITHMETIC_ITEMS = 300
ARITHMETIC_MAX = 50
CAPITAL_QUESTIONS = (
    "Question: What is the capital of {country}?\nAnswer:",
    "Q: Which city is the capital of {country}?\nA:",
)
SHOTS = "Question: What is 2 plus 3?\nAnswer: 5\n\nQuestion: What is 14 plus 7?\nAnswer: 21\n\n"


@dataclass(frozen=True)
class Builtin:
    name: str
    loglikelihood: bool  # scores prompt continuations: needs an endpoint that echoes log probabilities
    chance: float  # the score of answering at random
    metric: str


BUILTINS = {
    "pipeline_capitals": Builtin("pipeline_capitals", True, 0.25, "acc"),
    "pipeline_arithmetic": Builtin("pipeline_arithmetic", False, 0.0, "exact_match"),
}


def capitals() -> list[dict[str, object]]:
    pairs = [line.split("|") for line in CAPITALS.read_text().splitlines() if line.strip() and not line.startswith("#")]
    rng = random.Random(SEED)
    items = []
    for template in CAPITAL_QUESTIONS:
        for country, capital in pairs:
            others = rng.sample([c for _, c in pairs if c != capital], 3)
            choices = [capital, *others]
            rng.shuffle(choices)
            items.append({"question": template.format(country=country), "choices": choices,
                          "answer": choices.index(capital)})  # fmt: skip
    return items


def arithmetic() -> list[dict[str, object]]:
    rng = random.Random(SEED + 1)
    items: list[dict[str, object]] = []
    for _ in range(ARITHMETIC_ITEMS):
        a, b = rng.randint(1, ARITHMETIC_MAX), rng.randint(1, ARITHMETIC_MAX)
        items.append({"question": f"{SHOTS}Question: What is {a} plus {b}?\nAnswer:", "answer": str(a + b)})
    return items


def _yaml(name: str, data: Path) -> str:
    """The task's lm-eval YAML (JSON is YAML), its data file named by absolute path."""
    common = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "doc_to_text": "{{question}}",
        "doc_to_target": "{{answer}}",
    }
    if name == "pipeline_capitals":
        spec = {**common, "output_type": "multiple_choice", "doc_to_choice": "{{choices}}",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}  # fmt: skip
    else:
        spec = {
            **common,
            "output_type": "generate_until",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False, "temperature": 0.0},
            "filter_list": [
                {
                    "name": "strip",
                    "filter": [{"function": "regex", "regex_pattern": r"(-?\d+)"}, {"function": "take_first"}],
                }
            ],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        }
    return json.dumps(spec, indent=2) + "\n"


def write(folder: Path) -> Path:
    """The shipped tasks' data and YAMLs in ``folder`` (lm-eval's include_path)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, items in (("pipeline_capitals", capitals()), ("pipeline_arithmetic", arithmetic())):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(item) + "\n" for item in items))
        (folder / f"{name}.yaml").write_text(_yaml(name, data))
    return folder
