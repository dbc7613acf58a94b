"""Triton python model: text -> token ids with the model's own Hugging Face tokenizer.

Chat models get their chat template applied by default (parameter ``chat_template``), because an
instruction-tuned model answers a bare question badly or not at all. Requests that cannot be
served (prompt too long, max_tokens out of range) get an error response naming the limit; the
others in the same batch are unaffected.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

# A tokenizer needs no torch: without it transformers imports in 1 s instead of 5 here, and the
# server, whose stubs load at once, is ready seconds sooner on a small host
os.environ.setdefault("USE_TORCH", "0")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # its 'no PyTorch found' notice
from transformers import AutoTokenizer


class Row:
    """One prompt of a request that carries several (a batch dimension over 1, as upstream's
    clients may send): its inputs are that row of each input."""

    def __init__(self, request: Any, index: int, batch: int):
        self.request, self.index, self.batch = request, index, batch


def _optional(source: Any, name: str) -> np.ndarray | None:
    row = source if isinstance(source, Row) else Row(source, 0, 1)
    tensor = pb_utils.get_input_tensor_by_name(row.request, name)
    if tensor is None:
        return None
    array = tensor.as_numpy()
    return array[row.index : row.index + 1] if row.batch > 1 and array.shape[:1] == (row.batch,) else array


def _merged(rows: list[dict[str, np.ndarray]], pad_id: int) -> dict[str, np.ndarray]:
    """The outputs of a request's rows as one batch: ids padded to the longest prompt (the engine
    reads REQUEST_INPUT_LEN), word lists to the longest list, and a row without an embedding bias
    given zeros where another row has one."""
    if len(rows) == 1:
        return rows[0]
    merged = {}
    for name in dict.fromkeys(name for row in rows for name in row):  # only the bias may be missing
        present = next(row[name] for row in rows if name in row)
        arrays = [row.get(name, np.zeros_like(present)) for row in rows]
        width = max(a.shape[-1] for a in arrays)
        fill = pad_id if name == "INPUT_ID" else -1
        pad = [np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])], constant_values=fill) for a in arrays]
        merged[name] = np.concatenate(pad)
    return merged


def _strings(array: np.ndarray | None) -> list[str]:
    if array is None:
        return []
    return [v.decode() if isinstance(v, bytes) else str(v) for v in array.reshape(-1) if v not in (b"", "")]


def _chat(text: str) -> list[dict[str, str]]:
    """MESSAGES: a JSON list of {"role", "content"} objects."""
    try:
        chat = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"messages is not JSON: {error}") from error
    if not isinstance(chat, list) or not chat or not all(isinstance(m, dict) and "role" in m for m in chat):
        raise ValueError('messages must be a JSON list of {"role": ..., "content": ...} objects')
    return [{"role": str(m["role"]), "content": str(m.get("content") or "")} for m in chat]


# inputs of upstream's preprocessing for models this pipeline does not build: refused by name
NOT_SERVED = {
    "DECODER_QUERY": "encoder-decoder models",
    "IMAGE_BYTES": "multimodal models",
    "IMAGE_URL": "multimodal models",
    "IMAGE_SIZES": "multimodal models",
    "VIDEO_BYTES": "multimodal models",
    "PROMPT_TABLE_EXTRA_ID": "prompt tables (p-tuning)",
}

# A text longer than max_input_len x this many bytes is refused before tokenizing: far more than any
# prompt of max_input_len tokens needs (English text averages about 4 bytes a token)
MAX_BYTES_PER_TOKEN = 64


def _in_repository(args: dict[str, Any], path: str) -> Path:
    """Paths in the repository's configs are relative to its root, so the folder can move."""
    return Path(args["model_repository"]).parent / path


