"""Requests to Triton over gRPC bi-directional streaming (``ModelStreamInfer``), from asyncio.

tritonclient's asyncio client cannot ask for the empty final response that marks the end of a
decoupled request, so the stream is driven through its generated gRPC stub, with the request built
by tritonclient's own helper. Leaving the ``async for`` early (a client that went away, a stop
string) cancels the call, which Triton turns into a cancelled request: the engine model frees its
slot at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import numpy as np

STREAM_CLOSE_WAIT_S = 2.0  # how long a finished request's stream is given to close on Triton's side


class TritonError(Exception):
    """An error response from Triton, with the gRPC status when the call itself failed."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class Piece:
    """One response of the entry model: a token's text (empty at the end), with its sequence."""

    text: str
    sequence: int
    log_prob: float | None
    final: bool  # the request's last response
    num_input_tokens: int | None
    num_output_tokens: int | None
    finish_reason: str | None = None  # the model's own, where it says (the LLM-API model does)


UINT64_INPUTS = (
    "seed",
    "lora_task_id",
    "prompt_table_extra_id",
    "sampling_param_seed",
    "lora_id",
)  # the backend's UINT64 inputs


def triton_inputs(values: dict[str, Any], batched: bool = True) -> list[Any]:
    """tritonclient inputs of shape [1, n] (``batched=False``: [n], for a model whose
    max_batch_size is 0, like the LLM-API model) from plain values or lists of them: str -> BYTES,
    bool -> BOOL, float -> FP32, int -> INT32 (UINT64 for the inputs the backend declares so)."""
    from tritonclient.grpc import InferInput
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, value in values.items():
        if isinstance(value, np.ndarray):  # a tensor sent as it is (a LoRA adapter's weights), batch dim included
            tensor = InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
            continue
        items = value if isinstance(value, list) else [value]
        if isinstance(items[0], str):
            array = np.array([[item.encode() for item in items]], dtype=object)
        elif isinstance(items[0], bool):
            array = np.array([items], dtype=bool)
        elif isinstance(items[0], float):
            array = np.array([items], dtype=np.float32)
        else:
            array = np.array([items], dtype=np.uint64 if name in UINT64_INPUTS else np.int32)
        if not batched:
            array = array[0]
        tensor = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def scalar(result: Any, name: str) -> Any:
    array = result.as_numpy(name)
    return None if array is None or array.size == 0 else array.reshape(-1)[0].item()


def decode(text: Any) -> str:
    """A BYTES output as text ("" when absent)."""
    return "" if text is None else b"".join(text.reshape(-1)).decode("utf-8", "replace")


class TritonStream:
    def __init__(self, grpc_url: str, model: str, timeout_s: float | None = None):
        # timeout_s: each request's deadline; gRPC cancels the call past it (DEADLINE_EXCEEDED),
        # and with it the request in Triton, so a hung engine cannot hold connections for ever
        self.grpc_url, self.model, self.timeout_s = grpc_url, model, timeout_s
        self._channel: Any = None
        self._stub: Any = None

    def _connect(self) -> Any:
        if self._stub is None:
            import grpc
            from tritonclient.grpc import service_pb2_grpc

            self._channel = grpc.aio.insecure_channel(self.grpc_url)
            self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        return self._stub

    async def ready(self) -> bool:
        from tritonclient.grpc import service_pb2

        try:
            return bool((await self._connect().ServerReady(service_pb2.ServerReadyRequest(), timeout=5)).ready)
        except Exception:
            return False

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def results(
        self, values: dict[str, Any], request_id: str, batched: bool = True
    ) -> AsyncGenerator[tuple[Any, bool], None]:
        """Every non-empty response of one request to the entry model, as tritonclient's
        ``InferResult`` and whether it is the request's last."""
        import grpc
        from tritonclient.grpc import InferResult
        from tritonclient.grpc._utils import _get_inference_request

        request = _get_inference_request(
            model_name=self.model,
            inputs=triton_inputs(values, batched),
            model_version="",
            request_id=request_id,
            outputs=None,
            sequence_id=0,
            sequence_start=False,
            sequence_end=False,
            priority=0,
            timeout=None,
            parameters=None,
        )
        request.parameters["triton_enable_empty_final_response"].bool_param = True

        async def one_request() -> AsyncIterator[Any]:
            yield request

        call = self._connect().ModelStreamInfer(one_request(), timeout=self.timeout_s)
        try:
            async for response in call:
                if response.error_message:
                    raise TritonError(response.error_message)
                final = response.infer_response.parameters["triton_final_response"].bool_param
                if response.infer_response.outputs:  # not the empty response that only ends the request
                    yield InferResult(response.infer_response), final
                if final or not response.infer_response.outputs:
                    break
            # the request is over: let Triton close the stream itself. Cancelling it right after the
            # final response leaves the model referenced in Triton 2.51, which then cannot unload:
            # the server's stop waited out its exit timeout (and `serve` killed it)
            with contextlib.suppress(TimeoutError):  # then it is cancelled below
                await asyncio.wait_for(call.code(), STREAM_CLOSE_WAIT_S)
        except grpc.aio.AioRpcError as error:
            raise TritonError(error.details() or str(error), error.code().name) from error
        finally:
            call.cancel()  # a no-op when the call ended; otherwise Triton cancels the request

    async def generate(self, values: dict[str, Any], request_id: str) -> AsyncGenerator[Piece, None]:
        """The engine path's entry model (BLS or ensemble): each response one token's text."""
        async with aclosing(self.results(values, request_id)) as results:
            async for result, final in results:
                text = result.as_numpy("text_output")
                log_probs = result.as_numpy("output_log_probs")
                yield Piece(
                    text=decode(text),
                    sequence=int(scalar(result, "sequence_index") or 0),
                    log_prob=None if log_probs is None or log_probs.size == 0 else float(log_probs.reshape(-1)[-1]),
                    final=final,
                    num_input_tokens=scalar(result, "num_input_tokens"),
                    num_output_tokens=scalar(result, "num_output_tokens"),
                )
