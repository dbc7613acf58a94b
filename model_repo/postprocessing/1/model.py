"""Triton python model: generated token ids -> text (special tokens skipped by default).

In streaming mode each response carries only the new tokens, so each is decoded on its own; the
concatenated pieces equal the full text for byte-level BPE tokenizers such as Llama 3's and
SmolLM2's, except where one character spans two tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer


def _in_repository(args: dict[str, Any], path: str) -> Path:
    """Paths in the repository's configs are relative to its root, so the folder can move."""
    return Path(args["model_repository"]).parent / path


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.tokenizer = AutoTokenizer.from_pretrained(_in_repository(args, params["tokenizer_dir"]))
        self.skip_special = params.get("skip_special_tokens", "true").lower() != "false"

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()  # [1, beams, len]
            lengths = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH").as_numpy()  # [1, beams]
            texts = [
                self.tokenizer.decode(beam[:length].tolist(), skip_special_tokens=self.skip_special).encode()
                for beam, length in zip(tokens[0], lengths[0], strict=True)
            ]
            output = pb_utils.Tensor("OUTPUT", np.array([texts], dtype=object))
            responses.append(pb_utils.InferenceResponse([output]))
        return responses
