"""A real Triton (the tritonserver of nvidia-pytriton) serving the CPU repository of SmolLM2 over
HTTP and gRPC: answers, streaming, batching of concurrent requests, bad requests, clean shutdown."""

from __future__ import annotations

import json
import queue
import re
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from benchmarks import soak
from pipeline.deploy.openai.triton_stream import triton_inputs
from pipeline.runtime.checkpoint import load_model
from pipeline.runtime.generate import Request, generate
from tests.conftest import cli
from tests.integration.conftest import Served

QUESTION = "What is the capital of France?"
pytestmark = pytest.mark.slow


def _reference_answer(served: Served, max_tokens: int) -> str:
    model = load_model(served.final / "repository" / "tensorrt_llm" / "1" / "engine")
    (result,) = generate(model, [Request(served.chat_ids(QUESTION), max_tokens, end_id=served.tokenizer.eos_token_id)])
    return served.tokenizer.decode(result.output_ids, skip_special_tokens=True)


def test_http_generate_equals_the_reference_runtime(served: Served) -> None:
    answer = served.generate(text_input=QUESTION, max_tokens=20)["text_output"]
    assert answer == _reference_answer(served, 20) == "The capital of France is Paris."
    assert served.generate("tensorrt_llm_bls", text_input=QUESTION, max_tokens=20)["text_output"] == answer


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_penalties_and_min_tokens_reach_the_engine(served: Served, model: str) -> None:
    plain = served.generate(model, text_input=QUESTION, max_tokens=12)["text_output"]
    held = served.generate(model, text_input=QUESTION, max_tokens=12, min_tokens=12)["text_output"]
    assert plain == "The capital of France is Paris." and held.startswith(plain) and len(held) > len(plain)
    for penalty in ({"repetition_penalty": 2.0}, {"presence_penalty": 10.0}, {"frequency_penalty": 10.0}):
        assert served.generate(model, text_input=QUESTION, max_tokens=6, **penalty)["text_output"] != plain, penalty


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_http_generate_stream_sends_one_event_per_token(served: Served, model: str) -> None:
    status, body = served.post(
        f"/v2/models/{model}/generate_stream", {"text_input": QUESTION, "max_tokens": 20, "stream": True}
    )
    assert status == 200, body
    events = [json.loads(line[len("data: ") :]) for line in body.splitlines() if line.startswith("data: ")]
    assert len(events) >= 5
    assert "".join(e["text_output"] for e in events) == "The capital of France is Paris."


NON_ASCII_PROMPTS = ["Write the word 'hello' in Japanese and in Chinese.", "Reply with three emoji about the sea."]


def test_streamed_pieces_concatenate_to_the_unstreamed_text(served: Served) -> None:
    """Through the BLS model, characters of several tokens (CJK, emoji) are never split into
    U+FFFD between two pieces (the ensemble cannot: postprocessing.py says why)."""
    model = "tensorrt_llm_bls"
    outputs = []
    for prompt in NON_ASCII_PROMPTS:
        whole = served.generate(model, text_input=prompt, max_tokens=16)["text_output"]
        status, body = served.post(
            f"/v2/models/{model}/generate_stream", {"text_input": prompt, "max_tokens": 16, "stream": True}
        )
        assert status == 200, body
        pieces = [
            json.loads(line[len("data: ") :])["text_output"] for line in body.splitlines() if line.startswith("data: ")
        ]
        # a character cut by max_tokens is held back until the end, then flushed as the whole text shows it
        assert "".join(pieces) == whole and not any("\ufffd" in p for p in pieces[:-1])
        outputs.append(whole)
    assert any(not text.isascii() for text in outputs), outputs  # the prompts did produce such characters
    # the ensemble, decoding piece by piece as upstream's does, splits at least one of them
    split = [
        served.post("/v2/models/ensemble/generate_stream", {"text_input": p, "max_tokens": 16, "stream": True})[1]
        for p in NON_ASCII_PROMPTS
    ]
    assert any("\\ufffd" in body or "\ufffd" in body for body in split)


