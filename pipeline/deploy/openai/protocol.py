"""The OpenAI request bodies the gateway accepts, and how each maps onto the entry model's inputs.

Fields OpenAI defines and this server cannot honour are refused with a 400 naming them; fields
it does not know are ignored, as OpenAI ignores them.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

INT32_MAX = 2**31 - 1  # the entry models' INT32 inputs: larger values would wrap (4294967301 -> 5)
SEED_MAX = 2**64 - 1  # the UINT64 seed input
MAX_STOPS, MAX_STOP_CHARS = 4, 1024  # OpenAI's four stop sequences; each short enough to scan per token
# ints in JSON only: pydantic would take true as 1 and 2.0 as 2
Int = Annotated[int, Field(strict=True)]


class Unsupported(ValueError):
    """A valid OpenAI request this server cannot serve as asked (answered with a 400)."""


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:  # content parts: text only (the pipeline serves text models)
            if part.get("type") != "text":
                raise Unsupported(f"message content of type {part.get('type')!r}: this model takes text only")
            text = part.get("text", "")
            if not isinstance(text, str):
                raise Unsupported("a text content part's text must be a string")
            parts.append(text)
        return "".join(parts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class Sampling(BaseModel):
    """What chat and completion requests share."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: Int | None = Field(default=None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(default=None, ge=0, le=2)  # None: the model's default, else 1
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: Int | None = Field(default=None, ge=0, le=SEED_MAX)
    n: Int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    # extensions that vLLM, SGLang and trtllm-serve accept, and benchmarks send
    top_k: Int | None = Field(default=None, ge=0, le=INT32_MAX)
    ignore_eos: bool = False  # generate max_tokens tokens whatever the model says

    @field_validator("stop")
    @classmethod
    def _few_short_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if len(stops) > MAX_STOPS:
            raise ValueError(f"takes at most {MAX_STOPS} strings")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"each stop string takes at most {MAX_STOP_CHARS} characters")
        return stop

    @model_validator(mode="after")
    def _text_is_unicode(self) -> Sampling:
        """JSON may carry lone surrogates (\\ud800), which no tokenizer can encode: refused here."""
        _check_utf8(self.model_dump(include=TEXT_FIELDS))
        return self

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else self.stop

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_values(self, default_max_tokens: int, defaults: dict[str, float], log_probs: bool) -> dict[str, Any]:
        """The entry model's inputs for the sampling part of this request; ``defaults`` (the
        model card's) fill what the request leaves out, then OpenAI's own defaults."""
        temperature = self.temperature if self.temperature is not None else defaults.get("temperature", 1.0)
        top_p = self.top_p if self.top_p is not None else defaults.get("top_p", 1.0)
        values: dict[str, Any] = {
            "max_tokens": self.max_tokens or default_max_tokens,
            "temperature": float(temperature),
            "top_p": float(top_p),
            "presence_penalty": float(self.presence_penalty),
            "frequency_penalty": float(self.frequency_penalty),
            "stream": True,  # always: pieces arrive as they are made, stop strings can cut the request short
            "return_num_input_tokens": True,
            "return_num_output_tokens": True,
            "return_log_probs": log_probs,
            "exclude_input_in_output": True,
        }
        if self.seed is not None:
            values["seed"] = self.seed
        if self.top_k:
            values["top_k"] = self.top_k
        if self.ignore_eos:
            values["end_id"] = -1  # no token has this id: the end token is never matched
        if self.n > 1:
            values["num_return_sequences"] = self.n
        if self.stops():  # the engine stops at them too (token-level); the gateway matches the text
            values["stop_words"] = self.stops()
        values.update(_guide(self.response_format))
        return values


TEXT_FIELDS = {"model", "stop", "user", "messages", "prompt", "response_format"}


def _check_utf8(value: Any, where: str = "") -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(f"{where or 'text'} is not valid Unicode (a lone surrogate at {error.start})") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_utf8(key, where)
            _check_utf8(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_utf8(item, f"{where}[{index}]")


def _guide(response_format: ResponseFormat | None) -> dict[str, Any]:
    """``response_format`` as guided decoding."""
    if response_format is None or response_format.type == "text":
        return {}
    if response_format.type == "json_object":
        return {"guided_decoding_guide_type": "json", "guided_decoding_guide": ""}
    spec = response_format.json_schema or {}
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise Unsupported("response_format json_schema needs json_schema.schema, a JSON Schema object")
    return {"guided_decoding_guide_type": "json_schema", "guided_decoding_guide": json.dumps(schema)}


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(default=None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: Int | None = Field(default=None, ge=0, le=20)

    def triton_values(self, default_max_tokens: int, defaults: dict[str, float]) -> dict[str, Any]:
        if self.top_logprobs:
            raise Unsupported("top_logprobs: this server returns the chosen token's log probability only")
        values = self.sampling_values(default_max_tokens, defaults, self.logprobs)
        if self.max_completion_tokens is not None:
            values["max_tokens"] = self.max_completion_tokens
        # the chat template is applied in one place, the repository's preprocessing model
        messages = [{"role": m.role, "content": m.text()} for m in self.messages]
        return {"text_input": "", "messages": json.dumps(messages), **values}


TokenIds = list[Annotated[int, Field(strict=True, ge=0, le=INT32_MAX)]]
MAX_SCORED_PROMPTS = 64  # prompts one echo request may score


class CompletionRequest(Sampling):
    # text, or token ids (evaluation harnesses send ids so that their context lengths are exact)
    prompt: str | list[str] | TokenIds | list[TokenIds]
    logprobs: Int | None = Field(default=None, ge=0, le=20)
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each text or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and all(isinstance(item, int) for item in self.prompt):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]

    def scoring(self) -> bool:
        """``echo``: the prompt comes back with its tokens' log probabilities (``logprobs``)."""
        if not self.echo:
            return False
        if self.stream or self.n != 1:
            raise Unsupported("echo: score prompts without stream and with n=1")
        if (self.temperature or 0) > 0:
            raise Unsupported("echo: the prompt is scored with greedy decoding; use temperature=0")
        if not 1 <= len(self.prompts()) <= MAX_SCORED_PROMPTS:
            raise Unsupported(f"echo: send 1 to {MAX_SCORED_PROMPTS} prompts")
        return True

    def triton_values(self, default_max_tokens: int, defaults: dict[str, float]) -> dict[str, Any]:
        if self.logprobs:
            raise Unsupported("logprobs > 0: top log probabilities come with echo=true only")
        prompts = self.prompts()
        if len(prompts) != 1:
            raise Unsupported("prompt: send one prompt per request (or several with echo=true)")
        if not isinstance(prompts[0], str):
            raise Unsupported("prompt: token ids are decoded by the gateway first (a bug if seen)")
        values = self.sampling_values(default_max_tokens, defaults, self.logprobs == 0)
        # a completion continues the text as given: no chat template
        return {"text_input": prompts[0], "apply_chat_template": False, **values}
