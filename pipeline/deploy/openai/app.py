"""An OpenAI-compatible HTTP API (FastAPI) in front of the Triton deployment, on both targets.

``/v1/chat/completions`` and ``/v1/completions`` become one streaming gRPC request to the
repository's entry model (the BLS model when the repository has it: its streamed text is UTF-8
safe; otherwise the ensemble). The chat template is applied by the preprocessing model, the one
place that does it for every client. Errors use OpenAI's error object: 400 for a request this
server cannot take, 401 without the API key (when one is set), 404 for an unknown model or path,
413 for a body over the limit, 429 when Triton's queue is full, 503 when a request waited past
the queue timeout or the engine is down (both with ``Retry-After``), 504 past the request's
deadline, and 500 only for our own faults. A stream that cannot be admitted gets its status before
the stream starts; a client that leaves, streamed or not, cancels its request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.deploy.openai import scoring
from pipeline.deploy.openai.adapters import ServedAdapter
from pipeline.deploy.openai.errors import OpenAIError
from pipeline.deploy.openai.health import engine_heartbeat_problem
from pipeline.deploy.openai.limits import BodyLimit
from pipeline.deploy.openai.llmapi_entry import EngineEntry, LlmApiEntry, LlmApiLayout
from pipeline.deploy.openai.protocol import ChatRequest, CompletionRequest, Sampling, Unsupported
from pipeline.deploy.openai.stops import StopMatcher
from pipeline.deploy.openai.triton_stream import Piece, TritonError, TritonStream
from pipeline.runtime.failures import Failure, kind_of

log = logging.getLogger(__name__)
T = TypeVar("T")

STOP_DRAIN_PIECES = 8  # pieces read after every choice hit a stop string, before the request is cancelled
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


@dataclass
class GatewaySettings:
    served_model: str  # the name clients put in "model"
    max_model_len: int  # the engine's max_seq_len
    grpc_url: str
    entry_model: str  # the repository model the gateway talks to
    default_max_tokens: int
    api_key: str | None  # from the environment, never logged
    sampling_defaults: dict[str, float] = field(default_factory=dict)  # the model card's, for omitted fields
    request_timeout_s: float = 600.0  # each request's deadline toward Triton (openai.request_timeout_s)
    max_body_bytes: int = 8 * 2**20  # a larger body is refused with 413 before it is read whole
    metrics_url: str | None = None  # Triton's /metrics, where the CPU engine publishes its heartbeat
    retry_after_s: int = 1  # what 429 and 503 tell clients to wait
    llmapi: LlmApiLayout | None = None  # set when the entry model is the LLM-API model of backend=pytorch
    tokenizer_dir: Path | None = None  # the served model's tokenizer: token-id prompts, echo scoring
    scoring_refused: str | None = None  # why echo with logprobs cannot be served here (None: it can)
    adapters: dict[str, ServedAdapter] = field(default_factory=dict)  # LoRA adapters served by name


Entry = EngineEntry | LlmApiEntry


def _triton_error(error: TritonError, retry_after_s: int = 1) -> OpenAIError:
    """The OpenAI error for a failed Triton request: the engine's words say whose fault it was."""
    message = str(error)
    kind = kind_of(message)
    if kind is Failure.BUSY or error.status == "RESOURCE_EXHAUSTED":
        return OpenAIError(429, f"the server is at capacity: {message}", "rate_limit_error", code="queue_full",
                           retry_after_s=retry_after_s)  # fmt: skip
    if kind is Failure.UNAVAILABLE:  # waited past triton.queue_timeout_ms, or the engine is down
        return OpenAIError(503, f"the server is overloaded: {message}", "server_error", code="unavailable",
                           retry_after_s=retry_after_s)  # fmt: skip
    if error.status == "DEADLINE_EXCEEDED":
        return OpenAIError(504, f"no answer within the request's deadline: {message}", "server_error", code="timeout")
    if error.status == "UNAVAILABLE":
        return OpenAIError(503, f"Triton is not reachable: {message}", "server_error", code="unavailable",
                           retry_after_s=retry_after_s)  # fmt: skip
    if kind is Failure.CANCELLED:  # stopped by the server (a stop request, a shutdown), not by this client
        return OpenAIError(503, message, "server_error", code="cancelled", retry_after_s=retry_after_s)
    if kind is Failure.INTERNAL:
        return OpenAIError(500, message, "server_error", code="engine_error")
    if error.status in (None, "INVALID_ARGUMENT"):  # a request the models refused: the client's to fix
        return OpenAIError(400, message, "invalid_request_error")
    return OpenAIError(500, message, "server_error")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """OpenAI's error object: every failure the gateway answers has this body."""

    error: ErrorDetail


