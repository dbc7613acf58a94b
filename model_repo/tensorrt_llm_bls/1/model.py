"""Triton python model: the business-logic alternative to the ensemble.

Calls ``preprocessing``, then the engine model, then ``postprocessing`` for each request, in a
thread per request so that one instance keeps many requests in flight (the engine model batches
them). Streams text when the request asks for it and the engine model is decoupled.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
DEFAULT_CONCURRENCY = 256  # when the repository names no bound
IDLE_EXIT_S = 3.0  # a worker idle this long ends, down to MIN_WORKERS
MIN_WORKERS = 4
WATCH_PERIOD_S = 0.2  # how often the running requests' clients are asked whether they left
# BLS input -> preprocessing input
TO_PREPROCESSING = {
    "text_input": "QUERY",
    "decoder_text_input": "DECODER_QUERY",
    "image_bytes_input": "IMAGE_BYTES",
    "image_url_input": "IMAGE_URL",
    "image_sizes_input": "IMAGE_SIZES",
    "video_bytes_input": "VIDEO_BYTES",
    "max_tokens": "REQUEST_OUTPUT_LEN",
    "bad_words": "BAD_WORDS_DICT",
    "stop_words": "STOP_WORDS_DICT",
    "embedding_bias_words": "EMBEDDING_BIAS_WORDS",
    "embedding_bias_weights": "EMBEDDING_BIAS_WEIGHTS",
    "end_id": "END_ID",
    "pad_id": "PAD_ID",
    "prompt_table_extra_id": "PROMPT_TABLE_EXTRA_ID",
    "messages": "MESSAGES",
    "apply_chat_template": "APPLY_CHAT_TEMPLATE",
}
# BLS input -> engine input
TO_ENGINE = {
    "exclude_input_in_output": "exclude_input_in_output",
    "top_k": "runtime_top_k",
    "top_p": "runtime_top_p",
    "temperature": "temperature",
    "length_penalty": "len_penalty",
    "repetition_penalty": "repetition_penalty",
    "min_tokens": "min_tokens",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "seed": "seed",
    "return_log_probs": "return_log_probs",
    "return_context_logits": "return_context_logits",
    "return_generation_logits": "return_generation_logits",
    "num_return_sequences": "num_return_sequences",
    "beam_width": "beam_width",
    "stream": "streaming",
    "prompt_embedding_table": "prompt_embedding_table",
    "prompt_vocab_size": "prompt_vocab_size",
    "lora_task_id": "lora_task_id",
    "lora_weights": "lora_weights",
    "lora_config": "lora_config",
    "return_perf_metrics": "return_perf_metrics",
    "return_num_input_tokens": "return_num_input_tokens",
    "return_num_output_tokens": "return_num_output_tokens",
    "guided_decoding_guide_type": "guided_decoding_guide_type",
    "guided_decoding_guide": "guided_decoding_guide",
}
# preprocessing output -> engine input (those it leaves out are not sent)
PREPROCESSED = {
    "INPUT_ID": "input_ids",
    "REQUEST_INPUT_LEN": "input_lengths",
    "DECODER_INPUT_ID": "decoder_input_ids",
    "REQUEST_DECODER_INPUT_LEN": "decoder_input_lengths",
    "REQUEST_OUTPUT_LEN": "request_output_len",
    "BAD_WORDS_IDS": "bad_words_list",
    "STOP_WORDS_IDS": "stop_words_list",
    "EMBEDDING_BIAS": "embedding_bias",
    "OUT_END_ID": "end_id",
    "OUT_PAD_ID": "pad_id",
    "OUT_PROMPT_TABLE_EXTRA_IDS": "prompt_table_extra_ids",
}
# inputs of upstream's BLS for what this pipeline does not deploy (a multimodal encoder model, a
# draft model for speculative decoding): refused by name rather than ignored
NOT_SERVED = {
    "image_input": "multimodal models (an encoder model in the repository)",
    "num_draft_tokens": "speculative decoding with a draft model",
    "use_draft_logits": "speculative decoding with a draft model",
}
# engine outputs passed through to the client unchanged (output_ids become text_output)
PASSED_THROUGH = (
    "cum_log_probs",
    "output_log_probs",
    "context_logits",
    "generation_logits",
    "batch_index",
    "sequence_index",
    "kv_cache_alloc_new_blocks",
    "kv_cache_reused_blocks",
    "kv_cache_alloc_total_blocks",
    "arrival_time_ns",
    "first_scheduled_time_ns",
    "first_token_time_ns",
    "last_token_time_ns",
    "acceptance_rate",
    "total_accepted_draft_tokens",
    "total_draft_tokens",
    "num_input_tokens",
    "num_output_tokens",
)


def _renamed(request: Any, names: dict[str, str]) -> list[Any]:
    tensors = []
    for source, target in names.items():
        tensor = pb_utils.get_input_tensor_by_name(request, source)
        if tensor is not None:
            array = tensor.as_numpy()
            # scalars this model declares with an empty reshape arrive as [batch]; the next model
            # declares them [batch, 1]
            tensors.append(pb_utils.Tensor(target, array.reshape(-1, 1) if array.ndim == 1 else array))
    return tensors


class _Failed(Exception):
    """A composing model's error, with its code (a bad request stays a 400 through the BLS)."""

    def __init__(self, message: str, code: Any):
        super().__init__(message)
        self.code = code


