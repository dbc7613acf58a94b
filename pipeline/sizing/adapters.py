"""Will these LoRA adapters work on this base model? Checked before any download or build: each
adapter is plain LoRA on the decoder's projections (``pipeline.runtime.lora`` says what is
served), its rank within ``lora.max_rank``, and every matrix shaped for this architecture (read
from the safetensors header, nothing loaded). Also what the adapters weigh, for the memory plan."""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Any

from pipeline.config.schema import Architecture, CpuBatching, PipelineConfig
from pipeline.runtime import lora

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def expected_shapes(arch: Architecture, module: str, rank: int) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(A, B) shapes of a rank-``rank`` adapter of ``module`` on ``arch`` (None: arch unknown)."""
    hidden, inter, head = arch.hidden_size, arch.intermediate_size, arch.head_size
    heads, kv_heads = arch.num_attention_heads, arch.num_key_value_heads or arch.num_attention_heads
    if not (hidden and inter and head and heads and kv_heads):
        return None
    sizes = {  # (in, out)
        "q_proj": (hidden, heads * head),
        "k_proj": (hidden, kv_heads * head),
        "v_proj": (hidden, kv_heads * head),
        "o_proj": (heads * head, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    fan_in, fan_out = sizes[module]
    return (rank, fan_in), (fan_out, rank)


def _shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    file = folder / lora.WEIGHTS
    return _header_shapes(str(file.resolve()), file.stat().st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _header_shapes(path: str, _mtime_ns: int) -> dict[str, tuple[int, ...]]:
    """Every matrix's shape, read once per version of the file (the memory plan asks for each tp
    and each tune candidate)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as weights:  # the header only: nothing is loaded
        return {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}  # noqa: SIM118


def adapter_problems(cfg: PipelineConfig, name: str, folder: Path) -> list[str]:
    where = f"lora adapter {name} ({folder})"
    if not folder.is_dir():
        return [f"{where}: no such folder: give lora.adapters[].path a folder PEFT's save_pretrained wrote"]
    try:
        config = lora.read_config(folder)
    except lora.AdapterError as error:
        return [f"lora adapter {name}: {error}"]
    if not (folder / lora.WEIGHTS).is_file():
        return [f"{where}: no {lora.WEIGHTS} (a pickled adapter_model.bin is not loaded: save with safetensors)"]
    rank = int(config.get("r", 0))
    if not 0 < rank <= cfg.lora.max_rank:
        return [f"{where}: rank {rank} is above lora.max_rank={cfg.lora.max_rank}: raise lora.max_rank"]
    arch, layers = cfg.model.arch, cfg.model.arch.num_hidden_layers
    for key, shape in _shapes(folder).items():
        match = lora.KEY.search(key)
        if match is None:
            return [f"{where}: {key} is not a LoRA matrix of a decoder projection"]
        layer, module, which = int(match.group(1)), match.group(2), match.group(3)
        if layers is not None and layer >= layers:
            return [f"{where}: it adapts layer {layer}, but {cfg.model.name} has {layers}: it is for another model"]
        expected = expected_shapes(arch, module, rank)
        if expected is not None and shape != expected[0 if which == "A" else 1]:
            return [
                f"{where}: {module} lora_{which} is {list(shape)}, {cfg.model.name} needs "
                f"{list(expected[0 if which == 'A' else 1])}: it was trained on another base model"
            ]
    return []


def problems(cfg: PipelineConfig) -> list[str]:
    """Every adapter's problems, and the names: unique, URL-safe, none the base model's."""
    found, names = [], [a.name for a in cfg.lora.adapters]
    for adapter in cfg.lora.adapters:
        if not NAME.match(adapter.name):
            found.append(f"lora adapter name {adapter.name!r}: use letters, digits, '.', '_' and '-'")
        elif adapter.name == cfg.model.name:
            found.append(f"lora adapter name {adapter.name!r} is the base model's: give the adapter another")
        elif names.count(adapter.name) > 1:
            found.append(f"lora adapter name {adapter.name!r} is given twice: names pick adapters per request")
        elif bool(adapter.path) == bool(adapter.source):
            found.append(
                f"lora adapter {adapter.name}: give either path=<folder PEFT's save_pretrained wrote> "
                "or source=<Hub repository>"
            )
        elif adapter.path:  # a Hub adapter is checked once downloaded, before the base model is
            found += adapter_problems(cfg, adapter.name, Path(adapter.path).expanduser())
    if cfg.lora.adapters and cfg.lora.cache_adapters < 1:
        found.append("lora.cache_adapters must be at least 1")
    # the reference runtime applies adapters in the in-flight scheduler's packed step only
    if cfg.lora.adapters and not cfg.target.is_gpu and cfg.triton.cpu_batching is not CpuBatching.inflight:
        found.append(
            f"lora.adapters are applied by in-flight batching on the CPU target: drop "
            f"triton.cpu_batching={cfg.triton.cpu_batching}"
        )
    return list(dict.fromkeys(found))


def _local_configs(cfg: PipelineConfig) -> list[dict[str, Any]] | None:
    """Every adapter's PEFT config, or None while one is not at hand (a Hub adapter before its
    download)."""
    configs = []
    for adapter in cfg.lora.adapters:
        folder = Path(adapter.path or "").expanduser()
        if not (adapter.path and (folder / lora.CONFIG).is_file()):
            return None
        configs.append(lora.read_config(folder))
    return configs


def ranks(cfg: PipelineConfig) -> list[int]:
    """The adapters' ranks (none known while a Hub adapter is not downloaded)."""
    return [int(config.get("r", 0)) for config in _local_configs(cfg) or []]


def backend_modules(cfg: PipelineConfig) -> list[str]:
    """The projections the engine must take adapters on, under TensorRT-LLM's names: every one a
    configured adapter adapts; all seven while any adapter's files are not at hand (a Hub adapter
    before its download), so that whatever it adapts is served."""
    configs = _local_configs(cfg)
    if configs is None:
        return sorted(lora.BACKEND_MODULE.values())
    modules = {module for config in configs for module in config.get("target_modules") or []}
    return sorted(lora.BACKEND_MODULE[m] for m in modules if m in lora.BACKEND_MODULE)


def adapter_bytes(cfg: PipelineConfig) -> list[int]:
    """What each adapter's matrices weigh as served (16 bits a value); Hub adapters count once
    downloaded."""
    sizes = []
    for adapter in cfg.lora.adapters:
        folder = Path(adapter.path or "").expanduser()
        if (folder / lora.WEIGHTS).is_file():
            sizes.append(sum(2 * math.prod(shape) for shape in _shapes(folder).values()))
    return sizes


def cache_bytes(cfg: PipelineConfig) -> int:
    """The memory plan's share: the ``lora.cache_adapters`` largest adapters held at once."""
    return sum(sorted(adapter_bytes(cfg), reverse=True)[: cfg.lora.cache_adapters])
