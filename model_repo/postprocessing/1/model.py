"""Triton python model: generated token ids -> text (special tokens skipped by default).

A streamed response carries only its new tokens. With ``STREAM`` true and a ``STREAM_KEY`` (sent
by the BLS model, one per request), the text of each piece is decoded in the context of the
stream's earlier tokens and a character still missing bytes is held back (``detokenize.py``), so
the pieces of a stream concatenate to the non-streamed text; ``STREAM_END`` ends a stream and
returns what it still held back. Without them every response is
decoded on its own, as upstream's postprocessing does: the ensemble cannot give postprocessing a
stream's identity (Triton refuses an ensemble step whose inputs come from a decoupled model and
from another one), so UTF-8-safe streaming needs the BLS model, as upstream advises.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

# A tokenizer needs no torch: without it transformers imports in 1 s instead of 5 here, and the
# server, whose stubs load at once, is ready seconds sooner on a small host
os.environ.setdefault("USE_TORCH", "0")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # its 'no PyTorch found' notice
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from detokenize import Streams


def _in_repository(args: dict[str, Any], path: str) -> Path:
    """Paths in the repository's configs are relative to its root, so the folder can move."""
    return Path(args["model_repository"]).parent / path


def _optional(request: Any, name: str) -> Any:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy().reshape(-1)[0]


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.tokenizer = AutoTokenizer.from_pretrained(_in_repository(args, params["tokenizer_dir"]))
        self.skip_special = params.get("skip_special_tokens", "true").lower() != "false"
        self.streams = Streams(self.tokenizer, self.skip_special)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:  # a malformed request (sent straight to this model) fails alone
                output = pb_utils.Tensor("OUTPUT", np.array(self._texts(request), dtype=object))
                responses.append(pb_utils.InferenceResponse([output]))
            except Exception as error:
                invalid = pb_utils.TritonError(f"postprocessing: {error}", pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=invalid))
        return responses

    def _texts(self, request: Any) -> list[list[bytes]]:
        """The text of each beam of each row: [batch, beams]."""
        tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()  # [batch, beams, len]
        lengths = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH").as_numpy()  # [batch, beams]
        key = _optional(request, "STREAM_KEY")
        streaming = bool(_optional(request, "STREAM")) and key is not None
        if tokens.ndim != 3 or lengths.shape != tokens.shape[:2]:
            raise ValueError(f"TOKENS_BATCH {list(tokens.shape)} and SEQUENCE_LENGTH {list(lengths.shape)} disagree")
        if tokens.size and tokens.min() < 0:  # (ids past the tokenizer's vocabulary decode to nothing)
            raise ValueError("TOKENS_BATCH holds negative ids")
        texts = []
        for row_ids, row_lengths in zip(tokens, lengths, strict=True):
            row = []
            for beam, (ids, length) in enumerate(zip(row_ids, row_lengths, strict=True)):
                ids = ids[: max(0, int(length))].tolist()
                if streaming and bool(_optional(request, "STREAM_END")):
                    row.append(self.streams.end(f"{key!r}/{beam}").encode())
                elif streaming:  # one stream per request (the BLS sends one row at a time)
                    row.append(self.streams.push(f"{key!r}/{beam}", ids).encode())
                else:
                    row.append(self.tokenizer.decode(ids, skip_special_tokens=self.skip_special).encode())
            texts.append(row)
        return texts
