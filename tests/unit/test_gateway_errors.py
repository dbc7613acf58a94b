"""The gateway's error language, in process (httpx over ASGI, no socket) with Triton unreachable:
every failure is an OpenAI error object with the client's status, bounds are checked before any
work, and nothing comes back as plain text or as a 200 stream that carries an error."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from pipeline.deploy.openai.app import GatewaySettings, create_app
from pipeline.deploy.openai.health import heartbeat_problem
from tests.conftest import free_ports

MODEL = "m"
LIMIT = 4096


def settings(**changes: Any) -> GatewaySettings:
    (closed,) = free_ports(1)  # nothing listens there: Triton is down
    base: dict[str, Any] = {
        "served_model": MODEL,
        "max_model_len": 2048,
        "grpc_url": f"127.0.0.1:{closed}",
        "entry_model": "tensorrt_llm_bls",
        "default_max_tokens": 16,
        "api_key": None,
        "request_timeout_s": 5,
        "max_body_bytes": LIMIT,
    }
    return GatewaySettings(**{**base, **changes})


async def _call(method: str, path: str, **kwargs: Any) -> httpx.Response:
    transport = httpx.ASGITransport(app=create_app(settings()))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        return await client.request(method, path, **kwargs)


def call(method: str, path: str, **kwargs: Any) -> httpx.Response:
    import asyncio

    return asyncio.run(_call(method, path, **kwargs))


def _error(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return dict(body["error"])


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat(max_tokens=4294967301), "max_tokens"),  # wrapped to 5 before
        (chat(max_tokens=3_000_000_000), "max_tokens"),
        (chat(top_k=4294967297), "top_k"),
        (chat(seed=2**64), "seed"),  # a plain-text 500 before
        (chat(max_tokens=True), "max_tokens"),
        (chat(stop=["a", "b", "c", "d", "e"]), "stop"),  # a plain-text 500 before
        (chat(stop="x" * 2000), "stop"),
        (chat(n=17), "n"),
    ],
)
def test_out_of_range_fields_are_refused_with_400_naming_them(body: dict[str, Any], param: str) -> None:
    response = call("POST", "/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = _error(response)
    assert error["type"] == "invalid_request_error" and param in (error["param"] or error["message"]), error


def test_text_that_is_not_unicode_is_refused() -> None:
    raw = '{"model": "m", "prompt": "\\ud800 lone surrogate"}'
    response = call("POST", "/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "Unicode" in _error(response)["message"]


@pytest.mark.parametrize(
    ("method", "path", "content", "status"),
    [
        ("GET", "/v1/embeddings", None, 404),
        ("GET", "/v1/completions", None, 405),
        ("POST", "/v1/completions", b'{"model": "m", "prompt": ', 400),
        ("POST", "/v1/completions", b"\xff\xfe not utf-8", 400),
        ("POST", "/v1/completions", b"[" * 100_000 + b"]" * 100_000, 413),
    ],
)
def test_framework_errors_are_openai_error_objects(method: str, path: str, content: bytes | None, status: int) -> None:
    response = call(method, path, content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    _error(response)


def test_a_body_over_the_limit_is_refused_before_it_is_read_whole() -> None:
    read = {"bytes": 0}

    async def chunks() -> AsyncIterator[bytes]:  # chunked: no content-length to go by
        for _ in range(1000):
            read["bytes"] += 1024
            yield b" " * 1024

    response = call("POST", "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and _error(response)["code"] == "request_too_large"
    assert read["bytes"] <= LIMIT + 2048  # it stopped reading at the limit
    declared = call("POST", "/v1/completions", content=b"x" * (LIMIT + 1), headers={"content-type": "application/json"})
    assert declared.status_code == 413


@pytest.mark.parametrize("stream", [False, True])
def test_with_triton_down_streams_and_plain_requests_get_503_with_retry_after(stream: bool) -> None:
    response = call("POST", "/v1/chat/completions", json=chat(stream=stream, max_tokens=4))
    assert response.status_code == 503, response.text  # a stream too: its status comes before it starts
    assert response.headers["retry-after"] == "1" and _error(response)["type"] == "server_error"


def test_health_fails_when_triton_is_down() -> None:
    response = call("GET", "/health")
    assert response.status_code == 503


def test_a_stale_or_dead_scheduler_heartbeat_is_a_health_problem() -> None:
    metrics = (
        'pipeline_scheduler_heartbeat_seconds{model="tensorrt_llm",version="1"} 1000.5\n'
        'pipeline_scheduler_alive{model="tensorrt_llm",version="1"} 1\n'
    )
    assert heartbeat_problem(metrics, now=1010) is None
    assert "stalled" in (heartbeat_problem(metrics, now=1100) or "")
    assert "stopped" in (heartbeat_problem(metrics.replace("} 1\n", "} 0\n"), now=1001) or "")
    assert heartbeat_problem("nv_gpu_utilization 0.5\n", now=0) is None  # GPU engines publish no beat


def test_error_bodies_parse_as_json_with_the_schema() -> None:
    response = call("POST", "/v1/completions", json={"model": "other", "prompt": "x"})
    assert response.status_code == 404 and json.loads(response.text)["error"]["code"] == "model_not_found"
