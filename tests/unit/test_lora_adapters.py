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
    static = _load(tmp_path, f"{{name: a, path: {good}}}", extra=("triton.cpu_batching=run_to_completion",))
    assert static == [
        "lora.adapters are applied by in-flight batching on the CPU target: drop triton.cpu_batching=run_to_completion"
    ]


def test_an_adapter_comes_from_a_folder_or_the_hub_not_both(tmp_path: Path) -> None:
    good = _adapter(tmp_path / "sql")
    both = _load(tmp_path, f"{{name: sql, path: {good}, source: org/sql-lora}}")
    neither = _load(tmp_path, "{name: sql}")
    said = "lora adapter sql: give either path=<folder PEFT's save_pretrained wrote> or source=<Hub repository>"
    assert both == neither == [said]
    # a Hub adapter is checked once downloaded (the triton_repo stage's preflight, before any stage runs)
    assert _load(tmp_path, "{name: sql, source: org/sql-lora, revision: v1}") == []


def test_the_gpu_paths_get_the_lora_plugin_cache_and_llm_api_config_under_upstreams_names(tmp_path: Path) -> None:
    from pipeline.deploy import llmapi
    from pipeline.stages.engine import trtllm
    from pipeline.stages.triton_repo import render

    good = _adapter(tmp_path / "sql")  # rank 4 on q_proj, v_proj, down_proj
    gpu = ["target=h100", "quant=fp8", f"lora.adapters=[{{name: sql, path: {good}}}]", "lora.max_rank=16"]
    cfg = validate.load(gpu)
    argv = trtllm.build_argv(cfg, Path("ckpt"), Path("out"), None)
    assert trtllm.argv_problems(argv) == []  # every flag and value in trtllm-build's table
    at = argv.index("--lora_plugin")
    assert argv[at : at + 8] == ["--lora_plugin", "auto", "--max_lora_rank", "16", "--lora_target_modules",
                                 "attn_q", "attn_v", "mlp_4h_to_h"]  # fmt: skip
    assert "--lora_plugin" not in trtllm.build_argv(validate.load(gpu[:2]), Path("c"), Path("o"), None)
    owned = trtllm.extra_arg_problems(["--max_lora_rank", "8"])
    assert owned and "which the pipeline sets itself" in owned[0]
    # the backend's LoRA cache, under the names its config reads (the shared contract)
    params = render.engine_parameters(cfg)
    lora_params = {k: v for k, v in params.items() if k.startswith("lora_")}
    contract = json.loads((Path(__file__).parents[3] / "shared/reference/trtllm_backend_contract.json").read_text())
    assert set(lora_params) <= set(contract["tensorrt_llm"]["parameters"])
    assert lora_params == {
        "lora_cache_optimal_adapter_size": "4",
        "lora_cache_max_adapter_size": "16",
        "lora_cache_gpu_memory_fraction": "0.05",
        "lora_cache_host_memory_bytes": str(2**30),
        "lora_prefetch_dir": "tensorrt_llm/1/lora/prefetch",
    }
    assert not any(k.startswith("lora_") for k in render.engine_parameters(validate.load(gpu[:2])))
    # the PyTorch backend: the LLM API's lora_config, every name one of the pinned version's
    options = llmapi.options(validate.load([*gpu, "backend=pytorch"]))
    assert llmapi.unknown_names(options) == []
    assert options["lora_config"] == {"max_lora_rank": 16, "max_loras": 8, "max_cpu_loras": 8,
                                      "lora_target_modules": ["attn_q", "attn_v", "mlp_4h_to_h"]}  # fmt: skip


def test_plan_shows_the_lora_cache_taken_from_the_kv_cache(tmp_path: Path) -> None:
    from tests.conftest import cli

    good = _adapter(tmp_path / "sql")
    shown = cli("plan", f"workdir={tmp_path}", "target=h100", f"lora.adapters=[{{name: sql, path: {good}}}]")
    assert shown.returncode == 0 and "LoRA cache 0.0308 MiB per GPU" in shown.stdout, shown.stderr[-2000:]
