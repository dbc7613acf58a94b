"""Triton python model of the CPU target for ``backend=pytorch``: upstream's LLM-API model (one
``tensorrt_llm`` model, text in and text out, tokenization inside), with the reference runtime's
in-flight scheduler where upstream has ``tensorrt_llm.LLM``.

It reads the same ``model.yaml`` upstream's model reads: the checkpoint (``model``, relative to the
repository root), the LLM API's limits and KV cache settings, which size the scheduler as they size
the PyTorch backend, and ``triton_config``. Requests and responses follow upstream's model:
``sampling_param_*`` inputs (absent ones take the LLM API's defaults: 32 new tokens, greedy), the
generated text in ``text_output`` (cumulative when streaming, as the LLM API's ``output.text``),
``finish_reason`` (stop, length, cancelled), ``stop_reason`` (the stop string, else "None") and
``cumulative_logprob`` when asked for, and with ``sampling_param_return_perf_metrics`` the KV cache
counters and request timings. A ``stop`` request cancels the running request with its request id.
LoRA adapters come as the LLM API's LoRARequest names them (``lora_id``, ``lora_name``,
``lora_path``: PEFT's folder), applied per request in the in-flight batch. What the reference
runtime cannot do (images, best_of) is refused with an error naming the input. Stop strings are
matched on the text, across token boundaries, and left out of it. Beyond upstream's inputs it takes
the engine path's ``guided_decoding_guide_type``/``guided_decoding_guide`` (declared with
triton.guided_decoding, compiled by xgrammar as there), so the OpenAI gateway serves
JSON schemas on this layout too.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from failure_codes import triton_error
from guided import Grammars
from inputs import flag, scalar, tensor, text
from reference_runtime import lora
from reference_runtime.checkpoint import load_model
from reference_runtime.failures import CANCELLED
from reference_runtime.generate import Request, Result
from reference_runtime.kvcache import KVCache, budget_tokens
from reference_runtime.scheduler import Scheduler, SchedulerConfig
from stats import EngineStats

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
DEFAULT_MAX_TOKENS = 32  # the LLM API's SamplingParams default
POLICIES = {"GUARANTEED_NO_EVICT": "guaranteed_no_evict", "MAX_UTILIZATION": "max_utilization"}
UNSUPPORTED = {"image_url": "multimodal prompts"}
LORA_CACHE = 8  # adapters kept loaded by lora_id (least recently used dropped), as the LLM API's max_cpu_loras
# our finish reasons -> the LLM API's
FINISH_REASONS = {"end": "stop", "stop": "stop", "length": "length"}


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        model_dir = Path(args["model_repository"])
        settings = yaml.safe_load((model_dir / args["model_version"] / "model.yaml").read_text())
        triton = settings.get("triton_config", {})
        self.decoupled = bool(triton.get("decoupled", False))
        torch.set_num_threads(int(params.get("threads", "0")) or max(1, len(os.sched_getaffinity(0)) - 1))
        self.root = model_dir.parent  # the repository root: paths in model.yaml and requests are relative to it
        checkpoint = self.root / settings["model"]
        self.model = load_model(checkpoint)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.grammars = Grammars(checkpoint, int(self.model.config.vocab_size))  # loads on the first guide
        lora_config = settings.get("lora_config") or {}
        self.adapters = lora.AdapterCache(int(lora_config.get("max_cpu_loras") or LORA_CACHE))
        self.scheduler = Scheduler(self.model, _scheduler_config(self.model.config, settings, params))
        self.scheduler.start()
        self.live: dict[str, list[Any]] = {}  # Triton request id -> its scheduler sequence, for stop requests
        self.stats: EngineStats | None = None
        try:
            self.stats = EngineStats(self.scheduler, args["model_name"], args["model_version"])
        except Exception as error:  # metrics off (--allow-metrics=false): serving goes on without them
            pb_utils.Logger.log_warn(f"engine metrics are not published: {error}")

    def finalize(self) -> None:
        if self.stats is not None:
            self.stats.stop()
        self.scheduler.stop()

    def execute(self, requests: list[Any]) -> list[Any] | None:
        replies = []
        for request in requests:
            if flag(request, "stop"):
                self._stop(request)
            else:
                replies.append(self._start(request))
        if self.decoupled:
            return None
        # one response per request, returned from execute: wait until each has its final one
        for reply in replies:
            reply.done.wait()
        return [reply.response for reply in replies]

    def _start(self, request: Any) -> _Reply:
        reply = _Reply(request.get_response_sender() if self.decoupled else None, self.tokenizer)
        try:
            parsed, reply.options = self._parse(request)
        except ValueError as error:
            reply.fail(str(error))
            return reply
        key = request.request_id()
        sequence = self.scheduler.submit(
            parsed, reply.token, reply.finish, reply.fail, is_cancelled=lambda: reply.client_left(request)
        )
        if sequence is not None:
            reply.cancel = lambda: self.scheduler.cancel(sequence)
            if key:
                self.live[key] = [sequence]
                reply.on_close = lambda: self.live.pop(key, None)
        return reply

    def _parse(self, request: Any) -> tuple[Request, Options]:
        """The request as the reference runtime's Request, and what it asked to get back."""
        problems = [
            f"{name}: {feature} are not available on the CPU target (the reference runtime); use a GPU target"
            for name, feature in UNSUPPORTED.items()
            if tensor(request, name) is not None
        ]
        best_of = int(scalar(request, "sampling_param_best_of", 1))
        if best_of != 1:
            problems.append(f"sampling_param_best_of={best_of}: the CPU target returns one sequence (use 1)")
        texts = tensor(request, "text_input")
        if texts is None:
            problems.append("text_input is missing")
        elif texts.size != 1:
            problems.append(f"text_input holds {texts.size} prompts: send one request per prompt")
        streaming = flag(request, "streaming")
        if streaming and not self.decoupled:
            problems.append("streaming needs a decoupled model (triton.streaming=true)")
        if problems:
            raise ValueError("; ".join(problems))
        assert texts is not None
        prompt = texts.reshape(-1)[0]
        prompt = prompt.decode() if isinstance(prompt, bytes) else str(prompt)
        seed = scalar(request, "sampling_param_seed", None)
        stops = tensor(request, "sampling_param_stop")
        options = Options(
            streaming=streaming,
            finish_reason=flag(request, "return_finish_reason"),
            stop_reason=flag(request, "return_stop_reason"),
            cumulative_logprob=flag(request, "return_cumulative_logprob"),
            perf_metrics=flag(request, "sampling_param_return_perf_metrics"),
            stop=[s.decode() if isinstance(s, bytes) else str(s) for s in stops.reshape(-1)]
            if stops is not None
            else [],
        )
        parsed = Request(
            input_ids=list(self.tokenizer.encode(prompt)),
            max_new_tokens=int(scalar(request, "sampling_param_max_tokens", DEFAULT_MAX_TOKENS)),
            end_id=self.tokenizer.eos_token_id,
            temperature=float(scalar(request, "sampling_param_temperature", 1.0)),
            top_k=int(scalar(request, "sampling_param_top_k", 0)),
            top_p=float(scalar(request, "sampling_param_top_p", 0.0)),
            seed=None if seed is None else int(seed),
            presence_penalty=float(scalar(request, "sampling_param_presence_penalty", 0.0)),
            frequency_penalty=float(scalar(request, "sampling_param_frequency_penalty", 0.0)),
            return_log_probs=options.cumulative_logprob,
            guide=self._guide(request),
            adapter=self._adapter(request),
        )
        return parsed, options

    def _adapter(self, request: Any) -> lora.Adapter | None:
        """The request's LoRA adapter, as the LLM API's LoRARequest names it: ``lora_id`` (the cache
        key), ``lora_name`` and ``lora_path`` (PEFT's folder, relative to the repository root),
        loaded on first use and kept by id."""
        lora_id, path = scalar(request, "lora_id", None), text(request, "lora_path")
        if lora_id is None:
            if path is not None:
                raise ValueError("lora_path needs a lora_id to keep the adapter under")
            return None
        kept = self.adapters.get(int(lora_id))
        if kept is not None:
            return kept
        if path is None:
            raise ValueError(f"LoRA adapter {int(lora_id)} is not loaded: send its lora_path with the request")
        source = text(request, "lora_ckpt_source") or "hf"
        if source != "hf":
            raise ValueError(f"lora_ckpt_source={source}: the CPU target loads Hugging Face (PEFT) adapters")
        folder = (self.root / path).resolve()
        if not folder.is_relative_to(self.root.resolve()):  # a request reads nothing outside the repository
            raise ValueError(f"lora_path {path} is outside the model repository: give a path inside it")
        try:
            adapter = lora.load(folder, text(request, "lora_name") or str(int(lora_id)))
        except (lora.AdapterError, OSError) as error:
            raise ValueError(f"lora_path {path}: {error}") from error
        self.adapters.put(int(lora_id), adapter)
        return adapter

    def _guide(self, request: Any) -> Any:
        """The request's grammar matcher, or None; ValueError naming the input when it is wrong."""
        guide_type, guide = text(request, "guided_decoding_guide_type"), text(request, "guided_decoding_guide")
        if guide_type is None:
            if guide is not None:
                raise ValueError("guided_decoding_guide without guided_decoding_guide_type: say which kind of guide")
            return None
        return self.grammars.matcher(self.grammars.compile(guide_type, guide or ""))

    def _stop(self, request: Any) -> None:
        """``stop``: cancel the running request with this request's id; the stop request itself is
        answered as upstream answers it, with a CANCELLED error."""
        sender = request.get_response_sender()
        target = request.request_id()
        if not target:
            _send(sender, _error("A request id must be provided for request cancellation", "INVALID_ARG"))
            return
        for sequence in self.live.get(target, []):
            self.scheduler.cancel(sequence)
        _send(sender, _error("Request cancelled by client", "CANCELLED"))


