"""Triton python model of the CPU target: the reference runtime in place of a TensorRT-LLM engine.

Same inputs and outputs as the TensorRT-LLM backend (``inputs.py`` says what it does with each;
what it cannot do is answered with an error naming the input). With ``batching=inflight`` (the
default, ``triton.cpu_batching``) ``execute`` hands each request to the in-flight scheduler
(``reference_runtime/scheduler.py``): paged KV cache, chunked context, block reuse and the batch
scheduler policies, sized by the same parameters as the GPU backend. With ``run_to_completion``
the requests Triton's dynamic batcher delivers together run as one batch until the last of them
ends (kept to measure what in-flight batching gains). Each request is checked before it
joins (ids inside the vocabulary, sampling values in range, length within the engine's
``max_seq_len``): a bad one gets its own error and the others run. The model is decoupled: a
streaming request gets one response per token, any other request one response with all of its
tokens, and each request is closed as soon as it finishes, not when the whole batch does. With
``num_return_sequences`` n > 1 each of the n sequences answers on its own, its responses carrying
``sequence_index``, and the request closes with the last. A ``stop`` request cancels the running
request that has its request id, as on the GPU backend.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

sys.path.insert(0, str(Path(__file__).parent))
from failure_codes import triton_error
from guided import Grammars
from inputs import Row, batch_size, embedding_bias, flag, refusals, scalar, tensor, text, word_list
from reference_runtime import lora
from reference_runtime.beam import beam_search
from reference_runtime.checkpoint import load_model
from reference_runtime.failures import CANCELLED, FORWARD_FAILED, LORA_NOT_CACHED, SAMPLING_FAILED
from reference_runtime.generate import SEED_RANGE, Request, Result, generate
from reference_runtime.kvcache import KVCache, budget_tokens
from reference_runtime.scheduler import Scheduler, SchedulerConfig
from stats import EngineStats

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
MAX_RETURN_SEQUENCES = 16
# no speculative decoding here: the draft-token perf metrics are always zero
NO_DRAFT_METRICS = {"acceptance_rate": 0.0, "total_accepted_draft_tokens": 0, "total_draft_tokens": 0}


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
        self.max_beam_width = int(params["max_beam_width"])
        # beam search requests, one at a time beside the batch
        self.beams = BeamWorker(self.model, self.max_seq_len, self.max_input_len)
        # LoRA adapters by task id, as upstream's backend keeps them: sent once with their
        # lora_weights and lora_config, then asked for by lora_task_id alone (least recently used
        # dropped past lora_cache_adapters)
        self.adapters = lora.AdapterCache(int(params.get("lora_cache_adapters") or 8))
        if params.get("lora_prefetch_dir"):  # the repository's adapters, loaded before any request
            self._prefetch(Path(args["model_repository"]).parent / params["lora_prefetch_dir"])
        # without decoupling Triton accepts exactly one response per request: no token streaming
        self.decoupled = bool(config.get("model_transaction_policy", {}).get("decoupled", False))
        # guided decoding through xgrammar with the repository's tokenizer (as the GPU backend's
        # guided_decoding_backend=xgrammar and tokenizer_dir)
        self.grammars: Grammars | None = None
        if params.get("guided_decoding_backend") == "xgrammar":
            tokenizer_dir = Path(args["model_repository"]).parent / params["tokenizer_dir"]
            self.grammars = Grammars(tokenizer_dir, self.vocab_size)
        # guides compile one at a time off the execute thread (each compile may use 2 of xgrammar's threads)
        self.compiler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")
        self.scheduler: Scheduler | None = None
        self.live: dict[str, list[Any]] = {}  # request id -> its sequences, for stop requests
        self.stats: EngineStats | None = None
        if self.decoupled and params.get("batching", "inflight") == "inflight":
            self.scheduler = Scheduler(self.model, self._scheduler_config(config, params))
            self.scheduler.start()
            try:
                self.stats = EngineStats(self.scheduler, args["model_name"], args["model_version"])
            except Exception as error:  # metrics off (--allow-metrics=false): serving goes on without them
                pb_utils.Logger.log_warn(f"engine metrics are not published: {error}")

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
            context_chunk_tokens=int(params.get("context_chunk_tokens") or 0) or None,
            enable_kv_cache_reuse=params["enable_kv_cache_reuse"] == "true",
            cancellation_check_period_ms=int(params["cancellation_check_period_ms"]),
            max_logits_bytes=int(params.get("max_logits_mb") or 0) * 2**20,
            **_queue_policy(config),
        )
        pb_utils.Logger.log_info(
            f"in-flight batching: KV cache of {tokens} tokens ({tokens * per_token / 2**20:.0f} MiB), "
            f"{scheduler.max_num_tokens} prompt tokens per step (longer prompts "
            f"{scheduler.context_chunk_tokens or scheduler.max_num_tokens} per step), "
            f"{scheduler.batch_scheduler_policy}, "
            f"chunked context {scheduler.enable_chunked_context}, block reuse {scheduler.enable_kv_cache_reuse}"
        )
        return scheduler

    def finalize(self) -> None:
        if self.stats is not None:
            self.stats.stop()
        self.compiler.shutdown(wait=False, cancel_futures=True)
        if self.scheduler is not None:
            self.scheduler.stop()
        self.beams.stop()

    def _request(self, request: Any) -> Request:
        ids = tensor(request, "input_ids")
        assert ids is not None  # refusals() checked it
        ids = ids.reshape(-1)
        length = int(scalar(request, "input_lengths", len(ids)))
        if not 1 <= length <= len(ids):  # a negative length would silently cut the prompt
            raise ValueError(f"input_lengths={length} must lie in 1..{len(ids)} (the ids sent)")
        seed = scalar(request, "seed", None)
        return Request(
            input_ids=ids[:length].tolist(),
            max_new_tokens=int(scalar(request, "request_output_len", 16)),
            end_id=scalar(request, "end_id", None),
            pad_id=scalar(request, "pad_id", None),
            temperature=float(scalar(request, "temperature", 1.0)),
            top_k=int(scalar(request, "runtime_top_k", 0)),
            top_p=float(scalar(request, "runtime_top_p", 0.0)),
            seed=None if seed is None else int(seed),
            stop_words=word_list(request, "stop_words_list"),
            bad_words=word_list(request, "bad_words_list"),
            return_log_probs=flag(request, "return_log_probs"),
            repetition_penalty=float(scalar(request, "repetition_penalty", 1.0)),
            presence_penalty=float(scalar(request, "presence_penalty", 0.0)),
            frequency_penalty=float(scalar(request, "frequency_penalty", 0.0)),
            min_tokens=int(scalar(request, "min_tokens", 0)),
            embedding_bias=embedding_bias(request, self.vocab_size),
            return_generation_logits=flag(request, "return_generation_logits"),
            return_context_logits=flag(request, "return_context_logits"),
            adapter=self._adapter(request),
        )

    def _prefetch(self, folder: Path) -> None:
        """Adapters from the backend's ``lora_prefetch_dir``: a folder per task id (its name) with
        ``model.lora_weights.npy`` and ``model.lora_config.npy``, the tensors a request would send."""
        for task in sorted((p for p in folder.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
            weights, config = np.load(task / "model.lora_weights.npy"), np.load(task / "model.lora_config.npy")
            adapter = lora.from_backend_tensors(task.name, torch.from_numpy(weights), torch.from_numpy(config),
                                                self.model)  # fmt: skip
            self.adapters.put(int(task.name), adapter)

    def _adapter(self, request: Any) -> lora.Adapter | None:
        """The request's LoRA adapter: the one its lora_weights and lora_config carry (kept under
        its lora_task_id for the requests after it), or the one kept under its lora_task_id."""
        task = scalar(request, "lora_task_id", None)
        weights, config = tensor(request, "lora_weights"), tensor(request, "lora_config")
        if task is None:
            if weights is not None or config is not None:
                raise ValueError("lora_weights and lora_config need a lora_task_id to keep them under")
            return None
        task = int(task)
        if weights is not None and config is not None:
            adapter = lora.from_backend_tensors(
                str(task), torch.from_numpy(np.ascontiguousarray(weights)), torch.from_numpy(config), self.model
            )
            self.adapters.put(task, adapter)
            return adapter
        if weights is not None or config is not None:
            raise ValueError("send lora_weights and lora_config together (or neither, to use a kept adapter)")
        adapter = self.adapters.get(task)
        if adapter is None:
            raise ValueError(f"LoRA task {task} {LORA_NOT_CACHED}")
        return adapter

    def _reply(self, request: Any) -> _Reply | None:
        """The request parsed, with its way back to the client; one that cannot be served is
        answered here."""
        sender = request.get_response_sender()
        try:
            problems = refusals(request, self.max_beam_width)
            beam_width = int(scalar(request, "beam_width", 1))
            # beam search returns num_return_sequences of its beams, all of them by default
            count = int(scalar(request, "num_return_sequences", beam_width))
            batch = batch_size(request)
            if batch > 1 and (beam_width > 1 or not self.decoupled):
                problems.append(
                    f"a request of {batch} prompts needs a decoupled engine model (triton.streaming=true) and "
                    "beam_width=1 here: each prompt answers with its own responses (batch_index)"
                )
            if not 1 <= count <= MAX_RETURN_SEQUENCES:
                problems.append(f"num_return_sequences={count} must lie in 1..{MAX_RETURN_SEQUENCES}")
            elif count > 1 and beam_width == 1 and not self.decoupled:
                problems.append(
                    f"num_return_sequences={count} needs a decoupled engine model (triton.streaming=true): "
                    "each sequence is its own response"
                )
            if problems:
                raise ValueError("; ".join(problems))
            prompts = [self._request(Row(request, row, batch)) for row in range(batch)]
            parsed = prompts[0]
            if any(p.adapter is not None for p in prompts) and (self.scheduler is None or beam_width > 1):
                raise ValueError(
                    "LoRA adapters are applied by in-flight batching with beam_width=1 "
                    "(triton.streaming=true, triton.cpu_batching=inflight)"
                )
            if parsed.return_context_logits and self.scheduler is None:
                raise ValueError("return_context_logits needs in-flight batching (triton.cpu_batching=inflight)")
        except Exception as error:
            _send_error(sender, str(error))
            return None
        options = Options(
            streaming=self.decoupled and flag(request, "streaming"),
            exclude_input=flag(request, "exclude_input_in_output", self.exclude_input),
            perf_metrics=flag(request, "return_perf_metrics"),
            num_input_tokens=flag(request, "return_num_input_tokens"),
            num_output_tokens=flag(request, "return_num_output_tokens"),
            indexed=count > 1 and beam_width == 1,
            batched=batch > 1,
            beam_width=beam_width,
            length_penalty=float(scalar(request, "len_penalty", 1.0)),
            early_stopping=int(scalar(request, "early_stopping", 1)),
            beams_returned=min(count, beam_width),
        )
        if beam_width > 1:  # one search answers with its beams
            return _Reply(sender, options, [parsed], [(0, 0)])
        # n samples of each prompt: sequence i draws from seed + i (wrapped into the seed's range),
        # so the n differ and repeat
        copies, positions = [], []
        for row, prompt in enumerate(prompts):
            for i in range(count):
                seed = None if prompt.seed is None else (prompt.seed + i) % SEED_RANGE
                copies.append(replace(prompt, seed=seed) if i else prompt)
                positions.append((row, i))
        try:
            guide = self._guide(request)
        except ValueError as error:
            _send_error(sender, str(error))
            return None
        reply = _Reply(sender, options, copies, positions)
        reply.guide = guide
        return reply

    def _guide(self, request: Any) -> tuple[str, str] | None:
        """The request's guide (its type and text), or None when it asks for no guided decoding."""
        guide_type, guide = text(request, "guided_decoding_guide_type"), text(request, "guided_decoding_guide")
        if guide_type is None:
            if guide is not None:
                raise ValueError("guided_decoding_guide without guided_decoding_guide_type: say which kind of guide")
            return None
        if self.grammars is None:
            raise ValueError("guided decoding is off in this repository (triton.guided_decoding=false)")
        return guide_type, guide or ""

    def _guided(self, reply: _Reply) -> bool:
        """Compile the reply's guide and give each of its sequences a matcher; False (the request
        answered with the error) when the guide does not compile."""
        if reply.guide is None:
            return True
        assert self.grammars is not None
        try:
            compiled = self.grammars.compile(*reply.guide)
        except ValueError as error:
            reply.fail(str(error))
            return False
        for client in reply.clients:
            client.parsed = replace(client.parsed, guide=self.grammars.matcher(compiled))
        return True

    def _compile_then_submit(self, reply: _Reply, request: Any) -> None:
        """On the compile thread: a large schema takes seconds to compile, and requests without
        one are admitted meanwhile."""
        try:
            if self._guided(reply):
                self._submit(reply, request)
        except Exception as error:
            reply.fail(f"{SAMPLING_FAILED}: {type(error).__name__}: {error}")

    def _stop(self, request: Any) -> None:
        """``stop``: cancel the running request with this request's id (the backend's semantics)."""
        sender = request.get_response_sender()
        target = request.request_id()
        live = self.live.get(target) if target else None
        if live is None:
            _send_error(sender, f"stop: no running request has the id {target!r} (send the id of the request to stop)")
            return
        for sequence in live:
            if self.scheduler is not None:
                self.scheduler.cancel(sequence)
        sender.send(None, flags=FINAL)

    def execute(self, requests: list[Any]) -> None:
        accepted = []
        for request in requests:
            try:
                if flag(request, "stop"):
                    self._stop(request)
                elif (reply := self._reply(request)) is not None:
                    accepted.append((reply, request))
            except Exception as error:  # whatever went wrong, it went wrong for this request alone
                _send_error(request.get_response_sender(), f"{SAMPLING_FAILED}: {type(error).__name__}: {error}")
        beams = [reply for reply, _ in accepted if reply.options.beam_width > 1]
        for reply in beams:
            self.beams.submit(reply)
        accepted = [(reply, request) for reply, request in accepted if reply.options.beam_width == 1]
        if self.scheduler is not None:
            for reply, request in accepted:
                if reply.guide is not None:
                    self.compiler.submit(self._compile_then_submit, reply, request)
                    continue
                try:
                    self._submit(reply, request)
                except Exception as error:  # the others of this batch are already running: fail this one
                    reply.fail(f"{SAMPLING_FAILED}: {type(error).__name__}: {error}")
            return None
        batch = [client for reply, _ in accepted if self._guided(reply) for client in reply.clients]
        ready = []
        for client in batch:  # a bad request must not take its batch down
            problems = client.parsed.problems(self.vocab_size, self.max_seq_len, self.max_input_len)
            if problems:
                client.error("; ".join(problems))
            else:
                ready.append(client)
        started = time.monotonic()
        try:
            generate(
                self.model,
                [c.parsed for c in ready],
                on_token=lambda row, token, result: ready[row].token(token, result),
                on_finish=lambda row, result: ready[row].finish(result),
            )
        except Exception as error:  # answer every open request rather than leave clients hanging
            for client in ready:
                if not client.answered:
                    client.error(str(error))
        pb_utils.Logger.log_verbose(f"batch of {len(ready)} in {time.monotonic() - started:.2f} s")
        return None

    def _submit(self, reply: _Reply, request: Any) -> None:
        assert self.scheduler is not None
        reply.quiet_cancel = _quiet_cancel(request)
        key = request.request_id()
        sequences = []
        for client in reply.clients:
            sequence = self.scheduler.submit(
                client.parsed,
                client.token,
                client.finish,
                client.error,
                is_cancelled=lambda request=request: reply.client_left(request),
            )
            if sequence is not None:
                sequences.append(sequence)
        reply.siblings = sequences
        reply.scheduler = self.scheduler
        if key and sequences:
            self.live[key] = sequences
            reply.on_close = lambda: self.live.pop(key, None)


