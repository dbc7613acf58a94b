"""Triton python model of the CPU target: the reference runtime in place of a TensorRT-LLM engine.

Same inputs and outputs as the TensorRT-LLM backend (a subset). With ``batching=inflight`` (the
default, ``triton.cpu_batching``) ``execute`` hands each request to the in-flight scheduler
(``reference_runtime/scheduler.py``): paged KV cache, chunked context, block reuse and the batch
scheduler policies, sized by the same parameters as the GPU backend. With ``run_to_completion``
the requests Triton's dynamic batcher delivers together run as one batch until the last of them
ends (kept to measure what in-flight batching gains). Each request is checked before it
joins (ids inside the vocabulary, sampling values in range, length within the engine's
``max_seq_len``): a bad one gets its own error and the others run. The model is decoupled: a
streaming request gets one response per token, any other request one response with all of its
tokens, and each request is closed as soon as it finishes, not when the whole batch does.
"""

from __future__ import annotations

import json
import os
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
from reference_runtime.kvcache import KVCache, budget_tokens
from reference_runtime.scheduler import CANCELLED, Scheduler, SchedulerConfig

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
        # triton.cpu_threads (0: every core but one, left to Triton's other processes and clients)
        torch.set_num_threads(int(params.get("threads", "0")) or max(1, len(os.sched_getaffinity(0)) - 1))
        # relative to the repository root, so the folder can move
        self.model = load_model(Path(args["model_repository"]).parent / params["engine_dir"])
        self.exclude_input = params.get("exclude_input_in_output", "true").lower() == "true"
        self.vocab_size = int(self.model.config.vocab_size)
        self.max_seq_len = int(params["max_seq_len"]) if params.get("max_seq_len") else None
        self.max_input_len = int(params["max_input_len"]) if params.get("max_input_len") else None
        # without decoupling Triton accepts exactly one response per request: no token streaming
        self.decoupled = bool(config.get("model_transaction_policy", {}).get("decoupled", False))
        self.scheduler: Scheduler | None = None
        if self.decoupled and params.get("batching", "inflight") == "inflight":
            self.scheduler = Scheduler(self.model, self._scheduler_config(config, params))
            self.scheduler.start()

    def _scheduler_config(self, config: dict[str, Any], params: dict[str, str]) -> SchedulerConfig:
        """The in-flight scheduler's knobs, from the parameters the GPU backend reads too (the
        triton_repo stage always writes them)."""
        hf = self.model.config
        batch, seq_len = int(config["max_batch_size"]), self.max_seq_len or int(hf.max_position_embeddings)
        per_token = KVCache.bytes_per_token(hf.num_hidden_layers, hf.num_key_value_heads, hf.head_dim)
        tokens = budget_tokens(
            per_token,
            float(params["kv_cache_free_gpu_mem_fraction"]),
            int(params.get("max_tokens_in_paged_kv_cache") or 0) or None,
            ceiling=batch * seq_len,
        )
        scheduler = SchedulerConfig(
            max_batch_size=batch,
            max_num_tokens=int(params["max_num_tokens"]),
            kv_cache_tokens=tokens,
            tokens_per_block=int(params["tokens_per_block"]),
            max_seq_len=self.max_seq_len,
            max_input_len=self.max_input_len,
            batch_scheduler_policy=params["batch_scheduler_policy"],
            enable_chunked_context=params["enable_chunked_context"] == "true",
            enable_kv_cache_reuse=params["enable_kv_cache_reuse"] == "true",
            cancellation_check_period_ms=int(params["cancellation_check_period_ms"]),
        )
        pb_utils.Logger.log_info(
            f"in-flight batching: KV cache of {tokens} tokens ({tokens * per_token / 2**20:.0f} MiB), "
            f"{scheduler.max_num_tokens} tokens per step, {scheduler.batch_scheduler_policy}, "
            f"chunked context {scheduler.enable_chunked_context}, block reuse {scheduler.enable_kv_cache_reuse}"
        )
        return scheduler

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
            repetition_penalty=float(_scalar(request, "repetition_penalty", 1.0)),
            presence_penalty=float(_scalar(request, "presence_penalty", 0.0)),
            frequency_penalty=float(_scalar(request, "frequency_penalty", 0.0)),
            min_tokens=int(_scalar(request, "min_tokens", 0)),
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
        client = _Client(sender, parsed, streaming, [] if self.exclude_input else parsed.input_ids)
        client.perf_metrics = bool(_scalar(request, "return_perf_metrics", False))
        return client

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
            problems = client.parsed.problems(self.vocab_size, self.max_seq_len, self.max_input_len)
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


def _response(tokens: list[int], log_probs: list[float] | None = None, metrics: dict[str, int] | None = None) -> Any:
    tensors = [
        pb_utils.Tensor("output_ids", np.array([[tokens]], dtype=np.int32)),
        pb_utils.Tensor("sequence_length", np.array([[len(tokens)]], dtype=np.int32)),
    ]
    if log_probs is not None:
        tensors += [
            pb_utils.Tensor("cum_log_probs", np.array([[sum(log_probs)]], dtype=np.float32)),
            pb_utils.Tensor("output_log_probs", np.array([[log_probs]], dtype=np.float32)),
        ]
    for name, value in (metrics or {}).items():  # the backend's perf metrics outputs
        dtype = np.int64 if name.endswith("_ns") else np.int32
        tensors.append(pb_utils.Tensor(name, np.array([value], dtype=dtype)))
    return pb_utils.InferenceResponse(tensors)


class _Client:
    """One request's way back: one response per token when streaming, else one with all of them;
    either way closed as soon as the request ends."""

    def __init__(self, sender: Any, parsed: Request, streaming: bool, prompt: list[int]):
        self.sender, self.parsed, self.streaming, self.prompt = sender, parsed, streaming, prompt
        self.answered = False
        self.perf_metrics = False  # return_perf_metrics: the final response carries them

    def token(self, token: int) -> None:
        if self.streaming:
            self.sender.send(_response([token]))

    def finish(self, result: Result) -> None:
        self.answered = True
        metrics = result.metrics if self.perf_metrics else None
        if self.streaming:  # every token is out: the last response carries only the metrics asked for
            self.sender.send(_response([], metrics=metrics) if metrics else None, flags=FINAL)
            return
        log_probs = result.log_probs if self.parsed.return_log_probs else None
        self.sender.send(_response(self.prompt + result.output_ids, log_probs, metrics), flags=FINAL)

    def error(self, message: str) -> None:
        self.answered = True
        if message.startswith(CANCELLED):
            pb_utils.Logger.log_info(message)
            cancelled = getattr(pb_utils.TritonError, "CANCELLED", None)
            self.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message, cancelled)), flags=FINAL)
            return
        _send_error(self.sender, message)
