"""Triton python model: the business-logic alternative to the ensemble.

Calls ``preprocessing``, then the engine model, then ``postprocessing`` for each request, in a
thread per request so that one instance keeps many requests in flight (the engine model batches
them). Streams text when the request asks for it and the engine model is decoupled.
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# BLS input -> (preprocessing input) or (engine input)
TO_PREPROCESSING = {
    "text_input": "QUERY",
    "max_tokens": "REQUEST_OUTPUT_LEN",
    "bad_words": "BAD_WORDS_DICT",
    "stop_words": "STOP_WORDS_DICT",
    "end_id": "END_ID",
    "pad_id": "PAD_ID",
}
TO_ENGINE = {
    "top_k": "runtime_top_k",
    "top_p": "runtime_top_p",
    "temperature": "temperature",
    "seed": "seed",
    "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "min_tokens": "min_tokens",
    "return_log_probs": "return_log_probs",
    "exclude_input_in_output": "exclude_input_in_output",
    "stream": "streaming",
}
# preprocessing output -> engine input
PREPROCESSED = {
    "INPUT_ID": "input_ids",
    "REQUEST_INPUT_LEN": "input_lengths",
    "REQUEST_OUTPUT_LEN": "request_output_len",
    "BAD_WORDS_IDS": "bad_words_list",
    "STOP_WORDS_IDS": "stop_words_list",
    "OUT_END_ID": "end_id",
    "OUT_PAD_ID": "pad_id",
}


def _renamed(request: Any, names: dict[str, str]) -> list[Any]:
    tensors = []
    for source, target in names.items():
        tensor = pb_utils.get_input_tensor_by_name(request, source)
        if tensor is not None:
            tensors.append(pb_utils.Tensor(target, tensor.as_numpy()))
    return tensors


def _checked(response: Any) -> Any:
    if response.has_error():
        raise pb_utils.TritonModelException(response.error().message())
    return response


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config["parameters"].items()}
        self.engine = params["tensorrt_llm_model_name"]
        self.engine_decoupled = params["engine_decoupled"].lower() == "true"
        self.threads: list[threading.Thread] = []

    def _text(self, engine_response: Any, stream_key: str | None) -> Any:
        """Text of one engine response; a streamed one is decoded in the context of its stream
        (``stream_key``), so no character is split between two responses."""
        tokens = pb_utils.get_output_tensor_by_name(engine_response, "output_ids").as_numpy()
        lengths = pb_utils.get_output_tensor_by_name(engine_response, "sequence_length").as_numpy()
        inputs = [pb_utils.Tensor("TOKENS_BATCH", tokens), pb_utils.Tensor("SEQUENCE_LENGTH", lengths)]
        if stream_key is not None:
            inputs.append(pb_utils.Tensor("STREAM_KEY", np.array([[stream_key.encode()]], dtype=object)))
            inputs.append(pb_utils.Tensor("STREAM", np.array([[True]])))
        post = pb_utils.InferenceRequest(model_name="postprocessing", requested_output_names=["OUTPUT"], inputs=inputs)
        text = pb_utils.get_output_tensor_by_name(_checked(post.exec()), "OUTPUT").as_numpy()
        outputs = [pb_utils.Tensor("text_output", text)]
        for name in ("cum_log_probs", "output_log_probs"):
            tensor = pb_utils.get_output_tensor_by_name(engine_response, name)
            if tensor is not None:
                outputs.append(pb_utils.Tensor(name, tensor.as_numpy()))
        return pb_utils.InferenceResponse(outputs)

    def _serve(self, request: Any) -> None:
        sender = request.get_response_sender()
        try:
            pre = pb_utils.InferenceRequest(
                model_name="preprocessing",
                requested_output_names=list(PREPROCESSED),
                inputs=_renamed(request, TO_PREPROCESSING),
            )
            pre_response = _checked(pre.exec())
            engine_inputs = [
                pb_utils.Tensor(PREPROCESSED[name], pb_utils.get_output_tensor_by_name(pre_response, name).as_numpy())
                for name in PREPROCESSED
            ] + _renamed(request, TO_ENGINE)
            engine = pb_utils.InferenceRequest(
                model_name=self.engine,
                requested_output_names=["output_ids", "sequence_length", "cum_log_probs", "output_log_probs"],
                inputs=engine_inputs,
            )
            responses = engine.exec(decoupled=True) if self.engine_decoupled else [engine.exec()]
            stream = pb_utils.get_input_tensor_by_name(request, "stream")
            streaming = stream is not None and bool(stream.as_numpy().reshape(-1)[0])
            stream_key = uuid.uuid4().hex if streaming else None
            for response in responses:
                if pb_utils.get_output_tensor_by_name(_checked(response), "output_ids") is None:
                    continue  # the empty closing response of a stream
                sender.send(self._text(response, stream_key))
            sender.send(flags=FINAL)
        except Exception as error:  # every failure reaches the client as an error response
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error))), flags=FINAL)

    def execute(self, requests: list[Any]) -> None:
        self.threads = [t for t in self.threads if t.is_alive()]
        for request in requests:
            thread = threading.Thread(target=self._serve, args=(request,), daemon=True)
            thread.start()
            self.threads.append(thread)
        return None

    def finalize(self) -> None:
        for thread in self.threads:
            thread.join(timeout=30)