# the statuses the API answers beside 200, declared in its OpenAPI schema (schema fuzzing checks them)
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        400: "the request cannot be served as asked",
        401: "missing or wrong API key",
        404: "unknown model or path",
        413: "request body over the limit",
        429: "queue full (Retry-After)",
        500: "a fault of the server",
        503: "overloaded or the engine is down (Retry-After)",
        504: "no answer within the request's deadline",
    }.items()
}


class ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


async def _unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """Run ``work`` until done, or cancel it the moment the client disconnects (uvicorn does not
    cancel a handler whose client left: a timed-out SDK call would run on, and be retried)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            raise ClientGone() from None
        raise
    finally:
        watcher.cancel()


class Metrics:
    """Prometheus histograms of what clients see, as trtllm-serve and vLLM expose them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.ttft = self._latency("time_to_first_token", "Time to first token")
        self.tpot = self._latency("time_per_output_token", "Time per output token after the first")
        self.e2e = self._latency("e2e_request_latency", "End-to-end latency")
        self.requests = Counter(
            "pipeline_requests", "Requests by endpoint and outcome", ["endpoint", "status"], registry=self.registry
        )

    def _latency(self, name: str, description: str) -> Histogram:
        return Histogram(f"pipeline_{name}_seconds", description, registry=self.registry, buckets=LATENCY_BUCKETS)


@dataclass
class Choice:
    text: str = ""
    log_probs: list[tuple[str, float]] | None = None
    tokens: int = 0
    finish_reason: str | None = None


class Generation:
    """One OpenAI request's run through Triton: pieces in, per-choice text out, stop strings cut."""

    def __init__(
        self,
        body: Sampling,
        values: dict[str, Any],
        settings: GatewaySettings,
        metrics: Metrics,
        adapter: ServedAdapter | None = None,
    ):
        self.body, self.values, self.settings, self.metrics = body, values, settings, metrics
        self.adapter = adapter
        self.matchers = [StopMatcher(body.stops()) for _ in range(body.n)]
        self.choices = [Choice(log_probs=[] if values.get("return_log_probs") else None) for _ in range(body.n)]
        self.prompt_tokens = 0
        self.started = time.monotonic()
        self.first_token: float | None = None

    async def deltas(self, entry: Entry) -> AsyncGenerator[tuple[int, str], None]:
        """(choice index, new text) as it comes; sets finish reasons and token counts. Closing
        this generator early closes the Triton stream, which cancels the request."""
        after_stop = 0
        async with aclosing(entry.generate(self.values, uuid.uuid4().hex, self.body.stops(), self.adapter)) as pieces:
            async for piece in pieces:
                text = self._take(piece)
                if text:
                    yield piece.sequence, text
                if all(m.stopped for m in self.matchers):
                    # the engine was given the stop strings too and usually ends the request
                    # itself a token later: a cancellation is kept for the rare text-only match
                    # (the CPU target's Triton 2.51 crashed under a storm of cancelled streams)
                    after_stop += 1
                    if after_stop > STOP_DRAIN_PIECES:
                        break
        self._observe()

    def _take(self, piece: Piece) -> str:
        """Account for one piece; the text that can go out now (nothing, and no token counted,
        for a choice that already hit a stop string)."""
        if piece.num_input_tokens is not None:
            self.prompt_tokens = piece.num_input_tokens
        choice, matcher = self.choices[piece.sequence], self.matchers[piece.sequence]
        if matcher.stopped:
            return ""
        closing = piece.num_output_tokens is not None  # the sequence's last response: no new token
        if not closing:
            choice.tokens += 1
            if self.first_token is None:
                self.first_token = time.monotonic()
                self.metrics.ttft.observe(self.first_token - self.started)
            if choice.log_probs is not None and piece.log_prob is not None and not matcher.stopped:
                choice.log_probs.append((piece.text, piece.log_prob))
        text = matcher.push(piece.text)
        if closing:
            text += matcher.flush()
            choice.tokens = piece.num_output_tokens or 0  # the server's count
            if choice.finish_reason is None:
                made_all = choice.tokens >= self.values["max_tokens"]
                choice.finish_reason = piece.finish_reason or ("length" if made_all else "stop")
        if matcher.stopped and choice.finish_reason is None:
            choice.finish_reason = "stop"
        choice.text += text
        return text

    def _observe(self) -> None:
        ended = time.monotonic()
        self.metrics.e2e.observe(ended - self.started)
        tokens = sum(c.tokens for c in self.choices)
        if self.first_token is not None and tokens > self.body.n:
            self.metrics.tpot.observe((ended - self.first_token) / (tokens - self.body.n))

    def usage(self) -> dict[str, int]:
        completion = sum(c.tokens for c in self.choices)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }


