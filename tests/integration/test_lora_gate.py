"""The accuracy gate per LoRA adapter: a quantized build with an adapter evaluates the base model
and the adapter (asked for by name through the served API), each paired with the same model on the
unquantized build, and records a verdict per adapter and task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import cli
from tests.fixtures.tiny_model import write_tiny_adapter

pytestmark = pytest.mark.slow  # two builds of the tiny model, each evaluated through a real Triton


def test_each_adapter_is_gated_against_itself_on_the_unquantized_base(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import mlflow

    helper = write_tiny_adapter(tiny_checkpoint, tmp_path / "helper", 4)
    built = cli(
        "build",
        "model=local",
        f"model.path={tiny_checkpoint}",
        "target=cpu",
        "quant=int8_sq",
        "quant.calib.dataset=builtin",
        "quant.eval_tokens=0",
        "benchmark=none",
        "eval.limit=8",
        "eval.gate=warn",  # the random tiny model answers at chance, which never passes
        "eval.tasks=[pipeline_capitals]",
        "build.max_seq_len=512",
        "build.max_input_len=256",
        f"lora.adapters=[{{name: helper, path: {helper}}}]",
        f"workdir={tmp_path / 'work'}",
        "tracking.register=false",
    )
    assert built.returncode == 0, built.stderr[-3000:]
    # both builds evaluated the adapter by name, beside the base model
    for folder in (tmp_path / "work" / "eval").iterdir():
        if folder.is_dir() and not folder.name.startswith("."):
            scores = json.loads((folder / "lora" / "helper" / "eval.json").read_text())
            assert [s["task"] for s in scores] == ["pipeline_capitals"] and scores[0]["items"] == 8
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (run,) = [r for r in runs if "int8_sq" in r.info.run_name]
    for task in ("pipeline_capitals", "helper/pipeline_capitals"):  # the base model's, then the adapter's
        assert {f"eval/{task}/{m}" for m in ("acc", "acc_ref", "delta", "agreement")} <= set(run.data.metrics)
        assert task in run.data.tags["mlflow.note.content"]  # the card's gate line names each
