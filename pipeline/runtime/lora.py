"""LoRA adapters for the reference runtime, applied per request in the packed forward pass.

An adapter is what PEFT saves (``adapter_config.json`` and ``adapter_model.safetensors``): for
some linear layers of the base model, two small matrices A [rank, in] and B [out, rank], and a
scale (``lora_alpha / rank``, or ``/ sqrt(rank)`` with rsLoRA). A request with an adapter gets, at
each such layer, ``base(x) + scale * (x @ A.T) @ B.T`` on its own rows of the packed step; the
other rows (other adapters, or none) are untouched. This is what TensorRT-LLM's multi-LoRA
kernels compute, one adapter per request in one batch, and, as there, the adapter stays in 16 or
32 bits on a quantized base: the base layer runs as it is, quantization hooks included.

Only what the engine path can serve is accepted: plain LoRA (no DoRA, no bias, no
``modules_to_save``, one rank and alpha for every layer) on the decoder's attention and MLP
projections. Like the rest of ``pipeline.runtime`` this module imports nothing from the pipeline.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
MODULES = ATTENTION + MLP
# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight (a named adapter: ...lora_A.<name>.weight)
KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter this runtime (and the engine path) cannot serve, said in one line."""


@dataclass(frozen=True)
class Adapter:
    """One loaded adapter: per (layer, module), A [rank, in] and B [out, rank] with the scale
    folded into B."""

    name: str
    rank: int
    modules: frozenset[str]
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def touches_mlp(self) -> bool:
        return bool(self.modules & set(MLP))


def read_config(folder: Path) -> dict[str, Any]:
    """The adapter's PEFT config, refused in one line when it is not plain LoRA on the
    decoder's projections."""
    path = folder / CONFIG
    if not path.is_file():
        raise AdapterError(f"{folder} has no {CONFIG}: give the folder PEFT's save_pretrained wrote")
    config = json.loads(path.read_text())
    problems = []
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        problems.append(f"it is a {config.get('peft_type')} adapter, not LoRA")
    if config.get("use_dora"):
        problems.append("DoRA is not served (train with use_dora=False)")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']} trains biases the engine cannot add (use bias='none')")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save={config['modules_to_save']} replaces whole layers (leave it unset)")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("rank_pattern/alpha_pattern give layers their own rank or alpha (use one r and lora_alpha)")
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        problems.append(f"target_modules={targets!r} is a pattern: list the modules, e.g. ['q_proj', 'v_proj']")
    elif not set(targets) <= set(MODULES):
        unknown = sorted(set(targets) - set(MODULES))
        problems.append(f"target_modules {unknown} are not served (choose from {', '.join(MODULES)})")
    if problems:
        raise AdapterError(f"adapter {folder}: {'; '.join(problems)}")
    return dict(config)


def scale(config: dict[str, Any]) -> float:
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def load(folder: Path, name: str, dtype: torch.dtype = torch.float32) -> Adapter:
    """The adapter in ``folder`` (PEFT's layout), its matrices in ``dtype``."""
    from safetensors.torch import load_file

    config = read_config(folder)
    if not (folder / WEIGHTS).is_file():
        raise AdapterError(f"adapter {folder}: no {WEIGHTS} (pickled adapter_model.bin is not loaded)")
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(folder / WEIGHTS).items():
        match = KEY.search(key)
        if match is None:
            raise AdapterError(f"adapter {folder}: {key} is not a LoRA matrix of a decoder projection")
        layer, module, which = int(match.group(1)), match.group(2), match.group(3)
        found.setdefault((layer, module), {})[which] = tensor
    factor = scale(config)
    weights = {}
    for where, pair in found.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"adapter {folder}: layer {where[0]} {where[1]} has lora_{''.join(pair)} alone")
        weights[where] = (pair["A"].to(dtype).contiguous(), (pair["B"].to(torch.float32) * factor).to(dtype))
    return Adapter(name, int(config["r"]), frozenset(m for _, m in weights), weights)