def _quiet_cancel(request: Any) -> bool:
    """Whether the BLS model asked for cancellations to end with an empty final response."""
    try:
        return bool(json.loads(request.parameters() or "{}").get("pipeline_quiet_cancel"))
    except (ValueError, AttributeError):
        return False


def _queue_policy(config: dict[str, Any]) -> dict[str, int]:
    """The bound and the timeout of ``dynamic_batching.default_queue_policy`` in config.pbtxt: on
    the CPU target requests wait in the scheduler rather than in Triton's queue, so the scheduler
    applies them."""
    policy = (config.get("dynamic_batching") or {}).get("default_queue_policy") or {}
    return {
        "max_queue_size": int(policy.get("max_queue_size") or 0),
        "queue_timeout_ms": int(policy.get("default_timeout_microseconds") or 0) // 1000,
    }


def _send_error(sender: Any, message: str) -> None:
    """Close the request with an error, coded by what it is (``failure_codes.py``)."""
    sender.send(pb_utils.InferenceResponse(error=triton_error(message)), flags=FINAL)


@dataclass
class Options:
    """What a request asked to get back, beside its tokens."""

    streaming: bool
    exclude_input: bool
    perf_metrics: bool
    num_input_tokens: bool
    num_output_tokens: bool
    indexed: bool  # num_return_sequences > 1: every response names its sequence
    batched: bool = False  # several prompts in one request: every response names its prompt (batch_index)
    beam_width: int = 1
    length_penalty: float = 1.0
    early_stopping: int = 1
    beams_returned: int = 1