def test_grpc_streaming_through_tritonclient(served: Served) -> None:
    import tritonclient.grpc as grpcclient

    received: queue.Queue[Any] = queue.Queue()
    client = grpcclient.InferenceServerClient(served.server.grpc_url)
    inputs = [
        grpcclient.InferInput("text_input", [1, 1], "BYTES"),
        grpcclient.InferInput("max_tokens", [1, 1], "INT32"),
        grpcclient.InferInput("stream", [1, 1], "BOOL"),
    ]
    inputs[0].set_data_from_numpy(np.array([[QUESTION.encode()]], dtype=object))
    inputs[1].set_data_from_numpy(np.array([[20]], dtype=np.int32))
    inputs[2].set_data_from_numpy(np.array([[True]]))
    client.start_stream(callback=lambda result, error: received.put(error or result))
    try:
        client.async_stream_infer("ensemble", inputs, request_id="1", enable_empty_final_response=True)
        pieces = []
        while True:
            item = received.get(timeout=120)
            assert not isinstance(item, Exception), item
            if item.get_response().parameters["triton_final_response"].bool_param:
                break
            pieces.append(item.as_numpy("text_output").reshape(-1)[0].decode())
    finally:
        client.stop_stream()
        client.close()
    assert len(pieces) >= 5 and "".join(pieces) == "The capital of France is Paris."


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_a_request_of_two_prompts_answers_each_by_batch_index(served: Served, model: str) -> None:
    """Upstream's clients may send several prompts in one request (batch size 2): each prompt's
    answer comes with its batch_index, equal to what the prompt gets alone."""
    import tritonclient.grpc as grpcclient

    prompts = [QUESTION, "What is the capital of Italy?"]
    alone = [
        served.generate(model, text_input=prompts[0], max_tokens=8)["text_output"],
        served.generate(model, text_input=prompts[1], max_tokens=8, bad_words="Rome")["text_output"],
    ]
    received: queue.Queue[Any] = queue.Queue()
    client = grpcclient.InferenceServerClient(served.server.grpc_url)
    values = {
        "text_input": (np.array([[p.encode()] for p in prompts], dtype=object), "BYTES"),
        "max_tokens": (np.array([[8], [8]], dtype=np.int32), "INT32"),
        "bad_words": (np.array([[b""], [b"Rome"]], dtype=object), "BYTES"),
        "stream": (np.array([[False], [False]]), "BOOL"),
    }
    inputs = []
    for name, (array, dtype) in values.items():
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    client.start_stream(callback=lambda result, error: received.put(error or result))
    answers: dict[int, str] = {}
    try:
        client.async_stream_infer(model, inputs, request_id="two", enable_empty_final_response=True)
        while True:
            item = received.get(timeout=120)
            assert not isinstance(item, Exception), item
            if item.as_numpy("text_output") is not None:  # the final response may carry the last answer
                row = int(item.as_numpy("batch_index").reshape(-1)[0])
                answers[row] = answers.get(row, "") + item.as_numpy("text_output").reshape(-1)[0].decode()
            if item.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        client.stop_stream()
        client.close()
    assert answers == {0: alone[0], 1: alone[1]}, (answers, alone)


