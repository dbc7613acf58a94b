"""LoRA adapters served by name beside the base model (``model=<adapter>``), as vLLM and NIM serve
them: the repository lists them (``repository.json``: the triton_repo stage ships them), and each
request names one or none.

On the engine path a request carries the adapter's ``lora_task_id``: the engine model loaded every
shipped adapter when it started (``lora_prefetch_dir``). One that it dropped since (its cache keeps
``lora.cache_adapters`` of them on the CPU target) answers with upstream's "not found in cache"
error, before any token: the request is then sent again once with the adapter's ``lora_weights`` and
``lora_config`` tensors from the repository, as upstream's clients do. The LLM-API layout takes the
adapter by ``lora_id``/``lora_name``/``lora_path`` (PEFT's folder in the repository), and loads it
itself.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from pipeline.artifacts import LORA_CONFIG_NPY, LORA_WEIGHTS_NPY, REPOSITORY_JSON
from pipeline.deploy.openai.triton_stream import TritonError
from pipeline.runtime.failures import LORA_NOT_CACHED

T = TypeVar("T")


@dataclass(frozen=True)
class ServedAdapter:
    name: str  # what clients put in "model"
    task_id: int  # the backend's lora_task_id (the LLM API's lora_id)
    path: str  # PEFT's files, relative to the repository root (the LLM API's lora_path)
    tensors: Path  # the backend's request tensors (model.lora_weights.npy, model.lora_config.npy)
    root: str  # what /v1/models says it is: a Hub adapter's repository@commit, else its name

    def card(self, base: str) -> dict[str, Any]:
        """The adapter in ``/v1/models``: a model whose parent is the base (vLLM's fields)."""
        return {"id": self.name, "object": "model", "created": 0, "owned_by": "pipeline", "parent": base,
                "root": self.root}  # fmt: skip

    def engine_inputs(self, with_weights: bool) -> dict[str, Any]:
        """The engine path's inputs: the task id, and the adapter's tensors when they must be sent."""
        inputs: dict[str, Any] = {"lora_task_id": self.task_id}
        if with_weights:
            weights, config = _tensors(self.tensors)
            inputs.update(lora_weights=weights, lora_config=config)
        return inputs

    def llmapi_inputs(self) -> dict[str, Any]:
        return {"lora_id": self.task_id, "lora_name": self.name, "lora_path": self.path}


@functools.lru_cache(maxsize=16)
def _tensors(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The adapter's tensors, read once (a few MB) and only when an engine asks for them."""
    return np.load(folder / LORA_WEIGHTS_NPY), np.load(folder / LORA_CONFIG_NPY)


async def with_adapter(
    adapter: ServedAdapter, values: dict[str, Any], request: Callable[[dict[str, Any]], AsyncGenerator[T, None]]
) -> AsyncGenerator[T, None]:
    """``request(values)``'s responses with the adapter's task id; sent once more with its weights
    when the engine says it does not hold the adapter (an error that comes before any response)."""
    for with_weights in (False, True):
        started = False
        try:
            async with aclosing(request({**values, **adapter.engine_inputs(with_weights)})) as responses:
                async for response in responses:
                    started = True
                    yield response
            return
        except TritonError as error:
            if started or with_weights or LORA_NOT_CACHED not in str(error):
                raise


def from_repository(repo: Path, info: dict[str, Any] | None = None) -> dict[str, ServedAdapter]:
    """The adapters ``repo`` ships, by name (none for a repository rendered without them);
    ``info``: its repository.json, when the caller has read it already."""
    info = info if info is not None else json.loads((repo / REPOSITORY_JSON).read_text())
    served = {}
    for entry in info.get("adapters", []):
        tensors = repo / entry["tensors"]
        # a Hub adapter's repository and commit; a local folder's path stays on the server
        root = f"{entry['source']}@{entry['revision']}" if entry.get("revision") else entry["name"]
        adapter = ServedAdapter(entry["name"], int(entry["task_id"]), entry["path"], tensors, root)
        served[adapter.name] = adapter
    return served