def _int32(value: int) -> np.ndarray:
    return np.array([[value]], dtype=np.int32)


class _Reply:
    """One Triton request's way back, shared by its ``num_return_sequences`` sequences: each
    sequence answers with its own responses (one per token when streaming), and the request closes
    when the last of them ends, or at the first error."""

    def __init__(self, sender: Any, options: Options, requests: list[Request], positions: list[tuple[int, int]]):
        """``positions``: each sequence's prompt (batch index) and sample (sequence index)."""
        self.sender, self.options = sender, options
        self.clients = [
            _Client(self, request, index, row) for request, (row, index) in zip(requests, positions, strict=True)
        ]
        self.open = len(requests)
        self.closed = False
        self.siblings: list[Any] = []  # the scheduler's sequences, cancelled when one fails
        self.scheduler: Scheduler | None = None
        self.on_close: Any = None
        self.guide: tuple[str, str] | None = None  # guided decoding asked for: compiled before it runs
        self.quiet_cancel = False  # end a cancelled request with an empty final response (BLS requests)
        # sequences of one request answer from the scheduler's thread and, when refused, from
        # execute's: nothing is sent, and the client is not asked, once the final response is out
        # (Triton 2.51 frees the request's response factory then, and a late call crashes it)
        self.lock = threading.Lock()

    def send(self, response: Any, last: bool) -> None:
        with self.lock:
            if self.closed:
                return
            if last:
                self.open -= 1
            if self.open == 0:
                self.sender.send(response, flags=FINAL)
                self._close()
            elif response is not None:  # nothing to say before the end: the closing response says it
                self.sender.send(response)

    def client_left(self, request: Any) -> bool:
        """The scheduler's cancellation check: a closed request is not asked again."""
        with self.lock:
            return self.closed or bool(request.is_cancelled())

    def fail(self, message: str) -> None:
        with self.lock:
            if self.closed:
                return
            if self.quiet_cancel and message.startswith(CANCELLED):
                # the BLS model stopped it: an error response would never reach its iterator (Triton 2.51)
                pb_utils.Logger.log_info(message)
                self.sender.send(flags=FINAL)
            else:
                _send_error(self.sender, message)
            self._close()
        if self.scheduler is not None:  # the request is over: its other sequences stop too
            for sequence in self.siblings:
                self.scheduler.cancel(sequence)

    def _close(self) -> None:
        self.closed = True
        if self.on_close is not None:
            self.on_close()