def test_a_request_joins_the_running_batch_and_leaves_before_a_long_one(served: Served) -> None:
    """In-flight batching: a short request sent while a long one streams is admitted at the next step
    and answered while the long one is still generating (run to completion would make it wait).
    Event-driven, not timed: the short one goes out once the long one's first token has arrived, and
    the long one ignores the end token so it cannot finish early on a fast machine."""
    first_token, short_done = threading.Event(), threading.Event()
    tokens_after_short: list[str] = []
    body = {"text_input": "Count from one to one hundred.", "max_tokens": 64, "stream": True, "end_id": -1}
    request = urllib.request.Request(
        f"{served.server.url}/v2/models/ensemble/generate_stream", data=json.dumps(body).encode()
    )

    def stream_long() -> None:
        with urllib.request.urlopen(request, timeout=120) as response:
            for line in response:
                if line.startswith(b"data:"):
                    first_token.set()
                    if short_done.is_set():
                        tokens_after_short.append(line.decode())

    long = threading.Thread(target=stream_long)
    long.start()
    assert first_token.wait(timeout=120)
    served.generate(text_input="Count from one to one hundred (short).", max_tokens=4)
    short_done.set()
    long.join(timeout=120)
    assert tokens_after_short, "the short request waited for the long one to finish"


def test_prompts_sharing_a_prefix_reuse_cached_blocks_and_report_perf_metrics(served: Served) -> None:
    """Sent straight to the engine model with return_perf_metrics: the second prompt starts with the
    first one's system prompt (over 2 blocks of 32 tokens) and reuses its cached blocks."""
    system = f"You are assistant {time.time_ns()}. " + "Answer briefly, in plain words, and never use lists. " * 6
    metrics = []
    for question in (QUESTION, "What is the capital of Italy?"):
        ids = served.chat_ids(question, system)
        body = {"input_ids": ids, "input_lengths": len(ids), "request_output_len": 4, "return_perf_metrics": True}
        status, text = served.post("/v2/models/tensorrt_llm/generate", body)
        assert status == 200, text
        reply = json.loads(text)
        metrics.append(
            {k: np.ravel(v)[0] for k, v in reply.items() if k.startswith(("kv_cache", "arrival", "first", "last"))}
        )
    first, second = metrics
    assert first["kv_cache_reused_blocks"] == 0 and second["kv_cache_reused_blocks"] >= 2, metrics
    assert (
        second["kv_cache_alloc_total_blocks"] == second["kv_cache_reused_blocks"] + second["kv_cache_alloc_new_blocks"]
    )
    for m in metrics:
        assert (
            m["arrival_time_ns"] <= m["first_scheduled_time_ns"] <= m["first_token_time_ns"] <= m["last_token_time_ns"]
        )


def test_a_cancelled_grpc_stream_leaves_the_batch_and_frees_its_blocks(served: Served) -> None:
    import tritonclient.grpc as grpcclient

    ids = served.chat_ids("Count from one to one thousand.")
    values = {"input_ids": [ids], "input_lengths": [[len(ids)]], "request_output_len": [[1000]], "streaming": [[True]]}
    types = {"input_ids": np.int32, "input_lengths": np.int32, "request_output_len": np.int32, "streaming": bool}
    inputs = []
    for name, value in values.items():
        array = np.array(value, dtype=types[name])
        inputs.append(grpcclient.InferInput(name, list(array.shape), "BOOL" if array.dtype == bool else "INT32"))
        inputs[-1].set_data_from_numpy(array)
    received: queue.Queue[Any] = queue.Queue()
    client = grpcclient.InferenceServerClient(served.server.grpc_url)
    client.start_stream(callback=lambda result, error: received.put(error or result))
    before = served.log.read_text().count("request cancelled: after")
    try:
        client.async_stream_infer("tensorrt_llm", inputs, request_id="cancel-me")
        for _ in range(3):
            item = received.get(timeout=60)
            assert not isinstance(item, Exception), item
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    deadline = time.monotonic() + 10  # checked every cancellation_check_period_ms
    while served.log.read_text().count("request cancelled: after") == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert served.log.read_text().count("request cancelled: after") == before + 1
    assert served.generate(text_input=QUESTION, max_tokens=4)["text_output"]  # and the server serves on


