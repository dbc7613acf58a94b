"""Where the quantize stage puts the model it calibrates, computed by accelerate's real planner on
an empty (meta-device) model with fake GPU budgets: no GPU is needed to check the map."""

from __future__ import annotations

import pytest

from pipeline import validate
from pipeline.sizing import memory
from pipeline.stages.quantize import placement

MIB = 2**20


@pytest.fixture(scope="module")
def smollm2_like() -> object:
    from transformers import LlamaConfig

    arch = validate.load().model.arch  # SmolLM2-135M: 30 layers, tied embeddings, about 270 MB in bf16
    return LlamaConfig(
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        vocab_size=arch.vocab_size,
        tie_word_embeddings=True,
    )


def _layers_on(mapping: dict[str, int | str]) -> dict[int | str, int]:
    counts: dict[int | str, int] = {}
    for name, device in mapping.items():
        if name.startswith("model.layers."):
            counts[device] = counts.get(device, 0) + 1
    return counts


def test_a_model_that_fits_one_gpu_stays_whole_on_it(smollm2_like: object) -> None:
    import torch

    assert placement.device_map(smollm2_like, {0: 400 * MIB, 1: 400 * MIB}, torch.bfloat16) == {"": 0}


@pytest.mark.parametrize("gpus", [2, 4])
def test_a_model_too_big_for_one_gpu_is_spread_over_all_of_them(smollm2_like: object, gpus: int) -> None:
    import torch

    budget = {index: 400 * MIB // gpus for index in range(gpus)}
    mapping = placement.device_map(smollm2_like, budget, torch.bfloat16)
    assert placement.off_gpu(mapping) == []
    layers = _layers_on(mapping)
    assert sum(layers.values()) == 30 and set(layers) == set(range(gpus))  # whole layers, every GPU used
    assert mapping["model.embed_tokens"] == mapping["lm_head"]  # tied: one tensor, one device
    assert "cuda:" in placement.summary(mapping)


def test_a_model_larger_than_every_gpu_together_is_left_off_gpu(smollm2_like: object) -> None:
    import torch

    mapping = placement.device_map(smollm2_like, {0: 50 * MIB, 1: 50 * MIB}, torch.bfloat16)
    assert placement.off_gpu(mapping)  # load_model refuses this before reading a weight


def test_headroom_is_left_on_every_gpu() -> None:
    assert placement.gpu_budget({0: 1000, 1: 2000}) == {0: 850, 1: 1700}


def test_the_plan_says_how_70b_is_placed_and_the_preflight_matches_it() -> None:
    spread = validate.load(["model=llama70b", "quant=fp8", "parallel.tp=2", "target=h100"])
    line = memory.quantize_placement(spread)
    assert "spread over the host's 8 GPUs" in line and "131 GiB" in line and "16.4 GiB per GPU" in line
    assert memory.quantize_memory_problem(spread) is None
    one = validate.load(["model=llama8b", "quant=fp8", "target=h100"])
    assert "on one GPU" in memory.quantize_placement(one)
    two = validate.load(["model=llama70b", "quant=fp8", "target=h100", "target.count=2", "parallel.tp=2"])
    assert memory.quantize_memory_problem(two) is None  # 131 GiB < 2 x 79.6 GiB less 15 % headroom
    single = validate.load(["model=llama70b", "quant=fp8", "target=h100", "target.count=1"])
    problem = memory.quantize_memory_problem(single)
    assert problem and "needs about 131 GiB" in problem and "more than the 68 GiB of the 1 GPU of" in problem