class _Client:
    """One sequence of a request: hands its tokens and its end to the request's reply."""

    def __init__(self, reply: _Reply, parsed: Request, index: int, row: int = 0):
        self.reply, self.parsed, self.index, self.row = reply, parsed, index, row
        self.answered = False
        self.cum_log_prob = 0.0

    def _tensors(self, tokens: list[int], log_probs: list[float], logits: list[torch.Tensor]) -> list[Any]:
        tensors = [pb_utils.Tensor("output_ids", np.array([[tokens]], dtype=np.int32))]
        tensors.append(pb_utils.Tensor("sequence_length", _int32(len(tokens))))
        if self.parsed.return_log_probs:
            tensors.append(pb_utils.Tensor("cum_log_probs", np.array([[self.cum_log_prob]], dtype=np.float32)))
            tensors.append(pb_utils.Tensor("output_log_probs", np.array([[log_probs]], dtype=np.float32)))
        if self.parsed.return_generation_logits and logits:  # [batch, beam, tokens, vocab]
            tensors.append(pb_utils.Tensor("generation_logits", torch.stack(logits)[None, None].numpy()))
        if self.reply.options.indexed:
            tensors.append(pb_utils.Tensor("sequence_index", _int32(self.index)))
        if self.reply.options.batched:
            tensors.append(pb_utils.Tensor("batch_index", _int32(self.row)))
        return tensors

    def token(self, token: int, result: Result) -> None:
        """A new token; ``result`` already holds its log prob and logits."""
        if not self.reply.options.streaming:
            return
        log_probs = result.log_probs[-1:] if self.parsed.return_log_probs else []
        self.cum_log_prob += sum(log_probs)
        logits = result.generation_logits[-1:] if self.parsed.return_generation_logits else []
        self.reply.send(pb_utils.InferenceResponse(self._tensors([token], log_probs, logits)), last=False)

    def finish(self, result: Result) -> None:
        self.answered = True
        options = self.reply.options
        tensors: list[Any] = []
        if not options.streaming:
            self.cum_log_prob = sum(result.log_probs)
            prompt = [] if options.exclude_input else self.parsed.input_ids
            tensors = self._tensors(prompt + result.output_ids, result.log_probs, result.generation_logits)
        if self.parsed.return_context_logits and result.context_logits:  # [batch, positions, vocab]
            tensors.append(pb_utils.Tensor("context_logits", torch.cat(result.context_logits)[None].numpy()))
        if options.num_input_tokens:
            tensors.append(pb_utils.Tensor("num_input_tokens", _int32(len(self.parsed.input_ids))))
        if options.num_output_tokens:
            tensors.append(pb_utils.Tensor("num_output_tokens", _int32(len(result.output_ids))))
        if options.perf_metrics:
            for name, value in {**result.metrics, **NO_DRAFT_METRICS}.items():
                dtype = np.int64 if name.endswith("_ns") else np.float32 if name == "acceptance_rate" else np.int32
                tensors.append(pb_utils.Tensor(name, np.array([[value]], dtype=dtype)))
        if options.streaming and tensors:  # tokens are all out; what is left rides on zero tokens,
            tensors = self._tensors([], [], []) + tensors  # since the ensemble's postprocessing needs some
        # a stream whose tokens are all out closes with an empty response unless something is left to say
        self.reply.send(pb_utils.InferenceResponse(tensors) if tensors else None, last=True)

    def error(self, message: str) -> None:
        self.answered = True
        self.reply.fail(message)