def _scheduler_config(hf: Any, settings: dict[str, Any], params: dict[str, str]) -> SchedulerConfig:
    """The in-flight scheduler sized by the LLM API's arguments in model.yaml (as they size the
    PyTorch backend), with the CPU-only knobs from the model's parameters."""
    kv = settings.get("kv_cache_config") or {}
    triton = settings.get("triton_config") or {}
    batch = int(settings["max_batch_size"])
    seq_len = int(settings.get("max_seq_len") or hf.max_position_embeddings)
    per_token = KVCache.bytes_per_token(hf.num_hidden_layers, hf.num_key_value_heads, hf.head_dim)
    tokens = budget_tokens(
        per_token, float(kv.get("free_gpu_memory_fraction", 0.9)), kv.get("max_tokens"), ceiling=batch * seq_len
    )
    policy = (settings.get("scheduler_config") or {}).get("capacity_scheduler_policy", "GUARANTEED_NO_EVICT")
    scheduler = SchedulerConfig(
        max_batch_size=batch,
        max_num_tokens=int(params.get("max_num_tokens_per_step") or settings["max_num_tokens"]),
        kv_cache_tokens=tokens,
        tokens_per_block=int(kv.get("tokens_per_block", 32)),
        max_seq_len=seq_len,
        max_input_len=settings.get("max_input_len"),
        batch_scheduler_policy=POLICIES[policy],
        enable_chunked_context=bool(settings.get("enable_chunked_prefill", False)),
        context_chunk_tokens=int(params.get("context_chunk_tokens") or 0) or None,
        enable_kv_cache_reuse=bool(kv.get("enable_block_reuse", True)),
        cancellation_check_period_ms=int(triton.get("cancellation_check_period_ms", 100)),
        max_queue_size=int(params.get("max_queue_size", "0")),
        queue_timeout_ms=int(params.get("queue_timeout_ms", "0")),
    )
    pb_utils.Logger.log_info(
        f"LLM API on the reference runtime: KV cache of {tokens} tokens ({tokens * per_token / 2**20:.0f} MiB), "
        f"{scheduler.max_num_tokens} tokens per step, {scheduler.batch_scheduler_policy}"
    )
    return scheduler