# TensorRT-LLM's names and ids of the projections (tensorrt_llm/lora_manager.py, and
# hf_lora_convert.py in its Triton backend: gate_proj is its mlp_h_to_4h, up_proj its mlp_gate)
BACKEND_MODULE = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_dense",
    "gate_proj": "mlp_h_to_4h",
    "down_proj": "mlp_4h_to_h",
    "up_proj": "mlp_gate",
}
BACKEND_MODULE_ID = {"attn_q": 1, "attn_k": 2, "attn_v": 3, "attn_dense": 4, "mlp_h_to_4h": 5, "mlp_4h_to_h": 6,
                     "mlp_gate": 7}  # fmt: skip


def to_backend_tensors(adapter: Adapter, dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter as the TensorRT-LLM backend's ``lora_weights`` [1, rows, width] and
    ``lora_config`` [1, rows, 3] inputs: a row per (layer, projection), A [rank, in] then B
    [out, rank] flattened, zero-padded to the widest row; its config row (module id, layer,
    rank). The scale is folded into B, as the backend applies none of its own to these tensors."""
    rows, config = [], []
    for (layer, module), (a, b) in sorted(adapter.weights.items()):
        rows.append(torch.cat([a.flatten(), b.flatten()]).to(dtype))
        config.append([BACKEND_MODULE_ID[BACKEND_MODULE[module]], layer, a.shape[0]])
    width = max(len(row) for row in rows)
    weights = torch.stack([torch.nn.functional.pad(row, (0, width - len(row))) for row in rows])
    return weights[None], torch.tensor(config, dtype=torch.int32)[None]


def from_backend_tensors(
    name: str, weights: torch.Tensor, config: torch.Tensor, model: Any, dtype: torch.dtype = torch.float32
) -> Adapter:
    """An adapter sent as the backend's ``lora_weights``/``lora_config`` (see
    ``to_backend_tensors``), its matrices cut by ``model``'s projection sizes."""
    by_id = {BACKEND_MODULE_ID[backend]: hf for hf, backend in BACKEND_MODULE.items()}
    weights, config = weights.reshape(-1, weights.shape[-1]), config.reshape(-1, 3)
    layers = model.model.layers
    found: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for row, (module_id, layer, rank) in zip(weights, config.tolist(), strict=True):
        module = by_id.get(module_id)
        if module is None or not 0 <= layer < len(layers) or rank < 1:
            raise AdapterError(f"lora_config row {[module_id, layer, rank]} names no projection of this model")
        owner = layers[layer].self_attn if module in ATTENTION else layers[layer].mlp
        linear = getattr(owner, module)
        size_a, size_b = rank * linear.in_features, linear.out_features * rank
        if size_a + size_b > row.numel():
            raise AdapterError(
                f"lora_weights row of layer {layer} {module} holds {row.numel()} values, needs {size_a + size_b}"
            )
        a = row[:size_a].reshape(rank, linear.in_features).to(dtype)
        b = row[size_a : size_a + size_b].reshape(linear.out_features, rank).to(dtype)
        found[(layer, module)] = (a, b)
    ranks = {int(r) for r in config[:, 2].tolist()}
    return Adapter(name, max(ranks), frozenset(m for _, m in found), found)


def delta(adapter: Adapter, layer: int, module: str, x: torch.Tensor) -> torch.Tensor | None:
    """``scale * (x @ A.T) @ B.T`` for rows ``x`` at ``layer``'s ``module`` (None: not adapted)."""
    pair = adapter.weights.get((layer, module))
    if pair is None:
        return None
    a, b = pair
    return ((x.to(a.dtype) @ a.T) @ b.T).to(x.dtype)


class AdapterCache:
    """Loaded adapters by key (the backend's lora_task_id), at most ``capacity`` of them: the least
    recently used is dropped, as the backend's LoRA cache drops it, and must be sent again."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._kept: OrderedDict[int, Adapter] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, key: int, adapter: Adapter) -> None:
        with self._lock:
            self._kept[key] = adapter
            self._kept.move_to_end(key)
            while len(self._kept) > self.capacity:
                self._kept.popitem(last=False)

    def get(self, key: int) -> Adapter | None:
        with self._lock:
            adapter = self._kept.get(key)
            if adapter is not None:
                self._kept.move_to_end(key)
            return adapter
