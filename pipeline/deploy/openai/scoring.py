"""``/v1/completions`` with ``echo`` and ``logprobs``: the log probability of every prompt token, as
OpenAI's legacy completions API gives it. Evaluation harnesses score multiple-choice tasks this
way; an endpoint that cannot makes them score at chance without saying so.

The prompt's log probabilities come from the engine model's context logits (one request straight
to ``tensorrt_llm`` with the prompt's ids, ``return_context_logits``, one greedy token), turned into
log-softmax rows here: row ``i`` of the logits scores token ``i + 1``. The CPU engine returns them
always; a GPU engine only when built with ``--gather_context_logits``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.deploy.openai.adapters import ServedAdapter, with_adapter
from pipeline.deploy.openai.triton_stream import TritonStream

ENGINE_MODEL = "tensorrt_llm"


@dataclass
class Scored:
    """One prompt scored, with the tokens generated after it (greedy)."""

    text: str  # the prompt's text followed by the generated text
    tokens: list[str]
    token_logprobs: list[float | None]  # None for the first prompt token, which nothing predicts
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str

    def logprobs(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def prompt_logprobs(
    ids: Sequence[int], logits: np.ndarray, top: int, piece: Any
) -> tuple[list[float | None], list[dict[str, float] | None]]:
    """Each prompt token's log probability under the rows before it, and the ``top`` most likely
    tokens at each position (``piece``: id -> its text)."""
    rows = log_softmax(logits.astype(np.float64))
    chosen: list[float | None] = [None]
    tops: list[dict[str, float] | None] = [None]
    for position in range(1, len(ids)):
        row = rows[position - 1]
        chosen.append(float(row[ids[position]]))
        tops.append(_top(row, top, piece, ids[position]))
    return chosen, tops


def _top(row: np.ndarray, top: int, piece: Any, actual: int) -> dict[str, float]:
    best = np.argpartition(-row, top)[:top] if top < row.size else np.arange(row.size)
    # the token that was there is listed too, as OpenAI does, so a harness can tell greedy from not
    ids = sorted({*map(int, best), actual}, key=lambda i: -row[i])[: max(top, 1) + 1]
    return {piece(i): float(row[i]) for i in ids}


async def score(
    stream: TritonStream,
    ids: list[int],
    max_tokens: int,
    top: int,
    tokenizer: Any,
    request_id: str,
    adapter: ServedAdapter | None = None,
) -> Scored:
    """The prompt ``ids`` scored and ``max_tokens`` greedy tokens after it (with ``adapter``: by
    the base model with that LoRA adapter)."""
    values = {
        "input_ids": ids,
        "input_lengths": len(ids),
        "request_output_len": max_tokens,
        "return_context_logits": True,
        "return_log_probs": True,
        "exclude_input_in_output": True,
        "streaming": False,
        "runtime_top_k": 1,
    }
    if tokenizer.eos_token_id is not None:
        values["end_id"] = int(tokenizer.eos_token_id)
    logits, generated, generated_logprobs = None, [], []
    results_of = (
        stream.results(values, request_id)
        if adapter is None
        else with_adapter(adapter, values, lambda inputs: stream.results(inputs, request_id))
    )
    async with aclosing(results_of) as results:
        async for result, _final in results:
            context = result.as_numpy("context_logits")
            if context is not None and context.size:
                logits = context.reshape(-1, context.shape[-1])
            out = result.as_numpy("output_ids")
            if out is not None and out.size:
                generated += [int(t) for t in out.reshape(-1)]
            lps = result.as_numpy("output_log_probs")
            if lps is not None and lps.size:
                generated_logprobs += [float(v) for v in lps.reshape(-1)]
    if logits is None or logits.shape[0] < len(ids):
        raise RuntimeError("the engine returned no context logits for the prompt")

    def piece(token: int) -> str:
        return str(tokenizer.decode([token]))

    chosen, tops = prompt_logprobs(ids, logits[: len(ids)], top, piece)
    generated_logprobs = generated_logprobs[-len(generated) :] if generated else []
    for token, value in zip(generated, generated_logprobs, strict=False):
        chosen.append(value)
        tops.append({piece(token): value})
    tokens = [piece(t) for t in [*ids, *generated]]
    offsets, at = [], 0
    for text in tokens:
        offsets.append(at)
        at += len(text)
    finish = "stop" if generated and generated[-1] == tokenizer.eos_token_id else "length"
    return Scored(
        text="".join(tokens),
        tokens=tokens,
        token_logprobs=chosen[: len(tokens)],
        top_logprobs=tops[: len(tokens)],
        text_offset=offsets,
        prompt_tokens=len(ids),
        completion_tokens=len(generated),
        finish_reason=finish,
    )