@dataclass
class Options:
    """What a request asked to get back, beside its text."""

    streaming: bool = False
    finish_reason: bool = False
    stop_reason: bool = False
    cumulative_logprob: bool = False
    perf_metrics: bool = False
    stop: list[str] = field(default_factory=list)  # stop strings, matched on the text


def _error(message: str, code: str | None = None) -> Any:
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(message, getattr(pb_utils.TritonError, code, None) if code else None)
    )


def _send(sender: Any, response: Any) -> None:
    sender.send(response, flags=FINAL)


class _Reply:
    """One request's way back: its text so far, and its responses (one per token when streaming).
    The scheduler's thread and execute's both answer it; nothing is sent, and the client is not
    asked, once its final response is out."""

    def __init__(self, sender: Any, tokenizer: Any):
        self.sender, self.tokenizer = sender, tokenizer
        self.options = Options()
        self.text = ""
        self.stop_reason: str | None = None
        self.closed = False
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.response: Any = None  # the final response, for a model that is not decoupled
        self.cancel: Any = None  # cancels its scheduler sequence
        self.on_close: Any = None

    def client_left(self, request: Any) -> bool:
        with self.lock:
            return self.closed or bool(request.is_cancelled())

    def token(self, token: int, result: Result) -> None:
        text = self.tokenizer.decode(result.output_ids, skip_special_tokens=True)
        for stop in self.options.stop:
            if stop and stop in text:  # the text ends before the stop string, which is left out
                self.text, self.stop_reason = text[: text.index(stop)], stop
                if self.cancel is not None:
                    self.cancel()  # the sequence leaves the batch at the next step
                self._close(self._response(result, "stop"))
                return
        if text.endswith("\ufffd"):  # half a character: wait for the token that completes it
            return
        self.text = text
        if self.options.streaming:
            self._send(self._response(result, None), final=False)

    def finish(self, result: Result) -> None:
        self.text = self.tokenizer.decode(result.output_ids, skip_special_tokens=True)
        self._close(self._response(result, FINISH_REASONS.get(result.finish_reason, result.finish_reason)))

    def fail(self, message: str) -> None:
        if message.startswith(CANCELLED):  # the LLM API ends a cancelled request, not with an error
            self._close(self._response(Result([], "cancelled"), "cancelled"))
        else:
            self._close(pb_utils.InferenceResponse(error=triton_error(message)))

    def _response(self, result: Result, finish_reason: str | None) -> Any:
        options = self.options
        tensors = [pb_utils.Tensor("text_output", np.array([self.text.encode()], dtype=np.object_))]
        if options.finish_reason:
            tensors.append(pb_utils.Tensor("finish_reason", np.array([str(finish_reason).encode()], dtype=np.object_)))
        if options.stop_reason:
            tensors.append(pb_utils.Tensor("stop_reason", np.array([str(self.stop_reason).encode()], dtype=np.object_)))
        if options.cumulative_logprob:
            tensors.append(pb_utils.Tensor("cumulative_logprob", np.array([sum(result.log_probs)], dtype=np.float32)))
        if options.perf_metrics and finish_reason is not None and result.metrics:
            tensors += _perf_metrics(result.metrics)
        return pb_utils.InferenceResponse(tensors)

    def _send(self, response: Any, final: bool) -> None:
        with self.lock:
            if self.closed or self.sender is None:
                return
            self.sender.send(response, flags=FINAL if final else 0)
            if final:
                self.closed = True

    def _close(self, response: Any) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            if self.sender is not None:
                self.sender.send(response, flags=FINAL)
            self.response = response
        if self.on_close is not None:
            self.on_close()
        self.done.set()