QUIET_CANCEL = "pipeline_quiet_cancel"  # request parameter the engine model reads


def _int32(value: int) -> np.ndarray:
    return np.array([[value]], dtype=np.int32)


def _output_int(engine_response: Any, name: str) -> int:
    found = pb_utils.get_output_tensor_by_name(engine_response, name)
    return 0 if found is None else int(found.as_numpy().reshape(-1)[0])


def _index(engine_response: Any) -> tuple[int, int]:
    """Which stream a response belongs to: its prompt (batch_index, for a request of several) and
    its sequence (sequence_index, num_return_sequences > 1); (0, 0) for a single one."""
    return _output_int(engine_response, "batch_index"), _output_int(engine_response, "sequence_index")


def _stream(stream_key: str, index: tuple[int, int]) -> str:
    return f"{stream_key}-{index[0]}-{index[1]}"


def _count(engine_response: Any) -> Any:
    count = pb_utils.get_output_tensor_by_name(engine_response, "num_output_tokens")
    return None if count is None else count.as_numpy()


def _checked(response: Any) -> Any:
    if response.has_error():
        raise _Failed(response.error().message(), response.error().code())
    return response


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config["parameters"].items()}
        self.engine = params["tensorrt_llm_model_name"]
        self.engine_decoupled = params["engine_decoupled"].lower() == "true"
        self.limit = int(params.get("max_concurrent_requests", "0") or 0) or DEFAULT_CONCURRENCY
        # a pool of daemon threads, grown on demand up to the limit: daemons, so a request stuck
        # on an engine that never answers cannot hold the stub's exit
        self.jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.active = self.workers = 0
        self.lock = threading.Lock()
        # engine request id -> its client's request, while the engine runs it: a client that leaves
        # is noticed here within WATCH_PERIOD_S, not at the engine's next response, which for a
        # queued request comes only after its whole prompt is prefilled
        self.watched: dict[str, Any] = {}
        # held while the watcher asks clients and while a request leaves ``watched``: a request is
        # asked only before its final response (asking after it crashes Triton 2.51, whose
        # response factory is freed by then)
        self.watch_lock = threading.Lock()
        self.closing = threading.Event()
        threading.Thread(target=self._watch, name="bls-cancellations", daemon=True).start()

    def _text(self, engine_response: Any, stream_key: str | None) -> Any:
        """Text of one engine response; a streamed one is decoded in the context of its stream
        (``stream_key`` and the sequence's index), so no character is split between two responses."""
        tokens = pb_utils.get_output_tensor_by_name(engine_response, "output_ids").as_numpy()
        if stream_key is not None:
            stream_key = _stream(stream_key, _index(engine_response))
        lengths = pb_utils.get_output_tensor_by_name(engine_response, "sequence_length").as_numpy()
        inputs = [pb_utils.Tensor("TOKENS_BATCH", tokens), pb_utils.Tensor("SEQUENCE_LENGTH", lengths)]
        if stream_key is not None:
            inputs.append(pb_utils.Tensor("STREAM_KEY", np.array([[stream_key.encode()]], dtype=object)))
            inputs.append(pb_utils.Tensor("STREAM", np.array([[True]])))
        post = pb_utils.InferenceRequest(model_name="postprocessing", requested_output_names=["OUTPUT"], inputs=inputs)
        return pb_utils.get_output_tensor_by_name(_checked(post.exec()), "OUTPUT").as_numpy()

    def _response(self, engine_response: Any, stream_key: str | None) -> Any:
        """The client's response to one engine response: its text (when it has tokens) and the
        engine outputs passed through; None when it has neither (an empty end of stream)."""
        outputs = [
            pb_utils.Tensor(name, tensor.as_numpy())
            for name in PASSED_THROUGH
            if (tensor := pb_utils.get_output_tensor_by_name(engine_response, name)) is not None
        ]
        if pb_utils.get_output_tensor_by_name(engine_response, "output_ids") is not None:
            outputs.insert(0, pb_utils.Tensor("text_output", self._text(engine_response, stream_key)))
        return pb_utils.InferenceResponse(outputs) if outputs else None

    def _serve(self, request: Any) -> None:
        sender = request.get_response_sender()
        try:
            for name, what in NOT_SERVED.items():
                if pb_utils.get_input_tensor_by_name(request, name) is not None:
                    raise ValueError(f"{name}: {what} are not served by this pipeline")
            pre = pb_utils.InferenceRequest(
                model_name="preprocessing",
                requested_output_names=list(PREPROCESSED),
                inputs=_renamed(request, TO_PREPROCESSING),
            )
            pre_response = _checked(pre.exec())
            engine_inputs = [
                pb_utils.Tensor(target, tensor.as_numpy())
                for name, target in PREPROCESSED.items()
                if (tensor := pb_utils.get_output_tensor_by_name(pre_response, name)) is not None
            ] + _renamed(request, TO_ENGINE)
            if request.is_cancelled():  # gone while its prompt was tokenized
                raise _Failed("request cancelled", getattr(pb_utils.TritonError, "CANCELLED", None))
            engine_id = uuid.uuid4().hex  # a stop request names it
            engine = pb_utils.InferenceRequest(
                model_name=self.engine,
                requested_output_names=["output_ids", "sequence_length", *PASSED_THROUGH],
                inputs=engine_inputs,
                request_id=engine_id,
                # an error response never reaches a BLS iterator in Triton 2.51, so the engine ends a
                # request this model stops with an empty final response (see the drain below)
                parameters={QUIET_CANCEL: True},
            )
            stream = pb_utils.get_input_tensor_by_name(request, "stream")
            streaming = stream is not None and bool(stream.as_numpy().reshape(-1)[0])
            stream_key = uuid.uuid4().hex if streaming else None
            responses: Any = iter(())
            if self.engine_decoupled:  # a non-decoupled engine has no stop input
                with self.watch_lock:
                    self.watched[engine_id] = request
            ended = False  # the engine's request sent its last response
            counts: dict[tuple[int, int], Any] = {}  # streamed sequences -> their output count (on their last response)
            try:
                responses = iter(engine.exec(decoupled=True) if self.engine_decoupled else [engine.exec()])
                for response in responses:
                    ended = response.has_error()
                    if request.is_cancelled() and not ended:  # the client went away: so does the engine's request
                        self._stop(engine_id)
                        raise _Failed("request cancelled", getattr(pb_utils.TritonError, "CANCELLED", None))
                    reply = self._response(_checked(response), stream_key)
                    if stream_key is not None:
                        count = _count(response)
                        counts[_index(response)] = count if count is not None else counts.get(_index(response))
                    if reply is not None:
                        sender.send(reply)
                if stream_key is not None:
                    for index, count in counts.items():  # what the detokenizer held back, at the end
                        self._flush(sender, stream_key, index, count)
            except BaseException:
                if not ended:  # relaying failed: the engine's request stops before it is drained
                    self._stop(engine_id)
                raise
            finally:
                # the engine's request is read to its final response, whatever happened here:
                # Triton 2.51 aborts when an engine answers a BLS request whose iterator is gone.
                # An error is the engine's last response; a stopped request ends without one
                # (QUIET_CANCEL): an error final never arrived here, and the wait held a thread
                while not ended:
                    leftover = next(responses, None)
                    ended = leftover is None or leftover.has_error()
                with self.watch_lock:
                    self.watched.pop(engine_id, None)
            sender.send(flags=FINAL)
        except Exception as error:  # every failure reaches the client as an error response
            if isinstance(error, _Failed):
                reply = pb_utils.TritonError(str(error), error.code)
            elif isinstance(error, ValueError):  # refused here
                reply = pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG)
            else:
                reply = pb_utils.TritonError(str(error))
            sender.send(pb_utils.InferenceResponse(error=reply), flags=FINAL)

    def _flush(self, sender: Any, stream_key: str, index: tuple[int, int], count: Any) -> None:
        """End a stream's detokenization: a character cut short by max_tokens was held back
        waiting for bytes that never come. It goes out as U+FFFD, so the pieces concatenate to the
        unstreamed text; the response repeats the sequence's output count, so a client counting
        responses as tokens sees no extra one."""
        inputs = [
            pb_utils.Tensor("TOKENS_BATCH", np.zeros((1, 1, 0), dtype=np.int32)),
            pb_utils.Tensor("SEQUENCE_LENGTH", np.zeros((1, 1), dtype=np.int32)),
            pb_utils.Tensor("STREAM_KEY", np.array([[_stream(stream_key, index).encode()]], dtype=object)),
            pb_utils.Tensor("STREAM", np.array([[True]])),
            pb_utils.Tensor("STREAM_END", np.array([[True]])),
        ]
        post = pb_utils.InferenceRequest(model_name="postprocessing", requested_output_names=["OUTPUT"], inputs=inputs)
        text = pb_utils.get_output_tensor_by_name(_checked(post.exec()), "OUTPUT").as_numpy()
        if not b"".join(text.reshape(-1)):
            return
        outputs = [pb_utils.Tensor("text_output", text), pb_utils.Tensor("sequence_index", _int32(index[1]))]
        outputs.append(pb_utils.Tensor("batch_index", _int32(index[0])))
        if count is not None:
            outputs.append(pb_utils.Tensor("num_output_tokens", count))
        sender.send(pb_utils.InferenceResponse(outputs))

    def _watch(self) -> None:
        """Stop the engine's request of every client that went away."""
        while not self.closing.wait(WATCH_PERIOD_S):
            left = []
            with self.watch_lock:
                for engine_id, request in self.watched.items():
                    try:
                        if request.is_cancelled():
                            left.append(engine_id)
                    except Exception:  # the request is gone with its client
                        left.append(engine_id)
            for engine_id in left:
                # a request still in Triton's queue is unknown to the engine: asked again next time
                if self._stop(engine_id):
                    with self.watch_lock:
                        self.watched.pop(engine_id, None)

    def _stop(self, engine_id: str) -> bool:
        """Cancel the engine's request with the backend's ``stop`` input (this python backend's
        BLS response iterator has no cancel()); False when the engine does not know the id yet."""
        one = np.ones((1, 1), dtype=np.int32)
        inputs = [
            pb_utils.Tensor("input_ids", one),
            pb_utils.Tensor("input_lengths", one),
            pb_utils.Tensor("request_output_len", one),
            pb_utils.Tensor("stop", np.array([[True]])),
        ]
        stop = pb_utils.InferenceRequest(
            model_name=self.engine, requested_output_names=[], inputs=inputs, request_id=engine_id
        )
        known = True
        for response in stop.exec(decoupled=True) if self.engine_decoupled else [stop.exec()]:
            known = known and not response.has_error()
        return known

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            with self.lock:
                admitted = self.active < self.limit
                self.active += admitted
            if not admitted:  # a flood is refused at once, as Triton refuses beyond a full queue
                message = f"Exceeds maximum queue size: {self.limit} requests are being answered"
                error = pb_utils.TritonError(message, getattr(pb_utils.TritonError, "UNAVAILABLE", None))
                sender = request.get_response_sender()
                sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)
                continue
            self.jobs.put(request)
            with self.lock:  # every admitted request has a thread: active <= workers <= limit
                grow = self.workers < self.active
                self.workers += grow
            if grow:
                threading.Thread(target=self._work, name="bls-request", daemon=True).start()
        return None

    def _work(self) -> None:
        while True:
            try:
                request = self.jobs.get(timeout=IDLE_EXIT_S)
            except queue.Empty:
                with self.lock:  # a burst is over: the pool shrinks back (each request keeps a thread)
                    if self.workers > max(self.active, MIN_WORKERS):
                        self.workers -= 1
                        return
                continue
            if request is None:
                return
            try:
                self._serve(request)
            finally:
                with self.lock:
                    self.active -= 1

    def finalize(self) -> None:
        self.closing.set()
        # requests still running get a moment to finish; they must not hold the server's shutdown
        # (Triton waits for every model to unload)
        for _ in range(self.workers):
            self.jobs.put(None)  # each idle worker ends; busy ones end after their request
        deadline = time.monotonic() + 5
        while self.active and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.active:
            pb_utils.Logger.log_warn(f"unloading with {self.active} request(s) still running")
