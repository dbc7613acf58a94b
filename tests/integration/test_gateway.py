"""The OpenAI-compatible gateway over a real Triton serving SmolLM2 on the CPU target, driven by the
real ``openai`` client and by raw HTTP (SSE framing, error bodies, disconnects)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.artifacts import REPO_ENGINE_DIR
from pipeline.config.schema import OpenAIConfig
from pipeline.deploy.openai import serve as gateway
from tests.conftest import cli, free_ports
from tests.integration.conftest import Served

pytestmark = pytest.mark.slow
QUESTION = "What is the capital of France?"
MODEL = "smollm2-135m"
KEY = "sk-test-gateway-key-0123"


@pytest.fixture(scope="module")
def api(served: Served) -> Iterator[str]:
    (port,) = free_ports(1)
    config = OpenAIConfig(port=port)
    repository = served.final / "repository"
    settings = gateway.settings_for(config, repository, MODEL, served.server.grpc_url, served.server.metrics_url)
    running = gateway.start(config, "127.0.0.1", settings)
    yield running.url
    running.stop()


@pytest.fixture(scope="module")
def client(api: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=api, api_key="unused", max_retries=0)


def _post(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_models_chat_and_usage_counts(client: Any, served: Served) -> None:
    card, *_adapters = client.models.list().data  # the base model first, then its LoRA adapters
    assert card.id == MODEL and card.max_model_len == served.cfg.build.max_seq_len
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}], temperature=0)
    answer = reply.choices[0].message.content
    assert answer == "The capital of France is Paris." and reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens == len(served.chat_ids(QUESTION))
    assert reply.usage.completion_tokens == len(served.tokenizer.encode(answer, add_special_tokens=False))
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"


def test_streaming_chat_equals_the_whole_answer_and_reports_usage(client: Any) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}],
        stream=True,
        stream_options={"include_usage": True},
        temperature=0,
        max_tokens=16,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=16,
    )
    assert text == whole.choices[0].message.content and text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_continue_raw_text_and_stop_strings_cut_it(client: Any) -> None:
    plain = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert plain.choices[0].text.lstrip().startswith("Paris"), plain.choices[0].text
    assert plain.choices[0].finish_reason == "length" and plain.usage.completion_tokens == 8
    cut = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], stop=["Paris", "Lyon"], temperature=0
    )
    assert cut.choices[0].message.content == "The capital of France is " and cut.choices[0].finish_reason == "stop"


def test_n_choices_with_a_seed_and_json_schema_output(client: Any) -> None:
    import jsonschema

    asked = {"model": MODEL, "messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 8}
    first = client.chat.completions.create(**asked, n=2, seed=5, temperature=1.0)
    again = client.chat.completions.create(**asked, n=2, seed=5, temperature=1.0)
    texts = [c.message.content for c in first.choices]
    assert len(texts) == 2 and texts == [c.message.content for c in again.choices]
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}}, "required": ["city"]}
    shaped = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
        max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
        temperature=0,
    )
    jsonschema.validate(json.loads(shaped.choices[0].message.content), schema)


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
        ({"model": MODEL, "messages": []}, 400, "messages"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, 400, "top_logprobs"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 400, "max_seq_len"),
    ],
)
def test_errors_come_as_openai_error_objects(api: str, body: dict[str, Any], status: int, needle: str) -> None:
    code, text = _post(f"{api}/chat/completions", {**body, "unknown_field": 1})  # unknown fields are ignored
    assert code == status, text
    error = json.loads(text)["error"]
    assert needle in error["message"] and error["type"] in ("invalid_request_error", "server_error"), error


def test_sse_framing_metrics_and_health(api: str) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6, "stream": True}
    status, text = _post(f"{api}/completions", body)
    events = [line for line in text.split("\n\n") if line]
    assert status == 200 and all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: ") :])["choices"][0]["finish_reason"] == "length"
    base = api.removesuffix("/v1")
    with urllib.request.urlopen(f"{base}/metrics") as response:
        metrics = response.read().decode()
    assert "pipeline_time_to_first_token_seconds_count" in metrics and "pipeline_e2e_request_latency_seconds" in metrics
    with urllib.request.urlopen(f"{base}/health") as response:
        assert json.loads(response.read())["status"] == "ok"


def test_a_client_that_disconnects_cancels_its_triton_request(api: str, served: Served) -> None:
    import http.client

    before = served.log.read_text().count("request cancelled: after")
    host, port = api.removeprefix("http://").removesuffix("/v1").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count to one thousand."}], "max_tokens": 400}
    connection.request(
        "POST", "/v1/chat/completions", json.dumps({**body, "stream": True}), {"content-type": "application/json"}
    )
    response = connection.getresponse()
    assert response.status == 200
    received = b""
    while received.count(b'"content"') < 3:  # the role, then two tokens: the request is generating
        received += response.read1(4096)
    response.close()
    connection.close()
    # the BLS notices at the engine's next response; on a loaded 2-core host that can take a while
    deadline = time.monotonic() + 40
    while served.log.read_text().count("request cancelled: after") == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert served.log.read_text().count("request cancelled: after") == before + 1


def test_a_non_streamed_request_whose_client_left_is_cancelled(api: str, served: Served) -> None:
    """uvicorn does not cancel a handler whose client left: the gateway watches for the disconnect
    and cancels the generation (a timed-out SDK call would otherwise run on, and be retried)."""
    import socket

    before = served.log.read_text().count("request cancelled: after")
    host, port = api.removeprefix("http://").removesuffix("/v1").split(":")
    body = json.dumps({"model": MODEL, "prompt": "Count:", "max_tokens": 400, "ignore_eos": True}).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(1.5)  # the request is generating
    deadline = time.monotonic() + 40
    while served.log.read_text().count("request cancelled: after") == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert served.log.read_text().count("request cancelled: after") == before + 1


def test_a_request_past_its_deadline_is_a_504_within_seconds(served: Served) -> None:
    (port,) = free_ports(1)
    config = OpenAIConfig(port=port, request_timeout_s=1.0)
    settings = gateway.settings_for(config, served.final / "repository", MODEL, served.server.grpc_url)
    running = gateway.start(config, "127.0.0.1", settings)
    try:
        started = time.monotonic()
        body = {"model": MODEL, "prompt": "Count:", "max_tokens": 400, "ignore_eos": True}
        status, text = _post(f"{running.url}/completions", body)
        assert status == 504 and json.loads(text)["error"]["code"] == "timeout", text
        assert time.monotonic() - started < 10
    finally:
        running.stop()


def test_an_api_key_is_required_when_set(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    (port,) = free_ports(1)
    config = OpenAIConfig(port=port, api_key_env="TEST_GATEWAY_KEY")
    monkeypatch.setenv("TEST_GATEWAY_KEY", KEY)
    repository = served.final / "repository"
    settings = gateway.settings_for(config, repository, MODEL, served.server.grpc_url, served.server.metrics_url)
    running = gateway.start(config, "127.0.0.1", settings)
    try:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
        status, text = _post(f"{running.url}/completions", body)
        assert status == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
        assert _post(f"{running.url}/completions", body, {"authorization": f"Bearer {KEY}"})[0] == 200
    finally:
        running.stop()


def test_bench_of_the_openai_endpoint_with_aiperf_is_a_run_compare_lists(
    api: str, served: Served, smollm2_workdir: Path
) -> None:
    """``bench benchmark.endpoint=openai`` measures the gateway like any OpenAI server, AIPerf
    measures the same point after it, and the run sits in the MLflow store beside the builds."""
    overrides = [o for o in served.overrides if not o.startswith("until=")]
    load = ["benchmark.concurrency=[1]", "benchmark.requests_per_point=2", "benchmark.warmup_requests=0"]
    result = cli(
        "bench",
        f"url={api}",
        *overrides,
        *load,
        "workload.output_tokens=4",
        "benchmark.endpoint=openai",
        "benchmark.tool=aiperf",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    folder = max(smollm2_workdir.glob("bench/*/"), key=lambda p: p.stat().st_mtime)
    (point,) = json.loads((folder / "benchmark.json").read_text())
    assert point["successful"] == 2 and point["output_tokens_mean"] == 4  # ignore_eos reached the engine
    assert point["aiperf_output_tokens_per_s"] > 0 and "aiperf_diff_pct_ttft_ms_p50" in point
    listed = cli("compare", *overrides, "filter=tags.pipeline.command = 'bench'")
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if "openai" in line)
    assert api in row and MODEL in row
    assert "tensorrt" not in row  # a bench of a server names no backend it cannot know


def test_a_tiny_temperature_is_answered_and_the_engine_serves_on(api: str) -> None:
    """temperature=1e-40 once stopped the CPU engine's scheduler for good while health stayed green."""
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "top_p": 1}
    tiny_status, tiny = _post(f"{api}/completions", {**body, "temperature": 1e-40, "seed": 2**64 - 1, "n": 2})
    greedy_status, greedy = _post(f"{api}/completions", {**body, "temperature": 0})
    assert tiny_status == 200 and greedy_status == 200, (tiny, greedy)
    texts = {choice["text"] for choice in json.loads(tiny)["choices"]}
    assert texts == {json.loads(greedy)["choices"][0]["text"]}  # a tiny temperature is greedy
    with urllib.request.urlopen(f"{api.removesuffix('/v1')}/health") as response:
        assert json.loads(response.read())["status"] == "ok"


