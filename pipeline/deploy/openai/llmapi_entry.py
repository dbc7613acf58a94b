"""The gateway in front of the LLM-API model of ``backend=pytorch`` (upstream's one-model layout).

The OpenAI request is first turned into the engine path's inputs (``protocol``), the one mapping
both layouts share; this module translates them into the LLM-API model's: ``sampling_param_*``
inputs, the chat template applied here (the layout has no preprocessing model), ``n`` choices as
``n`` requests (seeded ``seed + i``, as the engine seeds its sequences), stop strings handed to the
model. Its responses carry the text so far, which becomes the pieces of text since the last one,
and a finish reason. It counts no tokens, so usage is counted here with the model's tokenizer.

What the layout has no input for is refused by name (a 400): per-token log probabilities,
``ignore_eos``, and guided decoding unless the model declares the guide inputs (the CPU target's
model does; upstream's has none: ``serve.frontend=trtllm-serve`` serves JSON schemas on GPUs).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.deploy.openai.adapters import ServedAdapter, with_adapter
from pipeline.deploy.openai.protocol import Unsupported
from pipeline.deploy.openai.triton_stream import Piece, TritonError, TritonStream, decode
from pipeline.runtime.failures import CANCELLED

SEED_SPAN = 2**64  # the UINT64 seed input wraps around, as the engine's per-sequence seeds do
# the engine path's input -> the LLM-API model's
RENAMED = {
    "max_tokens": "sampling_param_max_tokens",
    "temperature": "sampling_param_temperature",
    "top_p": "sampling_param_top_p",
    "top_k": "sampling_param_top_k",
    "presence_penalty": "sampling_param_presence_penalty",
    "frequency_penalty": "sampling_param_frequency_penalty",
    "guided_decoding_guide_type": "guided_decoding_guide_type",
    "guided_decoding_guide": "guided_decoding_guide",
}
# inputs the engine path takes that this layout needs no counterpart for
ANSWERED_HERE = {
    "text_input",
    "messages",
    "apply_chat_template",
    "stream",
    "seed",
    "num_return_sequences",
    "return_num_input_tokens",
    "return_num_output_tokens",
    "exclude_input_in_output",
    "stop_words",  # handed to the model as sampling_param_stop
}
FINISH_REASONS = {"stop": "stop", "length": "length"}


@dataclass(frozen=True)
class LlmApiLayout:
    """What the gateway needs to know of an LLM-API repository."""

    tokenizer_dir: Path  # the checkpoint's tokenizer, the one the model uses
    inputs: frozenset[str]  # the inputs the model declares
    decoupled: bool  # whether it streams (triton.streaming)


def llmapi_values(values: dict[str, Any], stops: list[str], inputs: frozenset[str], decoupled: bool) -> dict[str, Any]:
    """The LLM-API model's inputs for one request (without the prompt); ``Unsupported`` names what
    it cannot take."""
    if values.get("return_log_probs"):
        raise Unsupported(
            "logprobs: the LLM-API model of backend=pytorch returns no per-token log probabilities "
            "(serve with backend=tensorrt for them)"
        )
    if values.get("end_id") == -1:
        raise Unsupported("ignore_eos: the LLM-API model of backend=pytorch has no input for it; drop ignore_eos")
    out: dict[str, Any] = {
        "sampling_param_exclude_input_from_output": True,
        "return_finish_reason": True,
        "streaming": decoupled,
    }
    for name, value in values.items():
        if name in ANSWERED_HERE or name in ("return_log_probs", "end_id"):
            continue
        target = RENAMED.get(name)
        if target is None or target not in inputs:
            what = "guided decoding (response_format)" if name.startswith("guided_decoding") else name
            raise Unsupported(
                f"{what}: the LLM-API model this server fronts has no input for it "
                "(on GPUs, serve.frontend=trtllm-serve serves response_format)"
            )
        out[target] = value
    if stops:
        out["sampling_param_stop"] = list(stops)
    return out


def chat_prompt(tokenizer: Any, messages_json: str) -> str:
    """The chat template over the messages, as text (the model tokenizes it)."""
    if not tokenizer.chat_template:
        raise Unsupported("messages: this model's tokenizer has no chat template; use /v1/completions")
    try:
        text = str(tokenizer.apply_chat_template(json.loads(messages_json), tokenize=False, add_generation_prompt=True))
    except Exception as error:  # jinja's raise_exception: the template refused these messages
        raise Unsupported(f"the chat template refused the messages: {error}") from error
    # the model encodes the text with the tokenizer's special tokens: a template that writes the
    # begin-of-text token itself would get it twice (SmolLM2's does), and answer worse
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer.encode("")[:1] == [tokenizer.bos_token_id]:
        text = text[len(bos) :]
    return text


class EngineEntry:
    """The engine path's entry model (BLS or ensemble) takes the inputs as they are; stop strings
    are the gateway's to match."""

    def __init__(self, stream: TritonStream):
        self.stream = stream

    async def generate(
        self, values: dict[str, Any], request_id: str, stops: list[str], adapter: ServedAdapter | None = None
    ) -> AsyncGenerator[Piece, None]:
        """The request's pieces; with an adapter, by its task id (``adapters.with_adapter``)."""
        pieces = (
            self.stream.generate(values, request_id)
            if adapter is None
            else with_adapter(adapter, values, lambda inputs: self.stream.generate(inputs, request_id))
        )
        async with aclosing(pieces) as each:
            async for piece in each:
                yield piece