POISONS = [
    ({"input_ids": [1, 2, 10**6]}, "outside the vocabulary"),
    ({"pad_id": -1}, "pad_id=-1 is outside the vocabulary"),
    ({"temperature": -1.0}, "temperature=-1.0 must be a finite number >= 0"),
    ({"input_ids": [1] * 2049}, "2049 input tokens exceed the engine's max_input_len=2048"),
    ({"repetition_penalty": 1e-40}, "must lie in [0.001, 1000]"),
    ({"temperature": 0.5, "frequency_penalty": -1e38}, "must lie in [-1000, 1000]"),
    ({"input_lengths": -3}, "input_lengths=-3 must lie in"),
    ({"seed": 2**64 - 1, "temperature": 1e-40, "runtime_top_p": 1.0}, None),  # greedy, in range: answered
]


def test_poisoned_requests_fail_alone_in_their_batch(served: Served) -> None:
    """Sent straight to the engine model (Triton serves every model of the repository), three bad
    requests among eight that arrive together each get their own error; the five others answer."""
    ids = served.chat_ids(QUESTION)
    good = {"input_ids": ids, "input_lengths": len(ids), "request_output_len": 8}
    bad = [{**good, **poison} for poison, _ in POISONS]
    for body, (poison, _) in zip(bad, POISONS, strict=True):
        if "input_lengths" not in poison:
            body["input_lengths"] = len(body["input_ids"])
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda body: served.post("/v2/models/tensorrt_llm/generate", body), bad + [good] * 5))
    for (status, text), (_, message) in zip(replies, POISONS, strict=False):
        assert (status == 400 and message in text) if message else status == 200, text
    answered = replies[len(POISONS) :]
    assert all(code == 200 for code, _ in answered), answered
    outputs = {tuple(json.loads(body)["output_ids"]) for _, body in answered}
    assert len(outputs) == 1 and len(next(iter(outputs))) == 8  # greedy: five identical answers


def test_a_request_whose_messages_break_preprocessing_fails_alone(served: Served) -> None:
    """JSON nested past Python's recursion limit (within the byte cap) raised out of preprocessing
    and failed every request batched with it; now it is that request's 400."""
    nested = "[" * 40_000 + "]" * 40_000
    bodies = [{"text_input": "", "messages": nested, "max_tokens": 4}] + [{"text_input": QUESTION, "max_tokens": 4}] * 4
    with ThreadPoolExecutor(5) as pool:
        replies = list(pool.map(lambda body: served.post("/v2/models/ensemble/generate", body), bodies))
    assert replies[0][0] == 400 and "recursion" in replies[0][1], replies[0]
    assert all(status == 200 for status, _ in replies[1:]), replies[1:]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"max_tokens": 20}, "missing required input(s) ['text_input']"),
        ({"text_input": QUESTION, "max_tokens": 100000}, "prompt plus max_tokens must be between"),
        ({"text_input": QUESTION, "max_tokens": "many"}, "Unable to parse"),
        ({"text_input": QUESTION, "max_tokens": 0}, "prompt plus max_tokens must be between"),
        ({"text_input": "a" * 200_000, "max_tokens": 4}, "max_input_len=2048 tokens takes at most 131072"),
    ],
)
def test_bad_requests_get_an_error_and_the_server_keeps_serving(
    served: Served, body: dict[str, Any], message: str
) -> None:
    for model in ("ensemble", "tensorrt_llm_bls"):
        status, text = served.post(f"/v2/models/{model}/generate", body)
        # Triton itself answers 500 to a JSON value of the wrong type, before any model sees it
        assert status == 500 if message == "Unable to parse" else status == 400, (model, status, text)
        assert message in json.loads(text)["error"]
    assert served.generate(text_input=QUESTION, max_tokens=4)["text_output"]


