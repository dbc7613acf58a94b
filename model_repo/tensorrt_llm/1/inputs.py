"""How the CPU target's engine model reads each input of the TensorRT-LLM backend's contract.

The config declares every input upstream declares, so that a client written for NVIDIA's backend
is never refused by Triton for an unknown name. What the reference runtime cannot do is answered
with a per-request error naming the input, never dropped silently.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

# input -> the feature it belongs to, which the reference runtime does not have
UNSUPPORTED = {
    "encoder_input_features": "encoder-decoder models",
    "encoder_output_lengths": "encoder-decoder models",
    "decoder_input_ids": "encoder-decoder models",
    "decoder_input_lengths": "encoder-decoder models",
    "cross_attention_mask": "encoder-decoder models",
    "skip_cross_attn_blocks": "encoder-decoder models",
    "draft_input_ids": "speculative decoding (draft tokens)",
    "draft_logits": "speculative decoding (draft tokens)",
    "draft_acceptance_threshold": "speculative decoding (draft tokens)",
    "lookahead_window_size": "lookahead decoding",
    "lookahead_ngram_size": "lookahead decoding",
    "lookahead_verification_set_size": "lookahead decoding",
    "prompt_embedding_table": "prompt tables (p-tuning)",
    "prompt_table_extra_ids": "prompt tables (p-tuning)",
    "prompt_vocab_size": "prompt tables (p-tuning)",
    "mrope_rotary_cos_sin": "multimodal models (mrope)",
    "mrope_position_deltas": "multimodal models (mrope)",
    "context_phase_params": "disaggregated serving (context phase hand-over)",
    "retention_token_range_starts": "KV cache retention priorities",
    "retention_token_range_ends": "KV cache retention priorities",
    "retention_token_range_priorities": "KV cache retention priorities",
    "retention_token_range_durations_ms": "KV cache retention priorities",
    "retention_decode_priority": "KV cache retention priorities",
    "retention_decode_duration_ms": "KV cache retention priorities",
    "runtime_top_p_min": "top-p decay",
    "runtime_top_p_decay": "top-p decay",
    "runtime_top_p_reset_ids": "top-p decay",
}
# what the CPU target's beam search does not combine with (it runs outside the in-flight batch)
BEAMLESS = (
    "return_context_logits",
    "return_generation_logits",
    "guided_decoding_guide_type",
    "beam_search_diversity_rate",
    "return_perf_metrics",
)


class Row:
    """One prompt of a request that carries several (a batch dimension over 1, as upstream's
    clients may send, telling the answers apart by ``batch_index``): its inputs are that row."""

    def __init__(self, request: Any, index: int, batch: int):
        self.request, self.index, self.batch = request, index, batch


def batch_size(request: Any) -> int:
    ids = pb_utils.get_input_tensor_by_name(request, "input_ids")
    shape = () if ids is None else ids.as_numpy().shape
    return int(shape[0]) if len(shape) > 1 else 1


def tensor(source: Any, name: str) -> np.ndarray | None:
    """The input as an array (of a ``Row``: its row), or None when absent or empty (an empty
    tensor asks for nothing)."""
    row = source if isinstance(source, Row) else Row(source, 0, 1)
    found = pb_utils.get_input_tensor_by_name(row.request, name)
    if found is None:
        return None
    array = found.as_numpy()
    if row.batch > 1 and array.shape[:1] == (row.batch,):
        array = array[row.index : row.index + 1]
    return array if array.size else None


def scalar(request: Any, name: str, default: Any) -> Any:
    array = tensor(request, name)
    return default if array is None else array.reshape(-1)[0].item()


def flag(request: Any, name: str, default: bool = False) -> bool:
    return bool(scalar(request, name, default))


def word_list(request: Any, name: str) -> list[list[int]]:
    """[1, 2, N] TensorRT-LLM word list (ids, end offsets padded with -1) -> token sequences."""
    array = tensor(request, name)
    if array is None:
        return []
    ids, offsets = array.reshape(2, -1).tolist()
    words, start = [], 0
    for end in offsets:
        if end < 0:
            break
        words.append(ids[start:end])
        start = end
    return [w for w in words if w]


def text(request: Any, name: str) -> str | None:
    array = tensor(request, name)
    if array is None:
        return None
    value = array.reshape(-1)[0]
    return value.decode() if isinstance(value, bytes) else str(value)


def embedding_bias(request: Any, vocab_size: int) -> torch.Tensor | None:
    """The bias over the vocabulary; one over the tokenizer's ids only (shorter than a padded
    vocabulary) is padded with zeros."""
    array = tensor(request, "embedding_bias")
    if array is None:
        return None
    bias = torch.from_numpy(array.astype(np.float32).reshape(-1).copy())
    if len(bias) < vocab_size:
        bias = torch.cat([bias, torch.zeros(vocab_size - len(bias))])
    return bias


def refusals(request: Any, max_beam_width: int) -> list[str]:
    """Why the CPU target cannot serve this request as asked (empty when it can)."""
    problems = [
        f"{name}: {feature} are not available on the CPU target (the reference runtime); use a GPU target"
        for name, feature in UNSUPPORTED.items()
        if tensor(request, name) is not None
    ]
    beam_width = int(scalar(request, "beam_width", 1))
    if not 1 <= beam_width <= max_beam_width:
        problems.append(f"beam_width={beam_width} must lie in 1..{max_beam_width} (the engine's build.max_beam_width)")
    elif beam_width > 1:
        asked = [name for name in BEAMLESS if scalar(request, name, None)]  # false, 0 and "" ask for nothing
        problems += [f"{name} is not available with beam search on the CPU target (beam_width=1)" for name in asked]
    ids = tensor(request, "input_ids")
    if ids is None:
        problems.append("input_ids is missing: the CPU target needs token ids (prompt tables are not supported)")
    return problems
