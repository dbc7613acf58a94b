"""A stage's fingerprint changes whenever its output would: every setting of ``build`` and
``triton`` is flipped in turn, the stage's output is rendered with it (the repository's configs,
its code and what repository.json records; trtllm-build's argv), and a change there must show as
a change of the stage's ``depends_on``. (``build.max_beam_width`` once changed the repository and
not its fingerprint, so a cached repository that refused beam search was reused.)"""

from __future__ import annotations

import dataclasses
import json
from enum import Enum
from pathlib import Path
from typing import Any

import pytest

from pipeline import validate
from pipeline.config.schema import PipelineConfig
from pipeline.stages.engine import stage as engine
from pipeline.stages.triton_repo import render
from pipeline.stages.triton_repo import stage as triton_repo

SECTIONS = ("build", "triton")


def _flips(value: Any) -> list[Any]:
    """Other values of a setting's type, to try in turn."""
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, Enum):
        return [member for member in type(value) if member is not value]
    if isinstance(value, int):
        return [value + 1, value * 2, max(0, value - 1)]
    if isinstance(value, float):
        return [value / 2, value + 0.25]
    if isinstance(value, str):
        return [value + "x"]
    if value is None:
        return [1, True, "x"]
    return []


def _variants(cfg: PipelineConfig) -> list[tuple[str, PipelineConfig]]:
    variants = []
    for section in SECTIONS:
        settings = getattr(cfg, section)
        for field in dataclasses.fields(settings):
            for value in _flips(getattr(settings, field.name)):
                changed = dataclasses.replace(settings, **{field.name: value})
                variants.append((f"{section}.{field.name}={value}", dataclasses.replace(cfg, **{section: changed})))
    return variants


def _repository(cfg: PipelineConfig) -> str | None:
    """Everything of the repository that the configuration decides (None: it cannot be rendered)."""
    try:
        output = {
            **render.rendered_configs(cfg),
            "code": sorted(render.code_files(cfg)),
            "model.yaml": render.model_yaml(cfg) if cfg.backend.value == "pytorch" else None,
            "repository.json": [
                render.entry_model(cfg),
                cfg.build.max_batch_size,
                cfg.build.max_input_len,
                cfg.build.max_seq_len,
                cfg.triton.streaming,
                dict(cfg.model.sampling_defaults),
            ],
        }
    except Exception:
        return None
    return json.dumps(output, sort_keys=True, default=str)


def _trtllm_build(cfg: PipelineConfig) -> str | None:
    try:
        argv = engine.command(cfg, {"quantize": Path("/in")}, Path("/out"), Path("/work"))
    except Exception:
        return None
    return json.dumps(argv, default=str)


def _fingerprint(stage: Any, cfg: PipelineConfig) -> str | None:
    try:
        return json.dumps(stage.depends_on(cfg), sort_keys=True, default=str)
    except Exception:
        return None


@pytest.mark.parametrize(
    ("overrides", "stage", "output"),
    [
        (["target=cpu"], triton_repo, _repository),
        (["model=llama70b", "quant=fp8", "parallel.tp=2", "target=h100"], triton_repo, _repository),
        (["model=llama70b", "quant=fp8", "target=h100", "backend=pytorch"], triton_repo, _repository),
        (["model=llama70b", "quant=fp8", "parallel.tp=2", "target=h100"], engine, _trtllm_build),
    ],
)
def test_every_setting_that_changes_a_stages_output_changes_its_fingerprint(
    overrides: list[str], stage: Any, output: Any
) -> None:
    cfg = validate.load(overrides)
    before, fingerprint = output(cfg), _fingerprint(stage, cfg)
    assert before is not None
    unseen, tried = [], 0
    for name, variant in _variants(cfg):
        after = output(variant)
        if after is None or after == before:
            continue
        tried += 1
        if _fingerprint(stage, variant) == fingerprint:
            unseen.append(name)
    assert tried > 5, "too few settings changed the output for this check to mean anything"
    assert not unseen, f"these settings change the stage's output but not its fingerprint: {unseen}"