def _template_error(error: Exception) -> bool:
    """Whether a chat template refused the messages (jinja's raise_exception): the client's fault."""
    try:
        from jinja2 import TemplateError
    except ImportError:
        return False
    return isinstance(error, TemplateError)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        tokenizer_dir = _in_repository(args, params["tokenizer_dir"])
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, padding_side="left")
        self.add_special_tokens = params.get("add_special_tokens", "false").lower() == "true"
        self.chat = params.get("chat_template", "true").lower() == "true" and bool(self.tokenizer.chat_template)
        self.max_input_len = int(params["max_input_len"])
        self.max_seq_len = int(params["max_seq_len"])
        self.end_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.end_id

    def _encode(self, request: Any, text: str) -> list[int]:
        """Token ids of the request's prompt: MESSAGES (a JSON chat) through the chat template;
        otherwise the text, wrapped as one user message unless the chat template is off (for the
        repository, or for this request by APPLY_CHAT_TEMPLATE)."""
        messages = _strings(_optional(request, "MESSAGES"))
        if messages:
            if not self.tokenizer.chat_template:
                raise ValueError("messages: this model's tokenizer has no chat template; send text_input instead")
            return list(self.tokenizer.apply_chat_template(_chat(messages[0]), add_generation_prompt=True))
        wanted = _optional(request, "APPLY_CHAT_TEMPLATE")
        chat = self.chat if wanted is None else bool(wanted.reshape(-1)[0]) and bool(self.tokenizer.chat_template)
        if chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens)

    def _word_list(self, words: list[str]) -> np.ndarray:
        """TensorRT-LLM's [2, N] layout: row 0 the concatenated token ids of all words, row 1 the
        end offset of each word, padded with -1."""
        ids: list[int] = []
        offsets: list[int] = []
        for word in words:
            ids += self.tokenizer.encode(word, add_special_tokens=False)
            offsets.append(len(ids))
        width = max(1, len(ids))
        table = np.full((2, width), -1, dtype=np.int32)
        table[0, : len(ids)] = ids
        table[1, : len(offsets)] = offsets
        return table[None]

    def _embedding_bias(self, request: Any) -> np.ndarray | None:
        """EMBEDDING_BIAS_WORDS / _WEIGHTS -> a bias over the vocabulary: each word's weight is added
        at every token id of the word (upstream's rule; the word is tokenized without special
        tokens, so a BOS token is never biased)."""
        words = _strings(_optional(request, "EMBEDDING_BIAS_WORDS"))
        weights = _optional(request, "EMBEDDING_BIAS_WEIGHTS")
        weights = [] if weights is None else weights.reshape(-1).tolist()
        if not words and not weights:
            return None
        if len(words) != len(weights):
            raise ValueError(
                f"embedding_bias_words has {len(words)} words and embedding_bias_weights {len(weights)} weights: "
                "give one weight per word"
            )
        bias = np.zeros(len(self.tokenizer), dtype=np.float32)
        for word, weight in zip(words, weights, strict=True):
            for token in self.tokenizer.encode(word, add_special_tokens=False):
                bias[token] += weight
        return bias[None]

    def _response(self, request: Any) -> Any:
        query = pb_utils.get_input_tensor_by_name(request, "QUERY")
        batch = 1 if query is None else max(1, query.as_numpy().shape[0])
        rows = [self._one(Row(request, index, batch)) for index in range(batch)]
        merged = _merged(rows, self.pad_id)
        return pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in merged.items()])

    def _one(self, request: Any) -> dict[str, np.ndarray]:
        for name, models in NOT_SERVED.items():
            if _optional(request, name) is not None:
                raise ValueError(f"{name}: {models} are not served by this pipeline (it builds text-only LLMs)")
        query = _strings(_optional(request, "QUERY"))
        text = query[0] if query else ""
        size = len(text.encode()) + sum(len(m.encode()) for m in _strings(_optional(request, "MESSAGES")))
        if size > self.max_input_len * MAX_BYTES_PER_TOKEN:  # refused before the tokenizer works on it
            raise ValueError(
                f"text_input (with messages) is {size} bytes; the engine's max_input_len={self.max_input_len} "
                f"tokens takes at most {self.max_input_len * MAX_BYTES_PER_TOKEN}"
            )
        ids = self._encode(request, text)
        max_tokens = int(_optional(request, "REQUEST_OUTPUT_LEN").reshape(-1)[0])
        if not ids:
            raise ValueError("text_input is empty")
        if len(ids) > self.max_input_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; this engine takes at most {self.max_input_len}")
        if max_tokens < 1 or len(ids) + max_tokens > self.max_seq_len:
            raise ValueError(
                f"max_tokens={max_tokens} with a {len(ids)}-token prompt: prompt plus max_tokens must be "
                f"between {len(ids) + 1} and max_seq_len={self.max_seq_len}"
            )
        end = _optional(request, "END_ID")
        pad = _optional(request, "PAD_ID")
        outputs = {
            "INPUT_ID": np.array([ids], dtype=np.int32),
            "REQUEST_INPUT_LEN": np.array([[len(ids)]], dtype=np.int32),
            "REQUEST_OUTPUT_LEN": np.array([[max_tokens]], dtype=np.int32),
            "BAD_WORDS_IDS": self._word_list(_strings(_optional(request, "BAD_WORDS_DICT"))),
            "STOP_WORDS_IDS": self._word_list(_strings(_optional(request, "STOP_WORDS_DICT"))),
            "OUT_END_ID": np.array([[int(end.reshape(-1)[0]) if end is not None else self.end_id]], dtype=np.int32),
            "OUT_PAD_ID": np.array([[int(pad.reshape(-1)[0]) if pad is not None else self.pad_id]], dtype=np.int32),
        }
        bias = self._embedding_bias(request)
        if bias is not None:
            outputs["EMBEDDING_BIAS"] = bias
        return outputs

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                responses.append(self._response(request))
            except (ValueError, RecursionError) as error:  # refused here, or JSON nested past Python's stack
                invalid = pb_utils.TritonError(str(error) or type(error).__name__, pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=invalid))
            except Exception as error:  # a chat template that raises (roles must alternate) or a tokenizer
                # error: this request fails alone, in its own words, and the batch goes on
                client_fault = _template_error(error)
                code = pb_utils.TritonError.INVALID_ARG if client_fault else pb_utils.TritonError.INTERNAL
                message = f"the chat template refused the messages: {error}" if client_fault else str(error)
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)))
        return responses