def test_echo_with_logprobs_scores_the_prompt_as_the_reference_runtime_does(
    client: Any, api: str, served: Served
) -> None:
    """What evaluation harnesses send for multiple-choice tasks: token ids, echo, logprobs, one
    token. Every prompt token's log probability is the reference runtime's own, to float tolerance."""
    import torch

    from pipeline.runtime.checkpoint import load_model

    ids = served.tokenizer.encode("The capital of France is Paris", add_special_tokens=False)
    reply = client.completions.create(model=MODEL, prompt=[ids, ids[:3]], max_tokens=1, logprobs=1, echo=True)
    first = reply.choices[0]
    assert first.text.startswith("The capital of France is Paris") and len(reply.choices) == 2
    with torch.no_grad():  # the reference runtime's model on the served checkpoint, in this process
        logits = load_model(served.final / "repository" / REPO_ENGINE_DIR)(torch.tensor([ids])).logits[0]
    rows = logits.double().log_softmax(-1)
    expected = [rows[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert first.logprobs.token_logprobs[0] is None
    assert first.logprobs.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=1e-3)
    assert first.logprobs.tokens[: len(ids)] == [served.tokenizer.decode([i]) for i in ids]
    # the greedy token at each position is among the top ones, so a harness can tell greedy answers
    assert all(
        max(top.values()) >= lp
        for top, lp in zip(first.logprobs.top_logprobs[1:], first.logprobs.token_logprobs[1:], strict=True)
    )
    assert reply.usage.prompt_tokens == len(ids) + 3
    status, body = _post(f"{api}/completions", {"model": MODEL, "prompt": "x", "echo": True, "stream": True})
    assert status == 400 and "echo" in body


def test_an_engine_side_refusal_reaches_the_client_through_the_bls_as_429_or_503(smollm2_workdir: Path) -> None:
    """One sequence at a time, one waiting, a second's queue timeout: of three requests at once one
    is answered, one waits past the timeout (503) and one finds the queue full (429), in seconds,
    through the BLS model and the gateway (an error the engine sends does reach the BLS model's
    iterator in Triton 2.51); the server serves on."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline import app, runner, validate
    from pipeline.deploy import server
    from pipeline.stages import STAGES

    http, grpc, metrics, port = free_ports(4)
    overrides = [
        f"workdir={smollm2_workdir}",
        "target=cpu",
        "quant=none",
        "triton=bls",
        "build.max_batch_size=1",
        "triton.max_queue_size=1",
        "triton.queue_timeout_ms=1000",
        "triton.exit_timeout_s=3",
        "until=triton_repo",
        f"triton.http_port={http}",
        f"triton.grpc_port={grpc}",
        f"triton.metrics_port={metrics}",
    ]
    cfg = validate.load(overrides)
    runner.build(cfg, STAGES)
    target = app.built_target(cfg)
    launch = server.launch_for(cfg.triton, target.repo, False, 1, smollm2_workdir)
    with server.Server(launch, cfg.triton, smollm2_workdir / "refusal-server.log") as running:
        config = OpenAIConfig(port=port)
        settings = gateway.settings_for(config, target.repo, MODEL, running.grpc_url, running.metrics_url)
        api = gateway.start(config, "127.0.0.1", settings)
        try:
            body = {"model": MODEL, "prompt": "Count:", "max_tokens": 48, "ignore_eos": True, "temperature": 0}

            def send(delay: float) -> tuple[int, str, float]:
                time.sleep(delay)
                started = time.monotonic()
                status, text = _post(f"{api.url}/completions", body)
                return status, text, time.monotonic() - started

            with ThreadPoolExecutor(3) as pool:
                results = list(pool.map(send, [0.0, 0.3, 0.6]))
            statuses = sorted(status for status, _, _ in results)
            assert statuses == [200, 429, 503], results
            for status, text, took in results:
                if status != 200:
                    error = json.loads(text)["error"]
                    assert error["code"] in ("queue_full", "unavailable") and took < 10, (status, text, took)
            after_status, _ = _post(f"{api.url}/completions", {**body, "max_tokens": 2})
            assert after_status == 200
        finally:
            api.stop()


def _peft_greedy(checkpoint: Path, adapter: Path, question: str, max_tokens: int) -> str:
    """PEFT's own greedy answer with ``adapter`` on the base checkpoint (float32)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter)
    chat = [{"role": "user", "content": question}]
    ids = torch.tensor([tokenizer.apply_chat_template(chat, add_generation_prompt=True)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
    return str(tokenizer.decode(out[0][ids.shape[1] :], skip_special_tokens=True))


ADAPTED_QUESTION = "What is the capital of Lebanon?"  # a country the pirate adapter was not trained on


def test_adapters_are_listed_beside_the_base_and_answer_as_peft_does(
    client: Any, api: str, served: Served, smollm2_adapters: dict[str, Path], smollm2_workdir: Path
) -> None:
    from tests.integration.conftest import smollm2_checkpoint

    listed = client.models.list().data
    assert [m.id for m in listed] == [MODEL, "pirate", "noisy"]
    assert all(m.parent == MODEL and m.root == m.id for m in listed[1:])  # vLLM's fields; no server path
    chat = [{"role": "user", "content": ADAPTED_QUESTION}]
    reply = client.chat.completions.create(model="pirate", messages=chat, temperature=0, max_tokens=12)
    answer = reply.choices[0].message.content
    assert reply.model == "pirate" and answer.startswith("Ahoy!")
    peft_answer = _peft_greedy(smollm2_checkpoint(smollm2_workdir), smollm2_adapters["pirate"], ADAPTED_QUESTION, 12)
    assert answer == peft_answer
    status, text = _post(f"{api}/chat/completions", {"model": "pirat", "messages": chat})
    error = json.loads(text)["error"]
    assert status == 404 and error["code"] == "model_not_found" and "'pirate', 'noisy'" in error["message"]


def test_a_mixed_batch_gives_each_request_its_adapter_or_none(client: Any) -> None:
    """Base, pirate and noisy requests at once, twice over: each answer is the one it gets alone.
    The engine keeps one adapter (lora.cache_adapters=1), so the gateway sends the other's weights
    again when the engine says it is not loaded."""
    from concurrent.futures import ThreadPoolExecutor

    questions = [ADAPTED_QUESTION, "Name a large animal."]
    cases = [(model, q) for q in questions for model in (MODEL, "pirate", "noisy")]

    def ask(case: tuple[str, str]) -> str:
        messages = [{"role": "user", "content": case[1]}]
        reply = client.chat.completions.create(model=case[0], messages=messages, temperature=0, max_tokens=10)
        return str(reply.choices[0].message.content)

    alone = [ask(case) for case in cases]
    with ThreadPoolExecutor(len(cases)) as pool:
        together = list(pool.map(ask, cases))
    assert together == alone
    answers = {
        model: [a for (m, _), a in zip(cases, alone, strict=True) if m == model] for model in (MODEL, "pirate", "noisy")
    }
    assert all(a.startswith("Ahoy!") for a in answers["pirate"])
    assert not any(a.startswith("Ahoy!") for a in answers[MODEL]) and answers["noisy"] != answers[MODEL]