class LlmApiEntry:
    """``generate`` with the engine path's inputs, for the LLM-API model."""

    def __init__(self, stream: TritonStream, layout: LlmApiLayout):
        from transformers import AutoTokenizer

        self.stream, self.layout = stream, layout
        self.tokenizer = AutoTokenizer.from_pretrained(layout.tokenizer_dir)

    def prepare(self, values: dict[str, Any], stops: list[str]) -> tuple[str, dict[str, Any]]:
        """The prompt text and the model's inputs; ``Unsupported`` before anything is sent."""
        inputs = llmapi_values(values, stops, self.layout.inputs, self.layout.decoupled)
        if values.get("messages"):
            prompt = chat_prompt(self.tokenizer, values["messages"])
        else:
            prompt = str(values["text_input"])
        return prompt, inputs

    async def generate(
        self, values: dict[str, Any], request_id: str, stops: list[str], adapter: ServedAdapter | None = None
    ) -> AsyncGenerator[Piece, None]:
        prompt, inputs = self.prepare(values, stops)
        if adapter is not None:  # the LLM API loads it from PEFT's folder in the repository
            if "lora_path" not in self.layout.inputs:
                raise Unsupported(f"model {adapter.name!r}: the LLM-API model here takes no LoRA adapters")
            inputs.update(adapter.llmapi_inputs())
        # off the event loop: a long prompt takes milliseconds to tokenize, and every stream waits on the loop
        prompt_tokens = len(await asyncio.to_thread(self.tokenizer.encode, prompt))
        n, seed = int(values.get("num_return_sequences", 1)), values.get("seed")
        requests = []
        for index in range(n):
            one = {"text_input": prompt, **inputs}
            if seed is not None:
                one["sampling_param_seed"] = (int(seed) + index) % SEED_SPAN
            requests.append(self._choice(one, index, f"{request_id}-{index}", prompt_tokens, values["max_tokens"]))
        if n == 1:
            async with aclosing(requests[0]) as pieces:
                async for piece in pieces:
                    yield piece
            return
        async with aclosing(_merged(requests)) as pieces:
            async for piece in pieces:
                yield piece

    async def _choice(
        self, inputs: dict[str, Any], index: int, request_id: str, prompt_tokens: int, max_tokens: int
    ) -> AsyncGenerator[Piece, None]:
        """One choice's pieces: the text added since the last response, then its end."""
        sent = ""
        async with aclosing(self.stream.results(inputs, request_id, batched=False)) as results:
            async for result, final in results:
                text = decode(result.as_numpy("text_output"))
                new = text[len(sent) :] if text.startswith(sent) else ""  # text so far only grows
                sent = text if text.startswith(sent) else sent
                if not final:
                    if new:
                        yield Piece(new, index, None, False, None, None)
                    continue
                reason = decode(result.as_numpy("finish_reason"))
                if reason == "cancelled":  # stopped by the server (a stop request), not by this client
                    raise TritonError(f"{CANCELLED} by the server")
                finish = FINISH_REASONS.get(reason, "stop")
                # the model counts no tokens: "length" means it made max_tokens of them
                tokens = (
                    max_tokens if finish == "length" else len(self.tokenizer.encode(sent, add_special_tokens=False))
                )
                yield Piece(new, index, None, True, prompt_tokens, tokens, finish)


async def _merged(streams: list[AsyncGenerator[Piece, None]]) -> AsyncGenerator[Piece, None]:
    """The pieces of several requests as they come; the first failure ends all of them."""
    queue: asyncio.Queue[Piece | BaseException | None] = asyncio.Queue()

    async def pump(stream: AsyncGenerator[Piece, None]) -> None:
        try:
            async with aclosing(stream) as pieces:
                async for piece in pieces:
                    await queue.put(piece)
            await queue.put(None)
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # handed to the consumer, which raises it
            await queue.put(error)

    tasks = [asyncio.ensure_future(pump(stream)) for stream in streams]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()  # closes each request's gRPC call, which cancels it in Triton
        await asyncio.gather(*tasks, return_exceptions=True)