def _grpc_stream(
    served: Served, model: str, values: dict[str, Any], request_id: str = "1", extra_inputs: list[Any] | None = None
) -> list[Any]:
    """Every response of one request over a gRPC stream (the last one ends it)."""
    import tritonclient.grpc as grpcclient

    received: queue.Queue[Any] = queue.Queue()
    client = grpcclient.InferenceServerClient(served.server.grpc_url)
    client.start_stream(callback=lambda result, error: received.put(error or result))
    responses = []
    try:
        inputs = triton_inputs(values) + (extra_inputs or [])
        client.async_stream_infer(model, inputs, request_id=request_id, enable_empty_final_response=True)
        while True:
            item = received.get(timeout=120)
            if isinstance(item, Exception):
                raise item
            final = item.get_response().parameters["triton_final_response"].bool_param
            if item.get_response().outputs:
                responses.append(item)
            if final:
                return responses
    finally:
        client.stop_stream()
        client.close()


# what upstream's end-to-end client sends to the ensemble and the BLS model, beside text_input and
# max_tokens (tensorrtllm_backend's tools/inflight_batcher_llm clients)
UPSTREAM_OPTIONAL = {
    "beam_width": 1,
    "temperature": 1.0,
    "top_k": 1,
    "top_p": 0.0,
    "num_return_sequences": 1,
    "exclude_input_in_output": True,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "length_penalty": 1.0,
    "min_tokens": 1,
    "return_log_probs": True,
    "return_perf_metrics": True,
    "return_num_input_tokens": True,
    "return_num_output_tokens": True,
    "stop_words": ["Berlin"],
    "bad_words": ["London"],
    "end_id": 2,
    "pad_id": 2,
    "seed": 7,
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_a_client_written_for_upstreams_backend_is_answered(served: Served, model: str, stream: bool) -> None:
    """Every optional input upstream's clients send, over gRPC, streaming and not: the greedy answer,
    log probs, perf metrics and token counts."""
    values = {"text_input": QUESTION, "max_tokens": 12, "stream": stream, **UPSTREAM_OPTIONAL}
    if not stream:  # the same over HTTP generate
        assert served.generate(model, **values)["text_output"] == "The capital of France is Paris."
    responses = _grpc_stream(served, model, values)
    texts = [r.as_numpy("text_output") for r in responses]
    text = "".join(t.reshape(-1)[0].decode() for t in texts if t is not None)
    assert text == "The capital of France is Paris."
    last = responses[-1] if not stream else None
    if last is not None:
        generated = len(served.tokenizer.encode(text, add_special_tokens=False))  # the end token is not one
        log_probs = last.as_numpy("output_log_probs").reshape(-1)
        assert len(log_probs) == generated and np.isclose(log_probs.sum(), last.as_numpy("cum_log_probs").ravel()[0])
        assert last.as_numpy("num_output_tokens").reshape(-1)[0] == generated
        assert last.as_numpy("num_input_tokens").reshape(-1)[0] == len(served.chat_ids(QUESTION))
    final = responses[-1]
    assert final.as_numpy("kv_cache_alloc_total_blocks").reshape(-1)[0] >= 1
    assert final.as_numpy("total_draft_tokens").reshape(-1)[0] == 0


def test_the_core_model_answers_upstreams_core_client(served: Served) -> None:
    """What upstream's core-model client sends straight to tensorrt_llm, with logits asked for."""
    ids = served.chat_ids(QUESTION)
    values = {
        "input_ids": ids,
        "input_lengths": len(ids),
        "request_output_len": 8,
        "beam_width": 1,
        "temperature": 1.0,
        "streaming": False,
        "end_id": 2,
        "pad_id": 2,
        "runtime_top_k": 1,
        "runtime_top_p": 0.0,
        "return_context_logits": True,
        "return_generation_logits": True,
        "exclude_input_in_output": True,
    }
    (response,) = _grpc_stream(served, "tensorrt_llm", values)
    output = response.as_numpy("output_ids").reshape(-1).tolist()
    assert served.tokenizer.decode(output) == "The capital of France is Paris."
    vocab = len(served.tokenizer)
    context = response.as_numpy("context_logits")
    generation = response.as_numpy("generation_logits")
    assert context.shape == (1, len(ids), vocab) and generation.shape == (1, 1, len(output), vocab)
    # greedy: each output token is the argmax of its step's logits, the first one of the prompt's last
    assert generation[0, 0].argmax(-1).tolist() == output and context[0, -1].argmax() == output[0]


def test_beam_search_returns_the_beams_best_first(served: Served) -> None:
    values = {"text_input": QUESTION, "max_tokens": 10, "beam_width": 3, "return_log_probs": True}
    (response,) = _grpc_stream(served, "tensorrt_llm_bls", values)
    texts = [t.decode() for t in response.as_numpy("text_output").reshape(-1)]
    cum = response.as_numpy("cum_log_probs").reshape(-1)
    assert len(texts) == 3 and len(set(texts)) == 3 and "Paris" in texts[0], texts
    assert len(cum) == 3 and all(c <= 0 for c in cum)


def test_num_return_sequences_gives_distinct_reproducible_samples(served: Served) -> None:
    values = {"text_input": "Write a word.", "max_tokens": 8, "temperature": 1.0, "top_k": 50, "seed": 3}
    values |= {"num_return_sequences": 3, "stream": False}
    first = _grpc_stream(served, "tensorrt_llm_bls", values)
    again = _grpc_stream(served, "tensorrt_llm_bls", values)

    def texts(responses: list[Any]) -> dict[int, str]:
        return {
            int(r.as_numpy("sequence_index").reshape(-1)[0]): r.as_numpy("text_output").reshape(-1)[0].decode()
            for r in responses
        }

    assert sorted(texts(first)) == [0, 1, 2] and texts(first) == texts(again)
    assert len(set(texts(first).values())) == 3, texts(first)


def test_embedding_bias_words_steer_the_answer(served: Served) -> None:
    plain = served.generate(text_input=QUESTION, max_tokens=8)["text_output"]
    biased = served.generate(
        text_input=QUESTION, max_tokens=8, embedding_bias_words=[" Paris"], embedding_bias_weights=[-100.0]
    )["text_output"]
    assert "Paris" in plain and "Paris" not in biased, biased


@pytest.mark.parametrize(
    ("model", "extra", "message"),
    [
        ("ensemble", {"lora_task_id": 3}, "LoRA task 3 not found in cache. Please send LoRA weights with request"),
        ("ensemble", {"beam_width": 9}, "beam_width=9 must lie in 1..4 (the engine's build.max_beam_width)"),
        ("ensemble", {"beam_width": 2, "return_generation_logits": True}, "not available with beam search"),
        ("tensorrt_llm_bls", {"num_draft_tokens": 4}, "num_draft_tokens: speculative decoding"),
        ("tensorrt_llm_bls", {"image_url_input": "http://x/y.png"}, "IMAGE_URL: multimodal models are not served"),
        ("ensemble", {"prompt_vocab_size": 4}, "prompt_vocab_size: prompt tables (p-tuning) are not available"),
    ],
)
def test_what_the_cpu_target_cannot_do_is_refused_by_name(
    served: Served, model: str, extra: dict[str, Any], message: str
) -> None:
    with pytest.raises(Exception, match=re.escape(message)):
        _grpc_stream(served, model, {"text_input": QUESTION, "max_tokens": 4, **extra})


CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "country": {"type": "string", "maxLength": 24},
        "is_capital": {"type": "boolean"},
    },
    "required": ["city", "country", "is_capital"],
}


