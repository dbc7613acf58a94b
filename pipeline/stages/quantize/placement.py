"""Where the quantize stage puts the model it calibrates.

A GPU host spreads the 16-bit model over every visible GPU, as NVIDIA's own quantize script does
(``from_pretrained(device_map="auto")``): Llama 3.1 70B is about 131 GiB of bf16 weights, more than
one 80 GB H100 holds. The map is computed here, explicitly, with accelerate's planner on an empty
(meta-device) model, so it can be logged, checked before any weight is read and tested without a
GPU. Whole decoder layers stay on one device; accelerate's hooks move activations between them.
A CPU host loads the model whole, in float32.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.errors import StageError
from pipeline.sizing.memory import CALIBRATION_HEADROOM

log = logging.getLogger(__name__)
GIB = 2**30


def gpu_budget(free_bytes: dict[int, int]) -> dict[int, int]:
    """Per-GPU bytes the weights may take: the free memory less the calibration headroom."""
    return {index: int(free * (1 - CALIBRATION_HEADROOM)) for index, free in free_bytes.items()}


def device_map(model_config: Any, budget: dict[int, int], dtype: Any) -> dict[str, int | str]:
    """Module name -> GPU index for ``from_pretrained(device_map=...)``: the whole model on the
    first GPU when it fits there (no cross-device hops), else balanced over the GPUs of ``budget``.
    Modules that fit on no GPU map to "cpu" or "disk" (refused by the caller, never offloaded:
    calibrating from host memory would take days)."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    empty.tie_weights()  # a tied embedding and lm_head are one tensor and must share a device
    no_split = list(getattr(empty, "_no_split_modules", None) or [])
    first = min(budget)
    whole = infer_auto_device_map(
        empty, max_memory={first: budget[first], "cpu": 0}, no_split_module_classes=no_split, dtype=dtype
    )
    if set(whole.values()) == {first}:
        return {"": first}
    memory: dict[int | str, int] = {index: size for index, size in budget.items()}
    memory["cpu"] = 0
    balanced = get_balanced_memory(empty, max_memory=memory, no_split_module_classes=no_split, dtype=dtype)
    balanced["cpu"] = 0
    spread = infer_auto_device_map(empty, max_memory=balanced, no_split_module_classes=no_split, dtype=dtype)
    if not off_gpu(spread):
        return spread
    # accelerate's balancing is an estimate; filling the GPUs in order uses every byte of the budget
    return infer_auto_device_map(empty, max_memory=memory, no_split_module_classes=no_split, dtype=dtype)


def off_gpu(mapping: dict[str, int | str]) -> list[str]:
    return [name for name, device in mapping.items() if not isinstance(device, int)]


def summary(mapping: dict[str, int | str]) -> str:
    """'cuda:0 holds 16 modules, cuda:1 holds 17' for the log and the plan."""
    counts: dict[int | str, int] = {}
    for device in mapping.values():
        counts[device] = counts.get(device, 0) + 1
    return ", ".join(
        f"{'cuda:' if isinstance(d, int) else ''}{d} holds {n} modules" for d, n in sorted(counts.items(), key=str)
    )


def free_gpu_memory() -> dict[int, int]:
    import torch

    return {index: torch.cuda.mem_get_info(index)[0] for index in range(torch.cuda.device_count())}


def load_model(source: Path, dtype_name: str, trust_remote_code: bool) -> Any:
    """The source checkpoint, ready to calibrate: on every visible GPU in its 16-bit dtype, or on
    the CPU in float32 (both faster and exact for fake-quantized calibration there)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if not torch.cuda.is_available():
        log.info("loading %s on the CPU as float32", source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, trust_remote_code=trust_remote_code)
        return model.eval()
    dtype = getattr(torch, dtype_name)
    model_config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    free = free_gpu_memory()
    mapping = device_map(model_config, gpu_budget(free), dtype)
    if missing := off_gpu(mapping):
        total = sum(free.values()) / GIB
        raise StageError(
            f"the {dtype_name} model does not fit the {len(free)} GPUs of this host ({total:.0f} GiB free; "
            f"{len(missing)} modules left over, e.g. {missing[0]}): free GPU memory or use a host with more GPUs"
        )
    log.info("loading %s as %s over %d GPUs: %s", source, dtype_name, len(free), summary(mapping))
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, device_map=mapping, trust_remote_code=trust_remote_code
    )
    return model.eval()


def input_device(model: Any) -> Any:
    """Where input ids go: the device of the token embedding (the first layer of a spread model)."""
    return model.get_input_embeddings().weight.device


def undispatch(model: Any) -> None:
    """Remove accelerate's device hooks before export, as NVIDIA's quantize script does: the
    exporter reads every module's own weights and must not trigger the hooks' moves."""
    if getattr(model, "hf_device_map", None) is None:
        return
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(model, recurse=True)
