"""LoRA adapters checked before any work (``pipeline.sizing.adapters``): shapes read from the
safetensors header against the base model's architecture, the rank against lora.max_rank, the
names; each refusal one line that names the fix."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipeline import validate
from pipeline.errors import ConfigError
from pipeline.sizing import adapters, memory

# SmolLM2-135M: hidden 576, 9 heads of 64, 3 KV heads, MLP 1536, 30 layers
SHAPES = {"q_proj": (576, 576), "v_proj": (576, 192), "down_proj": (1536, 576)}  # (in, out)


def _adapter(folder: Path, rank: int = 4, layer: int = 0, shapes: dict[str, tuple[int, int]] = SHAPES) -> Path:
    folder.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(shapes), "bias": "none"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = {}
    for module, (fan_in, fan_out) in shapes.items():
        kind = "mlp" if module.endswith(("gate_proj", "up_proj", "down_proj")) else "self_attn"
        prefix = f"base_model.model.model.layers.{layer}.{kind}.{module}"
        tensors[f"{prefix}.lora_A.weight"] = torch.zeros(rank, fan_in)
        tensors[f"{prefix}.lora_B.weight"] = torch.zeros(fan_out, rank)
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


def _load(tmp_path: Path, *adapters_given: str, extra: tuple[str, ...] = ()) -> list[str]:
    overrides = [f"workdir={tmp_path}", "target=cpu", f"lora.adapters=[{','.join(adapters_given)}]", *extra]
    try:
        validate.load(overrides)
    except ConfigError as error:
        return str(error).split("; ")
    return []


def test_an_adapter_for_this_model_passes_and_weighs_what_it_holds(tmp_path: Path) -> None:
    good = _adapter(tmp_path / "sql")
    assert _load(tmp_path, f"{{name: sql, path: {good}}}") == []
    cfg = validate.load([f"workdir={tmp_path}", "target=cpu", f"lora.adapters=[{{name: sql, path: {good}}}]"])
    # 16 bits a value: rank 4 x (576 + 576) + (576 + 192) + (1536 + 576)
    assert adapters.adapter_bytes(cfg) == [2 * 4 * (576 + 576 + 576 + 192 + 1536 + 576)]
    # on a GPU the LoRA cache comes out of the KV cache, and plan says so
    two = f"lora.adapters=[{{name: sql, path: {good}}},{{name: sql2, path: {good}}}]"
    gpu = validate.load([f"workdir={tmp_path}", "target=h100", two, "lora.cache_adapters=1"])
    plain = validate.load([f"workdir={tmp_path}", "target=h100"])
    with_lora, without = memory.plan_for(gpu), memory.plan_for(plain)
    assert with_lora.adapters_gib_per_gpu * memory.GIB == adapters.adapter_bytes(cfg)[0]  # one held at once
    assert with_lora.kv_cache_gib_per_gpu < without.kv_cache_gib_per_gpu
    said = "LoRA cache 0.0308 MiB per GPU (the 1 largest of 2 adapters, lora.cache_adapters)"
    assert said in memory.format_table(gpu)


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (
            lambda f: _adapter(f, shapes={"q_proj": (512, 512)}),
            "q_proj lora_A is [4, 512], smollm2-135m needs [4, 576]: it was trained on another base model",
        ),
        (lambda f: _adapter(f, rank=128), "rank 128 is above lora.max_rank=64: raise lora.max_rank"),
        (lambda f: _adapter(f, layer=40), "it adapts layer 40, but smollm2-135m has 30: it is for another model"),
        (lambda f: f.mkdir(), "has no adapter_config.json"),
    ],
)
def test_an_adapter_that_cannot_work_is_refused_in_one_line_naming_the_fix(
    tmp_path: Path, make: Callable[[Path], object], said: str
) -> None:
    folder = tmp_path / "bad"
    make(folder)
    (problem,) = _load(tmp_path, f"{{name: bad, path: {folder}}}")
    assert said in problem and "\n" not in problem


def test_pickled_weights_and_bad_names_are_refused(tmp_path: Path) -> None:
    pickled = _adapter(tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    assert "a pickled adapter_model.bin is not loaded" in _load(tmp_path, f"{{name: p, path: {pickled}}}")[0]
    good = _adapter(tmp_path / "good")
    twice = _load(tmp_path, f"{{name: a, path: {good}}}", f"{{name: a, path: {good}}}")
    assert twice == ["lora adapter name 'a' is given twice: names pick adapters per request"]
    base = _load(tmp_path, f"{{name: smollm2-135m, path: {good}}}")
    assert base == ["lora adapter name 'smollm2-135m' is the base model's: give the adapter another"]
    assert "no such folder" in _load(tmp_path, "{name: gone, path: /nonexistent}")[0]


@pytest.mark.slow  # two whole commands
def test_a_build_with_adapters_is_refused_before_any_work_until_the_repository_ships_them(tmp_path: Path) -> None:
    from tests.conftest import cli

    good = _adapter(tmp_path / "sql")
    refused = cli("build", f"workdir={tmp_path}", "target=cpu", f"lora.adapters=[{{name: sql, path: {good}}}]")
    assert refused.returncode == 1 and "the repository does not ship adapters yet" in refused.stderr
    assert not (tmp_path / "fetch").exists()
    shown = cli("plan", f"workdir={tmp_path}", "target=h100", f"lora.adapters=[{{name: sql, path: {good}}}]")
    assert shown.returncode == 0 and "LoRA cache 0.0308 MiB per GPU" in shown.stdout, shown.stderr[-2000:]
