"""backend=pytorch end to end on the CPU target (the unified export of every format is in
test_unified_export.py): SmolLM2's LLM-API repository served by a real Triton with upstream's
inputs and outputs (sampling_param_*, finish and stop reasons, cumulative log prob, perf metrics,
cancellation by a stop request), the OpenAI gateway in front of it, and the benchmark through it."""

from __future__ import annotations

import itertools
import json
import queue
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline import app, artifacts, runner, validate
from pipeline.deploy import serving
from pipeline.deploy.openai.triton_stream import triton_inputs
from pipeline.stages import STAGES
from tests.conftest import cli, free_ports

QUESTION = "The capital of France is"


class Served:
    def __init__(self, endpoints: serving.Endpoints, checkpoint: Path, overrides: list[str]):
        self.endpoints, self.checkpoint, self.overrides = endpoints, checkpoint, overrides

    def generate(self, **body: Any) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(
            f"{self.endpoints.http_url}/v2/models/tensorrt_llm/generate", data=json.dumps(body).encode()
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def stream(self, **body: Any) -> list[dict[str, Any]]:
        request = urllib.request.Request(
            f"{self.endpoints.http_url}/v2/models/tensorrt_llm/generate_stream",
            data=json.dumps({**body, "streaming": True}).encode(),
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            return [json.loads(line[5:]) for line in response if line.startswith(b"data:")]


@pytest.fixture(scope="module")
def served(smollm2_workdir: Path, smollm2_adapters: dict[str, Path]) -> Iterator[Served]:
    http, grpc, metrics, gateway = free_ports(4)
    overrides = [
        f"lora.adapters=[{{name: pirate, path: {smollm2_adapters['pirate']}}}]",
        f"workdir={smollm2_workdir}",
        "target=cpu",
        "quant=none",
        "backend=pytorch",
        "quant.eval_tokens=0",
        "build.max_batch_size=8",
        "triton.exit_timeout_s=3",
        f"triton.http_port={http}",
        f"triton.grpc_port={grpc}",
        f"triton.metrics_port={metrics}",
        f"openai.port={gateway}",
    ]
    cfg = validate.load([*overrides, "until=triton_repo"])
    runner.build(cfg, STAGES)
    target = app.built_target(cfg)
    assert target.llmapi and target.entry_model == "tensorrt_llm"
    # served as `serve` serves it, with the OpenAI gateway in front; a log folder of its own: starting
    # a server reaps what earlier runs left serving from its log folder
    with serving.serving(cfg, target, smollm2_workdir / "llmapi" / "server.log", openai=True) as endpoints:
        yield Served(endpoints, target.repo / artifacts.REPO_CHECKPOINT_DIR, overrides)


@pytest.mark.slow  # a real Triton serving SmolLM2
def test_the_answer_is_the_reference_runtimes_greedy_text_with_upstreams_outputs(served: Served) -> None:
    from transformers import AutoTokenizer

    from pipeline.runtime.checkpoint import load_model
    from pipeline.runtime.generate import Request, generate

    status, body = served.generate(
        text_input=QUESTION,
        sampling_param_max_tokens=12,
        return_finish_reason=True,
        return_stop_reason=True,
        return_cumulative_logprob=True,
        sampling_param_return_perf_metrics=True,
    )
    assert status == 200, body
    tokenizer = AutoTokenizer.from_pretrained(served.checkpoint)
    ids = tokenizer.encode(QUESTION)
    (expected,) = generate(load_model(served.checkpoint), [Request(ids, 12, end_id=tokenizer.eos_token_id)])
    assert body["text_output"] == tokenizer.decode(expected.output_ids, skip_special_tokens=True)
    assert body["text_output"].startswith(" Paris")
    assert body["finish_reason"] == "length" and body["stop_reason"] == "None"
    assert body["cumulative_logprob"] < 0
    times = [body[f"{name}_time_ns"] for name in ("arrival", "first_scheduled", "first_token", "last_token")]
    assert times == sorted(times) and times[0] > 0
    assert body["kv_cache_alloc_total_blocks"] == body["kv_cache_reused_block"] + body["kv_cache_alloc_new_blocks"]
    assert 0 <= body["kv_cache_hit_rate"] <= 1 and body["total_draft_tokens"] == 0


@pytest.mark.slow  # a real Triton serving SmolLM2
def test_a_stream_sends_the_text_so_far_and_ends_with_its_finish_reason(served: Served) -> None:
    events = served.stream(text_input=QUESTION, sampling_param_max_tokens=8, return_finish_reason=True)
    texts = [e["text_output"] for e in events]
    assert len(texts) >= 5 and all(b.startswith(a) for a, b in itertools.pairwise(texts))
    assert [e["finish_reason"] for e in events[:-1]] == ["None"] * (len(events) - 1)
    assert events[-1]["finish_reason"] == "length"
    status, whole = served.generate(text_input=QUESTION, sampling_param_max_tokens=8)
    assert status == 200 and texts[-1] == whole["text_output"]


@pytest.mark.slow  # a real Triton serving SmolLM2
def test_a_stop_string_ends_the_text_before_it(served: Served) -> None:
    status, body = served.generate(
        text_input=QUESTION,
        sampling_param_max_tokens=30,
        sampling_param_stop=["."],
        return_finish_reason=True,
        return_stop_reason=True,
    )
    assert status == 200 and body["text_output"] == " Paris"
    assert body["finish_reason"] == "stop" and body["stop_reason"] == "."


@pytest.mark.slow  # a real Triton serving SmolLM2
def test_what_the_cpu_target_lacks_is_refused_by_name(served: Served) -> None:
    status, body = served.generate(text_input=QUESTION, lora_id=3, lora_name="a", lora_path="/etc")
    assert status == 400 and "lora_path /etc is outside the model repository" in body["error"]
    status, body = served.generate(text_input=QUESTION, lora_id=4)
    assert status == 400 and "LoRA adapter 4 is not loaded: send its lora_path with the request" in body["error"]
    status, body = served.generate(text_input=QUESTION, image_url="http://x/y.png")
    assert status == 400 and "image_url: multimodal prompts are not available on the CPU target" in body["error"]
    status, body = served.generate(text_input=QUESTION, sampling_param_temperature=float("nan"))
    assert status == 400 and "temperature" in body["error"]


@pytest.mark.slow  # a real Triton serving SmolLM2
def test_a_stop_request_with_the_same_id_cancels_the_running_request(served: Served) -> None:
    import tritonclient.grpc as grpcclient

    received: queue.Queue[Any] = queue.Queue()
    client = grpcclient.InferenceServerClient(served.endpoints.grpc_url)
    client.start_stream(callback=lambda result, error: received.put(error or result))
    started = time.monotonic()
    try:
        long = {"text_input": "Count from one to one thousand:", "sampling_param_max_tokens": 400, "streaming": True}
        client.async_stream_infer(
            "tensorrt_llm", triton_inputs({**long, "return_finish_reason": True}, batched=False), request_id="long-1"
        )
        first = received.get(timeout=60)
        assert not isinstance(first, Exception), first
        status, body = served.generate(text_input="x", stop=True)  # a stop request without an id
        assert status == 400 and "A request id must be provided" in body["error"]
        answers: queue.Queue[Any] = queue.Queue()
        stop_client = grpcclient.InferenceServerClient(served.endpoints.grpc_url)
        stop_client.start_stream(callback=lambda result, error: answers.put(error or result))
        try:
            stop_client.async_stream_infer(
                "tensorrt_llm", triton_inputs({"text_input": "", "stop": True}, batched=False), request_id="long-1"
            )
            answer = answers.get(timeout=60)
        finally:
            stop_client.stop_stream()
            stop_client.close()
        assert "Request cancelled by client" in str(answer)  # upstream answers the stop request so
        last = first
        while not last.get_response().parameters["triton_final_response"].bool_param:
            last = received.get(timeout=60)
            assert not isinstance(last, Exception), last
        assert last.as_numpy("finish_reason")[0].decode() == "cancelled"
        assert time.monotonic() - started < 30  # 400 tokens would take far longer
    finally:
        client.stop_stream()
        client.close()


@pytest.mark.slow  # a real Triton serving SmolLM2
def test_bench_measures_the_llmapi_model_over_grpc(served: Served, smollm2_workdir: Path) -> None:
    result = cli(
        "bench",
        f"url={served.endpoints.grpc_url}",
        *served.overrides,
        "benchmark.concurrency=[2]",
        "benchmark.requests_per_point=2",
        "benchmark.warmup_requests=0",
        "workload.output_tokens=4",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    table = max(smollm2_workdir.glob("bench/*/benchmark.json"), key=lambda p: p.stat().st_mtime)
    (point,) = json.loads(table.read_text())
    assert point["load"] == "c=2" and point["successful"] == 2 and 1 <= point["output_tokens_mean"] <= 4
    client = json.loads((table.parent / artifacts.CLIENT_JSON).read_text())
    assert "LLM-API model inputs" in client["client"]


@pytest.fixture(scope="module")
def client(served: Served) -> Any:
    from openai import OpenAI

    assert served.endpoints.openai_url is not None
    return OpenAI(base_url=served.endpoints.openai_url, api_key="unused", max_retries=0)


CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow  # a real Triton serving SmolLM2, the gateway in front
def test_the_gateway_serves_the_llmapi_model_as_it_serves_the_engine_path(client: Any, served: Served) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(served.checkpoint)
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(model=model, messages=CHAT, temperature=0)
    answer = reply.choices[0].message.content
    assert answer == "The capital of France is Paris." and reply.choices[0].finish_reason == "stop"  # as test_gateway
    assert reply.usage.prompt_tokens == len(tokenizer.apply_chat_template(CHAT, add_generation_prompt=True))
    assert reply.usage.completion_tokens == len(tokenizer.encode(answer, add_special_tokens=False))
    chunks = list(
        client.chat.completions.create(
            model=model, messages=CHAT, temperature=0, stream=True, stream_options={"include_usage": True}, max_tokens=4
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (
        streamed == "The capital of France"
        and [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    )
    assert chunks[-1].usage.completion_tokens == 4
    cut = client.chat.completions.create(model=model, messages=CHAT, stop=["Paris", "Lyon"], temperature=0)
    assert cut.choices[0].message.content == "The capital of France is " and cut.choices[0].finish_reason == "stop"
    plain = client.completions.create(model=model, prompt=QUESTION, max_tokens=3, temperature=0)
    assert plain.choices[0].text.startswith(" Paris") and plain.usage.completion_tokens == 3


@pytest.mark.slow  # a real Triton serving SmolLM2, the gateway in front
def test_n_choices_are_seeded_requests_and_a_json_schema_shapes_the_answer(client: Any) -> None:
    import jsonschema

    asked = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 6}
    both = client.chat.completions.create(**asked, n=2, seed=5, temperature=1.0)
    alone = [client.chat.completions.create(**asked, seed=seed, temperature=1.0) for seed in (5, 6)]
    assert [c.message.content for c in both.choices] == [r.choices[0].message.content for r in alone]
    assert both.usage.completion_tokens == 12
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}}, "required": ["city"]}
    shaped = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
        max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
        temperature=0,
    )
    jsonschema.validate(json.loads(shaped.choices[0].message.content), schema)


@pytest.mark.slow  # a real Triton serving SmolLM2, the gateway in front
def test_what_the_llmapi_layout_has_no_input_for_is_a_400_naming_it(client: Any) -> None:
    import openai

    for extra, needle in (({"logprobs": True}, "logprobs"), ({"extra_body": {"ignore_eos": True}}, "ignore_eos")):
        with pytest.raises(openai.BadRequestError, match=needle):
            client.chat.completions.create(model="smollm2-135m", messages=CHAT, max_tokens=2, **extra)
    assert client.chat.completions.create(model="smollm2-135m", messages=CHAT, max_tokens=2).choices  # serves on


@pytest.mark.slow  # a real Triton serving SmolLM2, the gateway in front
def test_an_adapter_is_served_by_name_through_the_llm_apis_lora_request(client: Any, served: Served) -> None:
    """The gateway names the adapter as the LLM API's LoRARequest does (lora_id, lora_name and
    lora_path, PEFT's folder in the repository); the answer is the engine path's, PEFT's own."""
    ids = [m.id for m in client.models.list().data]
    assert ids == ["smollm2-135m", "pirate"]
    asked = [{"role": "user", "content": "What is the capital of Lebanon?"}]
    adapted = client.chat.completions.create(model="pirate", messages=asked, temperature=0, max_tokens=12)
    base = client.chat.completions.create(model="smollm2-135m", messages=asked, temperature=0, max_tokens=12)
    assert adapted.model == "pirate" and adapted.choices[0].message.content.startswith("Ahoy!")
    assert not base.choices[0].message.content.startswith("Ahoy!")
