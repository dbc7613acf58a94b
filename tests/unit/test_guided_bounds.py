"""Guided decoding's memory is bounded (``model_repo/tensorrt_llm/1/guided.py``, run here on the
tiny Llama's real tokenizer with the real xgrammar): its compiled-grammar cache has a limit (by
default xgrammar keeps every distinct schema for ever), and a guide too large to compile quickly
is refused by name."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

GUIDED = Path(__file__).parents[2] / "model_repo" / "tensorrt_llm" / "1" / "guided.py"


def _guided() -> Any:
    spec = importlib.util.spec_from_file_location("guided_under_test", GUIDED)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_grammar_cache_is_bounded_and_a_huge_guide_is_refused(tiny_checkpoint: Path) -> None:
    guided = _guided()
    grammars = guided.Grammars(tiny_checkpoint, 128)
    schema = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(4000)}}
    with pytest.raises(ValueError, match=r"guided_decoding_guide is .* bytes; at most 65536"):
        grammars.compile("json_schema", json.dumps(schema))
    grammars.compile("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}}))
    _, compiler = grammars._load()
    assert compiler.cache_limit_bytes == guided.CACHE_BYTES > 0
