"""The accuracy gate's statistics and the shipped tasks (pure: no server)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pipeline.stages.evaluate import harness, paired, tasks


def _items(scores: list[float]) -> list[dict[str, object]]:
    return [{"doc_id": i, "score": s, "answer": s} for i, s in enumerate(scores)]


def test_a_real_loss_fails_and_none_passes_with_a_paired_interval() -> None:
    rng = random.Random(0)
    reference = [1.0 if rng.random() < 0.8 else 0.0 for _ in range(400)]
    lossy = [0.0 if r and rng.random() < 0.15 else r for r in reference]  # loses ~12 points
    failed = paired.compare("t", _items(lossy), _items(reference), 0.03, 0.95, at_chance=False)
    assert not failed.passed and failed.ci_low < failed.delta < failed.ci_high < 0
    assert failed.delta == pytest.approx(sum(lossy) / 400 - sum(reference) / 400)
    same = paired.compare("t", _items(reference), _items(reference), 0.01, 0.95, at_chance=False)
    assert same.passed and same.delta == 0 and same.agreement == 1 and same.items_needed == 0


def test_a_small_task_is_told_apart_from_a_lossless_one_by_the_items_it_needs() -> None:
    """Two flips either way in 60 items: no loss on average, yet 60 items cannot show it is below
    1 point; the verdict says how many would."""
    reference = [1.0] * 30 + [0.0] * 30
    swapped = [0.0, 0.0, *reference[2:30], 1.0, 1.0, *reference[32:]]
    comparison = paired.compare("t", _items(swapped), _items(reference), 0.01, 0.95, at_chance=False)
    assert comparison.delta == 0 and not comparison.passed and comparison.items_needed > 60
    assert f"about {comparison.items_needed} items would tell" in comparison.verdict()


def test_a_model_answering_at_random_is_flagged_never_passed() -> None:
    rng = random.Random(1)
    answers = [1.0 if rng.random() < 0.25 else 0.0 for _ in range(120)]  # four choices, guessed
    score = sum(answers) / len(answers)
    stderr = (score * (1 - score) / (len(answers) - 1)) ** 0.5
    guessed = harness.TaskScore("pipeline_capitals", "acc", score, stderr, len(answers), 0.25, True)
    assert guessed.at_chance
    assert not harness.TaskScore("pipeline_capitals", "acc", 0.9, 0.03, 120, 0.25, True).at_chance
    gated = paired.compare("t", _items(answers), _items(answers), 0.01, 0.95, at_chance=guessed.at_chance)
    assert not gated.passed and "within noise of chance" in gated.verdict()


def test_the_shipped_tasks_are_fixed_and_well_formed(tmp_path: Path) -> None:
    capitals, arithmetic = tasks.capitals(), tasks.arithmetic()
    assert capitals == tasks.capitals() and arithmetic == tasks.arithmetic()  # fixed seeds
    assert len(capitals) >= 200 and len(arithmetic) >= 200
    for item in capitals:
        assert len(set(item["choices"])) == 4 and 0 <= item["answer"] < 4  # type: ignore[arg-type, operator]
    folder = tasks.write(tmp_path)
    spec = json.loads((folder / "pipeline_capitals.yaml").read_text())  # JSON is YAML
    assert spec["output_type"] == "multiple_choice" and Path(spec["dataset_kwargs"]["data_files"]["test"]).is_file()


def test_the_default_tasks_leave_out_prompt_scoring_where_the_deployment_cannot_score() -> None:
    from pipeline import validate
    from pipeline.stages.evaluate import stage

    assert stage.task_names(validate.load(["target=cpu"])) == ["pipeline_capitals", "pipeline_arithmetic"]
    llmapi = validate.load(["target=cpu", "backend=pytorch"])
    assert stage.task_names(llmapi) == ["pipeline_arithmetic"]
    gpu = ["model=llama8b", "target=h100", "quant=fp8"]
    assert stage.task_names(validate.load(gpu)) == ["pipeline_arithmetic"]
    gathered = validate.load([*gpu, "build.extra_args=[--gather_context_logits]"])
    assert stage.task_names(gathered) == ["pipeline_capitals", "pipeline_arithmetic"]
    refused = stage.preflight(validate.load(["target=cpu", "backend=pytorch", "eval.tasks=[pipeline_capitals]"]))
    assert refused == [
        "eval.tasks: pipeline_capitals scores prompt log probabilities, and the LLM-API model of backend=pytorch "
        "returns no prompt log probabilities: drop it"
    ]


def test_the_reference_is_the_unquantized_build_with_the_users_other_settings() -> None:
    from pipeline import app, validate

    cfg = validate.load(["target=cpu", "quant=int4_awq", "quant.awq_block_size=64", "quant.kv_cache_dtype=int8"])
    reference = app.reference_config(cfg)
    assert str(reference.quant.format) == "none" and reference.quant.kv_cache_dtype is None
    assert reference.quant.awq_block_size == 64 and reference.until == "eval" and not reference.force
    assert cfg.quant.format.value == "int4_awq"  # the build's own config is left as it is
    none = validate.load(["target=cpu", "quant=none", "quant.awq_block_size=64"])
    assert app.reference_config(none).quant == none.quant  # a sweep's quant=none job is the reference
