"""Triton python model of the CPU target: the reference runtime in place of a TensorRT-LLM engine.

Same inputs and outputs as the TensorRT-LLM backend (a subset). With ``batching=inflight``
(``triton.cpu_batching=inflight``) ``execute`` hands each request to the in-flight scheduler
(``reference_runtime/scheduler.py``), which admits it at the next decoding step and answers it as
soon as it ends; with ``run_to_completion`` (the default) the requests Triton's dynamic batcher
delivers together run as one batch until the last of them ends. Each request is checked before it
joins (ids inside the vocabulary, sampling values in range, length within the engine's
``max_seq_len``): a bad one gets its own error and the others run. The model is decoupled: a
streaming request gets one response per token, any other request one response with all of its
tokens, and each request is closed as soon as it finishes, not when the whole batch does.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

sys.path.insert(0, str(Path(__file__).parent))
from reference_runtime.checkpoint import load_model
from reference_runtime.generate import Request, Result, generate
from reference_runtime.scheduler import Scheduler

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _scalar(request: Any, name: str, default: Any) -> Any:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else tensor.as_numpy().reshape(-1)[0].item()


def _word_list(request: Any, name: str) -> list[list[int]]:
    """[1, 2, N] TensorRT-LLM word list (ids, end offsets padded with -1) -> token sequences."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return []
    ids, offsets = tensor.as_numpy().reshape(2, -1).tolist()
    words, start = [], 0
    for end in offsets:
        if end < 0:
            break
        words.append(ids[start:end])
        start = end
    return [w for w in words if w]


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config["parameters"].items()}
        # triton.cpu_threads (0: every core torch sees)
        torch.set_num_threads(int(params.get("threads", "0")) or torch.get_num_threads())
        # relative to the repository root, so the folder can move
        self.model = load_model(Path(args["model_repository"]).parent / params["engine_dir"])
        self.exclude_input = params.get("exclude_input_in_output", "true").lower() == "true"
        self.vocab_size = int(self.model.config.vocab_size)
        self.max_seq_len = int(params["max_seq_len"]) if params.get("max_seq_len") else None
        # without decoupling Triton accepts exactly one response per request: no token streaming
        self.decoupled = bool(config.get("model_transaction_policy", {}).get("decoupled", False))
        self.scheduler: Scheduler | None = None
        if self.decoupled and params.get("batching", "run_to_completion") == "inflight":
            self.scheduler = Scheduler(
                self.model,
                max_batch_size=int(config["max_batch_size"]),
                kv_cache_tokens=int(params["kv_cache_tokens"]),
                max_seq_len=self.max_seq_len,
            )
            self.scheduler.start()

    def finalize(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()

    def _request(self, request: Any) -> Request:
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy().reshape(-1)
        length = int(_scalar(request, "input_lengths", len(ids)))
        seed = _scalar(request, "seed", None)
        return Request(
            input_ids=ids[:length].tolist(),
            max_new_tokens=int(_scalar(request, "request_output_len", 16)),
            end_id=_scalar(request, "end_id", None),
            pad_id=_scalar(request, "pad_id", None),
            temperature=float(_scalar(request, "temperature", 1.0)),
            top_k=int(_scalar(request, "runtime_top_k", 0)),
            top_p=float(_scalar(request, "runtime_top_p", 0.0)),
            seed=None if seed is None else int(seed),
            stop_words=_word_list(request, "stop_words_list"),
            bad_words=_word_list(request, "bad_words_list"),
            return_log_probs=bool(_scalar(request, "return_log_probs", False)),
        )

    def _client(self, request: Any) -> _Client | None:
        """The request parsed, with its way back to the client; a malformed one is answered here."""
        sender = request.get_response_sender()
        try:
            parsed = self._request(request)
        except Exception as error:
            _send_error(sender, str(error))
            return None
        streaming = self.decoupled and bool(_scalar(request, "streaming", False))
        return _Client(sender, parsed, streaming, [] if self.exclude_input else parsed.input_ids)

    def execute(self, requests: list[Any]) -> None:
        accepted = [(client, request) for request in requests if (client := self._client(request)) is not None]
        clients = [client for client, _ in accepted]
        if self.scheduler is not None:
            for client, request in accepted:
                self.scheduler.submit(
                    client.parsed, client.token, client.finish, client.error, is_cancelled=request.is_cancelled
                )
            return None
        batch = []
        for client in clients:  # a bad request must not take its batch down
            problems = client.parsed.problems(self.vocab_size, self.max_seq_len)
            if problems:
                client.error("; ".join(problems))
            else:
                batch.append(client)
        started = time.monotonic()
        try:
            generate(
                self.model,
                [c.parsed for c in batch],
                on_token=lambda row, token: batch[row].token(token),
                on_finish=lambda row, result: batch[row].finish(result),
            )
        except Exception as error:  # answer every open request rather than leave clients hanging
            for client in batch:
                if not client.answered:
                    client.error(str(error))
        pb_utils.Logger.log_verbose(f"batch of {len(batch)} in {time.monotonic() - started:.2f} s")
        return None


def _send_error(sender: Any, message: str) -> None:
    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)


def _response(tokens: list[int], log_probs: list[float] | None = None) -> Any:
    tensors = [
        pb_utils.Tensor("output_ids", np.array([[tokens]], dtype=np.int32)),
        pb_utils.Tensor("sequence_length", np.array([[len(tokens)]], dtype=np.int32)),
    ]
    if log_probs is not None:
        tensors += [
            pb_utils.Tensor("cum_log_probs", np.array([[sum(log_probs)]], dtype=np.float32)),
            pb_utils.Tensor("output_log_probs", np.array([[log_probs]], dtype=np.float32)),
        ]
    return pb_utils.InferenceResponse(tensors)


class _Client:
    """One request's way back: one response per token when streaming, else one with all of them;
    either way closed as soon as the request ends."""

    def __init__(self, sender: Any, parsed: Request, streaming: bool, prompt: list[int]):
        self.sender, self.parsed, self.streaming, self.prompt = sender, parsed, streaming, prompt
        self.answered = False

    def token(self, token: int) -> None:
        if self.streaming:
            self.sender.send(_response([token]))

    def finish(self, result: Result) -> None:
        self.answered = True
        if self.streaming:
            self.sender.send(flags=FINAL)
            return
        log_probs = result.log_probs if self.parsed.return_log_probs else None
        self.sender.send(_response(self.prompt + result.output_ids, log_probs), flags=FINAL)

    def error(self, message: str) -> None:
        self.answered = True
        _send_error(self.sender, message)