class BeamWorker:
    """Beam search requests run here, one at a time on their own thread, beside the in-flight batch
    (the scheduler's packed steps carry one token per sequence; a search's beams fork and reorder).
    Each answers with one response holding its beams, best first, as [1, beams, tokens]."""

    def __init__(self, model: Any, max_seq_len: int | None, max_input_len: int | None):
        self.model, self.max_seq_len, self.max_input_len = model, max_seq_len, max_input_len
        self.queue: queue.Queue[_Reply | None] = queue.Queue()
        self.thread: threading.Thread | None = None

    def submit(self, reply: _Reply) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name="beam-search", daemon=True)
            self.thread.start()
        self.queue.put(reply)

    def stop(self) -> None:
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join(timeout=30)

    def _loop(self) -> None:
        while (reply := self.queue.get()) is not None:
            try:
                self._run(reply)
            except Exception as error:
                reply.fail(f"{FORWARD_FAILED} (beam search): {error}")

    def _run(self, reply: _Reply) -> None:
        options, request = reply.options, reply.clients[0].parsed
        problems = request.problems(self.model.config.vocab_size, self.max_seq_len, self.max_input_len)
        if problems:
            reply.fail("; ".join(problems))
            return
        hypotheses = beam_search(
            self.model, request, options.beam_width, options.length_penalty, options.early_stopping
        )
        hypotheses = hypotheses[: options.beams_returned]
        prompt = [] if options.exclude_input else request.input_ids
        outputs = [prompt + h.output_ids for h in hypotheses]
        width = max(len(o) for o in outputs)
        end = request.end_id if request.end_id is not None and request.end_id >= 0 else 0
        ids = np.full((1, len(outputs), width), end, dtype=np.int32)  # padded with the end id, like the backend
        for beam, output in enumerate(outputs):
            ids[0, beam, : len(output)] = output
        tensors = [
            pb_utils.Tensor("output_ids", ids),
            pb_utils.Tensor("sequence_length", np.array([[len(o) for o in outputs]], dtype=np.int32)),
        ]
        if request.return_log_probs:
            steps = max(len(h.log_probs) for h in hypotheses)
            log_probs = np.zeros((1, len(hypotheses), steps), dtype=np.float32)
            for beam, h in enumerate(hypotheses):
                log_probs[0, beam, : len(h.log_probs)] = h.log_probs
            cum = np.array([[h.cum_log_prob for h in hypotheses]], dtype=np.float32)
            tensors += [pb_utils.Tensor("cum_log_probs", cum), pb_utils.Tensor("output_log_probs", log_probs)]
        if options.num_input_tokens:
            tensors.append(pb_utils.Tensor("num_input_tokens", _int32(len(request.input_ids))))
        if options.num_output_tokens:
            tensors.append(pb_utils.Tensor("num_output_tokens", _int32(len(hypotheses[0].output_ids))))
        reply.send(pb_utils.InferenceResponse(tensors), last=True)