def _log_probs(choice: Choice, chat: bool) -> Any:
    if choice.log_probs is None:
        return None
    if chat:
        return {
            "content": [
                {"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []} for t, lp in choice.log_probs
            ]
        }
    return {"tokens": [t for t, _ in choice.log_probs], "token_logprobs": [lp for _, lp in choice.log_probs]}


def create_app(settings: GatewaySettings) -> FastAPI:
    app = FastAPI(title="pipeline OpenAI-compatible API")
    triton = TritonStream(settings.grpc_url, settings.entry_model, settings.request_timeout_s)
    engine = TritonStream(settings.grpc_url, scoring.ENGINE_MODEL, settings.request_timeout_s)
    tokenizer = _LazyTokenizer(settings.tokenizer_dir)
    entry: Entry = EngineEntry(triton) if settings.llmapi is None else LlmApiEntry(triton, settings.llmapi)
    metrics = Metrics()
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    @app.exception_handler(OpenAIError)
    async def openai_error(_request: Request, error: OpenAIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        """FastAPI's own 404, 405 and body-parsing errors, in OpenAI's form."""
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        response = OpenAIError(error.status_code, str(error.detail), kind, code=code).response()
        response.headers.update(error.headers or {})
        return response

    @app.exception_handler(Exception)
    async def bug(_request: Request, error: Exception) -> JSONResponse:
        log.error("gateway error: %s: %s", type(error).__name__, error)
        return OpenAIError(500, "internal error of the gateway (logged)", "server_error").response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else str(first.get("msg", error))
        return OpenAIError(400, message, "invalid_request_error", param=where).response()

    async def authorize(request: Request) -> None:
        """The API key, when one is set. A dependency rather than an HTTP middleware: Starlette's
        middleware hides a client's disconnect from a streaming response."""
        sent = request.headers.get("authorization", "")
        # compare_digest: the time taken does not tell how much of a guessed key was right
        if settings.api_key and not hmac.compare_digest(sent.encode(), f"Bearer {settings.api_key}".encode()):
            raise OpenAIError(401, "missing or wrong API key", "invalid_request_error", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)], responses=ERROR_RESPONSES)

    @app.get("/health", responses={503: {"description": "Triton or the engine's scheduler is down"}})
    async def health() -> Response:
        """Ready when Triton is and the engine's scheduler beats (a dead or stalled scheduler
        answers nothing while Triton's own health stays green)."""
        if not await triton.ready():
            return JSONResponse({"status": "triton unavailable"}, status_code=503)
        problem = await asyncio.to_thread(engine_heartbeat_problem, settings.metrics_url)
        if problem:
            return JSONResponse({"status": problem}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": settings.served_model,
            "object": "model",
            "created": 0,
            "owned_by": "pipeline",
            "max_model_len": settings.max_model_len,
        }
        adapters = [adapter.card(settings.served_model) for adapter in settings.adapters.values()]
        return {"object": "list", "data": [card, *adapters]}

    async def run(request: Request, body: ChatRequest | CompletionRequest, endpoint: str) -> Response:
        chat = isinstance(body, ChatRequest)
        adapter = settings.adapters.get(body.model)
        if body.model != settings.served_model and adapter is None:
            served = ", ".join(repr(name) for name in [settings.served_model, *settings.adapters])
            raise OpenAIError(404, f"model {body.model!r} does not exist; this server serves {served}",
                              "invalid_request_error", param="model", code="model_not_found")  # fmt: skip
        try:
            if isinstance(body, CompletionRequest) and body.scoring():
                return await _unless_client_leaves(request, scored(body, adapter))
            if isinstance(body, CompletionRequest) and not isinstance(body.prompts()[0], str):
                body = body.model_copy(update={"prompt": [await tokenizer.decode(p) for p in body.prompts()]})
            default = settings.default_max_tokens if chat else 16  # OpenAI's completions default
            values = body.triton_values(default, settings.sampling_defaults)
        except Unsupported as error:
            raise OpenAIError(400, str(error), "invalid_request_error") from error
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        generation = Generation(body, values, settings, metrics, adapter)
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        deltas = generation.deltas(entry)
        try:
            if body.stream:  # the first piece (or the refusal) comes before the stream's 200
                first = await _unless_client_leaves(request, anext(deltas, None))
            else:
                await _unless_client_leaves(request, _drain(deltas))
        except TritonError as error:
            await deltas.aclose()
            metrics.requests.labels(endpoint, "error").inc()
            raise _triton_error(error, settings.retry_after_s) from error
        except Unsupported as error:  # what the LLM-API layout has no input for
            await deltas.aclose()
            raise OpenAIError(400, str(error), "invalid_request_error") from error
        except ClientGone:
            await deltas.aclose()
            metrics.requests.labels(endpoint, "disconnected").inc()
            return Response(status_code=499)  # nobody reads it: the connection is gone
        if body.stream:
            return StreamingResponse(
                _sse(request, generation, deltas, first, ident, created, chat, metrics, endpoint),
                media_type="text/event-stream",
            )
        metrics.requests.labels(endpoint, "ok").inc()
        choices = []
        for index, choice in enumerate(generation.choices):
            item: dict[str, Any] = {"index": index, "finish_reason": choice.finish_reason or "stop"}
            item["logprobs"] = _log_probs(choice, chat)
            if chat:
                item["message"] = {"role": "assistant", "content": choice.text}
            else:
                item["text"] = choice.text
            choices.append(item)
        return JSONResponse(
            {
                "id": ident,
                "object": kind,
                "created": created,
                "model": body.model,
                "choices": choices,
                "usage": generation.usage(),
            }
        )

    async def scored(body: CompletionRequest, adapter: ServedAdapter | None) -> Response:
        """echo: every prompt scored token by token (and ``max_tokens`` greedy tokens after it)."""
        if settings.scoring_refused:
            raise OpenAIError(400, settings.scoring_refused, "invalid_request_error", param="echo")
        prompts = [p if isinstance(p, list) else await tokenizer.encode(p) for p in body.prompts()]
        if any(len(ids) < 1 for ids in prompts):
            raise OpenAIError(400, "prompt: an empty prompt has nothing to score", "invalid_request_error")
        loaded = await tokenizer.get()
        top = body.logprobs or 0
        try:
            results = await asyncio.gather(
                *(
                    scoring.score(engine, ids, body.max_tokens or 16, top, loaded, uuid.uuid4().hex, adapter)
                    for ids in prompts
                )
            )
        except TritonError as error:
            metrics.requests.labels("completions", "error").inc()
            raise _triton_error(error, settings.retry_after_s) from error
        metrics.requests.labels("completions", "ok").inc()
        choices = [
            {
                "index": index,
                "text": result.text,
                "logprobs": result.logprobs() if body.logprobs is not None else None,
                "finish_reason": result.finish_reason,
            }
            for index, result in enumerate(results)
        ]
        prompt_tokens = sum(r.prompt_tokens for r in results)
        completion_tokens = sum(r.completion_tokens for r in results)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        return JSONResponse(
            {
                "id": f"cmpl-{uuid.uuid4().hex}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": body.model,
                "choices": choices,
                "usage": usage,
            }
        )

    @v1.post("/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest) -> Response:
        return await run(request, body, "chat")

    @v1.post("/completions")
    async def completions(request: Request, body: CompletionRequest) -> Response:
        return await run(request, body, "completions")

    app.include_router(v1)

    @app.on_event("shutdown")
    async def close() -> None:
        await triton.close()
        await engine.close()

    return app


class _LazyTokenizer:
    """The served model's tokenizer, loaded on the first request that needs it (transformers takes
    seconds to import; most gateways never see token ids or echo)."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self._tokenizer: Any = None
        self._lock = asyncio.Lock()

    async def get(self) -> Any:
        if self.folder is None:
            raise OpenAIError(400, "prompt: this server has no tokenizer for token ids", "invalid_request_error")
        async with self._lock:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                self._tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self.folder)
        return self._tokenizer

    async def decode(self, ids: str | list[int]) -> str:
        return ids if isinstance(ids, str) else str((await self.get()).decode(ids))

    async def encode(self, text: str) -> list[int]:
        # as the preprocessing model encodes a completion's prompt: no special tokens added
        return list((await self.get()).encode(text, add_special_tokens=False))


async def _drain(deltas: AsyncGenerator[Any, None]) -> None:
    async with aclosing(deltas):
        async for _ in deltas:
            pass


async def _sse(
    request: Request,
    generation: Generation,
    deltas: AsyncGenerator[tuple[int, str], None],
    first: tuple[int, str] | None,
    ident: str,
    created: int,
    chat: bool,
    metrics: Metrics,
    endpoint: str,
) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of text (``first`` is the one already taken), one per
    finished choice, usage if asked, then ``[DONE]``. A client that disconnects ends it, and with it
    the Triton request. A failure after the stream began is an error event whose type and code say
    whether it was the client's fault or the server's."""
    chunk_kind = "chat.completion.chunk" if chat else "text_completion"

    def event(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        body: dict[str, Any] = {
            "id": ident,
            "object": chunk_kind,
            "created": created,
            "model": generation.body.model,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def piece(index: int, text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}

    if chat:
        yield event([piece(i, "", None, role=True) for i in range(generation.body.n)])
    if first is not None:
        yield event([piece(first[0], first[1], None)])
    try:
        async with aclosing(deltas):
            async for index, text in deltas:
                # uvicorn drops writes to a client that went away without telling the app:
                # ask, and leave (closing the Triton stream cancels the request)
                if await request.is_disconnected():
                    metrics.requests.labels(endpoint, "disconnected").inc()
                    return
                yield event([piece(index, text, None)])
    except TritonError as error:
        metrics.requests.labels(endpoint, "error").inc()
        failure = _triton_error(error)
        yield f"data: {json.dumps({**failure.body(), 'status': failure.status})}\n\n"
        return
    metrics.requests.labels(endpoint, "ok").inc()
    yield event([piece(i, None if chat else "", c.finish_reason or "stop") for i, c in enumerate(generation.choices)])
    if generation.body.include_usage():
        yield event([], generation.usage())
    yield "data: [DONE]\n\n"