def _perf_metrics(metrics: dict[str, int]) -> list[Any]:
    """The LLM-API model's perf outputs from the scheduler's per-request metrics."""
    reused, new = metrics.get("kv_cache_reused_blocks", 0), metrics.get("kv_cache_alloc_new_blocks", 0)
    counts = {
        "kv_cache_reused_block": reused,
        "kv_cache_missed_block": new,  # blocks the cache did not hold, so they were computed anew
        "kv_cache_alloc_new_blocks": new,
        "kv_cache_alloc_total_blocks": metrics.get("kv_cache_alloc_total_blocks", reused + new),
        "total_accepted_draft_tokens": 0,  # no speculative decoding here
        "total_draft_tokens": 0,
    }
    tensors = [pb_utils.Tensor(name, np.array([value], dtype=np.int32)) for name, value in counts.items()]
    hit_rate = reused / (reused + new) if reused + new else 0.0
    tensors.append(pb_utils.Tensor("kv_cache_hit_rate", np.array([hit_rate], dtype=np.float32)))
    tensors.append(pb_utils.Tensor("acceptance_rate", np.array([0.0], dtype=np.float32)))
    for name in ("arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns"):
        tensors.append(pb_utils.Tensor(name, np.array([metrics.get(name, 0)], dtype=np.int64)))
    return tensors