def test_guided_decoding_answers_match_the_schema_and_the_regex(served: Served) -> None:
    """The schema through the ensemble, the regex through the BLS model."""
    import jsonschema

    guided = served.generate(
        "ensemble",
        text_input="Give the capital of France as JSON.",
        max_tokens=60,
        guided_decoding_guide_type="json_schema",
        guided_decoding_guide=json.dumps(CITY_SCHEMA),
    )["text_output"]
    jsonschema.validate(json.loads(guided), CITY_SCHEMA)
    phone = served.generate(
        "tensorrt_llm_bls",
        text_input="Give me a phone number.",
        max_tokens=20,
        guided_decoding_guide_type="regex",
        guided_decoding_guide=r"[0-9]{3}-[0-9]{4}",
    )["text_output"]
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", phone), phone
    status, text = served.post(
        "/v2/models/ensemble/generate",
        {"text_input": QUESTION, "max_tokens": 4, "guided_decoding_guide_type": "xml", "guided_decoding_guide": "x"},
    )
    assert status >= 400 and "guided_decoding_guide_type='xml': use one of json, json_schema" in text, text


def test_the_engine_publishes_the_tensorrt_llm_backends_metrics(served: Served) -> None:
    """Dashboards and routers written for the TensorRT-LLM backend read its gauges by name: the
    CPU engine publishes the same families and labels, with values that add up."""
    import urllib.request

    served.generate(text_input=QUESTION, max_tokens=4)
    time.sleep(1.5)  # published every second
    with urllib.request.urlopen(served.server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if match := re.match(r"(nv_trt_llm_\w+|pipeline_\w+)\{(.*)\} (\S+)$", line):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
            assert labels["model"] == "tensorrt_llm" and labels["version"] == "1", line
            kind = labels.get("kv_cache_block_type") or labels.get("request_type") or ""
            values[f"{match.group(1)}/{kind}"] = float(match.group(3))
    blocks = "nv_trt_llm_kv_cache_block_metrics/"
    assert values[blocks + "max"] > 0 and values[blocks + "tokens_per"] == 32
    assert values[blocks + "used"] + values[blocks + "free"] == values[blocks + "max"]
    assert values[blocks + "fraction"] == pytest.approx(values[blocks + "used"] / values[blocks + "max"])
    requests = "nv_trt_llm_request_metrics/"
    assert values[requests + "max"] == served.cfg.build.max_batch_size
    assert values[requests + "active"] == values[requests + "scheduled"] + values[requests + "waiting"]
    assert values["pipeline_kv_cache_resident_bytes/"] > 0  # the request above wrote blocks
    # the scheduler's heartbeat, which the gateway's /health reads: alive, and beaten within seconds
    assert values["pipeline_scheduler_alive/"] == 1
    assert time.time() - values["pipeline_scheduler_heartbeat_seconds/"] < 10


def test_a_stop_request_cancels_the_running_request_with_its_id(served: Served) -> None:
    ids = served.chat_ids("Count from one to one thousand.")
    body = {"input_ids": ids, "input_lengths": len(ids), "request_output_len": 400}
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["responses"] = _grpc_stream(served, "tensorrt_llm", {**body, "streaming": True}, "stop-me")
        except Exception as error:  # the cancelled request ends with an error
            outcome["error"] = error

    started = time.monotonic()
    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(1.5)
    stop = {"input_ids": ids, "input_lengths": len(ids), "request_output_len": 1, "stop": True}
    assert _grpc_stream(served, "tensorrt_llm", stop, "stop-me") == []
    thread.join(timeout=60)
    assert "request cancelled" in str(outcome.get("error")) and time.monotonic() - started < 30


def test_bench_command_measures_a_running_server(served: Served, smollm2_workdir: Path) -> None:
    overrides = [o for o in served.overrides if not o.startswith("until=")]
    result = cli(
        "bench",
        f"url={served.server.grpc_url}",
        *overrides,
        "benchmark.concurrency=[2]",
        "benchmark.requests_per_point=2",
        "benchmark.warmup_requests=0",
        "workload.output_tokens=4",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    table = max(smollm2_workdir.glob("bench/*/benchmark.json"), key=lambda p: p.stat().st_mtime)
    (point,) = json.loads(table.read_text())
    assert point["load"] == "c=2" and point["successful"] == 2 and point["output_tokens_mean"] == 4


def test_a_short_soak_with_a_burst_of_dropped_streams(served: Served) -> None:
    """A short soak (``make soak`` runs the 5-minute one): concurrent streams with cancellations
    and a burst of streams dropped as soon as they are sent. Nothing fails that was not cancelled
    or refused, the server survives it and its threads do not grow."""
    # the burst comes early, so that probes go on after it; idle request threads of the BLS pool
    # end after 3 s, before the server is measured again
    result = soak.run(served.server, seconds=3, streams=8, burst=40, settle_s=4, burst_after_s=1)
    assert served.server.alive(), served.log.read_text()[-2000:]
    assert result["errors"] == 0, result["error_examples"]
    assert result["completed"] > 0
    assert result["checks"]["threads do not grow (< 10%)"], result["server_threads"]
    assert result["probes"] > 0


def test_a_lora_adapter_sent_as_upstreams_clients_send_it_answers_as_the_reference_runtime(served: Served) -> None:
    """lora_task_id with lora_weights and lora_config (the backend's layout) on first use, then the
    task id alone: each answer is the reference runtime's with that adapter, and not the base's."""
    import tritonclient.grpc as grpcclient

    from pipeline.runtime import lora
    from pipeline.runtime.scheduler import Scheduler, SchedulerConfig

    model = load_model(served.final / "repository" / "tensorrt_llm" / "1" / "engine")
    generator = torch.Generator().manual_seed(0)
    weights = {}
    for layer in range(len(model.model.layers)):  # rank 2 on q and v: a visible change
        for module, out in (("q_proj", 576), ("v_proj", 192)):
            a = torch.randn(2, 576, generator=generator) * 0.2
            weights[(layer, module)] = (a, torch.randn(out, 2, generator=generator) * 0.2)
    sent_weights, sent_config = lora.to_backend_tensors(lora.Adapter("x", 2, frozenset({"q_proj", "v_proj"}), weights))
    adapter = lora.from_backend_tensors("41", sent_weights, sent_config, model)  # what the server gets, in fp16
    ids = served.chat_ids(QUESTION)
    scheduler = Scheduler(model, SchedulerConfig(max_batch_size=2, max_num_tokens=256, kv_cache_tokens=1024))
    expected: list[int] = []
    done = threading.Event()
    scheduler.submit(
        Request(ids, 8, end_id=served.tokenizer.eos_token_id, adapter=adapter),
        lambda token, _: expected.append(token),
        lambda _result: done.set(),
        lambda error: pytest.fail(error),
    )
    while not done.is_set():
        scheduler.step()
    values = {"input_ids": ids, "input_lengths": len(ids), "request_output_len": 8, "end_id": 2, "pad_id": 2,
              "exclude_input_in_output": True, "lora_task_id": 41}  # fmt: skip
    lora_inputs = []
    for name, array in (("lora_weights", sent_weights.numpy()), ("lora_config", sent_config.numpy())):
        tensor = grpcclient.InferInput(name, list(array.shape), "FP16" if name == "lora_weights" else "INT32")
        tensor.set_data_from_numpy(array)
        lora_inputs.append(tensor)
    first = _grpc_stream(served, "tensorrt_llm", values, extra_inputs=lora_inputs)
    again = _grpc_stream(served, "tensorrt_llm", values)  # the task id alone: the kept adapter
    base = _grpc_stream(served, "tensorrt_llm", {k: v for k, v in values.items() if k != "lora_task_id"})
    answers = [_output_ids(responses) for responses in (first, again, base)]
    assert answers[0] == answers[1] == expected[: len(answers[0])] and answers[0] != answers[2]


def _output_ids(responses: list[Any]) -> list[int]:
    return [t for response in responses for t in response.as_numpy("output_ids").reshape(-1).tolist()]
