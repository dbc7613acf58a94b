"""In-flight batching in the reference runtime (``pipeline.runtime.scheduler``) on a real exported
checkpoint of the tiny Llama: requests join and leave at every step, prompts are prefilled in
chunks, blocks are shared between prompts with a common prefix, and every request still produces
exactly what it produces alone."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.runtime.checkpoint import load_model
from pipeline.runtime.generate import Request, Result, generate
from pipeline.runtime.scheduler import QUEUE_FULL, QUEUE_TIMEOUT, Scheduler, SchedulerConfig


@pytest.fixture(scope="module")
def model(tiny_engine: Path) -> Any:
    return load_model(tiny_engine)


class Client:
    """Collects what the scheduler hands one request."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.result: Result | None = None
        self.error: str | None = None
        self.done = threading.Event()

    def submit(self, scheduler: Scheduler, request: Request) -> Any:
        return scheduler.submit(request, lambda token, _: self.tokens.append(token), self._finish, self._error)

    def _finish(self, result: Result) -> None:
        self.result = result
        self.done.set()

    def _error(self, message: str) -> None:
        self.error = message
        self.done.set()


PROMPTS = [[1, 5], [1, 4, 4, 8, 10, 12, 2], [1, 7, 3], [1, 9, 9, 9, 2, 6, 5, 4, 3, 11], [1], [1, 6, 2, 8]]


def scheduler(model: Any, **settings: Any) -> Scheduler:
    """Small blocks and a small step budget, so that chunking and paging happen on short prompts."""
    knobs: dict[str, Any] = {"max_batch_size": 4, "max_num_tokens": 64, "kv_cache_tokens": 1024, "tokens_per_block": 4}
    return Scheduler(model, SchedulerConfig(**{**knobs, **settings}))


def _run(scheduler: Scheduler, clients: list[Client]) -> None:
    while scheduler.running or scheduler.waiting:
        scheduler.step()
        assert scheduler.cache.used <= scheduler.cache.num_blocks
    assert all(c.done.is_set() for c in clients)
    assert scheduler.cache.used == 0  # every block came back


def _alone(model: Any, requests: list[Request]) -> list[list[int]]:
    return [generate(model, [r])[0].output_ids for r in requests]


def test_requests_arriving_at_different_steps_answer_as_they_do_alone(model: Any) -> None:
    prompts = [*PROMPTS, [1, *range(3, 20), 5, 7], [1, *range(8, 21, 2)] * 3]
    requests = [Request(p, max_new_tokens=4 + 2 * (i % 3)) for i, p in enumerate(prompts)]
    alone = _alone(model, requests)
    # 6 tokens a step: long prompts are prefilled over several steps beside the running ones
    batched = scheduler(model, max_batch_size=3, max_num_tokens=6)
    clients = [Client() for _ in requests]
    for index, (client, request) in enumerate(zip(clients, requests, strict=True)):
        client.submit(batched, request)
        for _ in range(index % 3):  # the batch moves on between arrivals
            batched.step()
    _run(batched, clients)
    assert [c.tokens for c in clients] == alone
    assert [c.result.output_ids for c in clients if c.result] == alone


def test_whatever_the_cache_memory_held_before_does_not_leak_into_attention(model: Any) -> None:
    """The pool comes from torch.empty: a NaN left there by earlier use of the memory must not reach
    a sequence through masked positions (a masked NaN still poisons the weighted sum)."""
    requests = [Request(p, max_new_tokens=6) for p in PROMPTS[:4]]
    batched = scheduler(model)
    unused = batched.cache.num_blocks * batched.cache.block_size  # all but the padding block
    batched.cache.keys[:, :unused] = float("nan")
    batched.cache.values[:, :unused] = float("nan")
    clients = [Client() for _ in requests]
    for client, request in zip(clients, requests, strict=True):
        client.submit(batched, request)
    _run(batched, clients)
    assert [c.tokens for c in clients] == _alone(model, requests)


def test_a_request_joining_a_running_batch_gets_its_first_token_within_two_steps(model: Any) -> None:
    batched = scheduler(model)
    long, late = Client(), Client()
    long.submit(batched, Request(PROMPTS[3], max_new_tokens=20))
    for _ in range(3):
        batched.step()
    before = len(long.tokens)
    late.submit(batched, Request(PROMPTS[1], max_new_tokens=5))
    batched.step()
    assert late.tokens  # admitted at the next step: prefilled, first token out
    batched.step()
    assert len(late.tokens) >= 2 and len(long.tokens) == before + 2 and not long.done.is_set()
    _run(batched, [long, late])


def test_a_request_arriving_during_a_step_joins_it_between_two_layers(model: Any) -> None:
    """Submitted while the step's forward pass is in its first layer (as a request thread does
    while the scheduler thread works), it is answered by that step, as it would be alone."""
    batched = scheduler(model)
    running, late = Client(), Client()
    running.submit(batched, Request(PROMPTS[3], max_new_tokens=8))
    batched.step()

    def arrive(*_: Any) -> None:
        if not late.tokens and late.result is None and not batched.waiting and len(batched.running) == 1:
            late.submit(batched, Request(PROMPTS[1], max_new_tokens=5))

    hook = model.model.layers[0].mlp.register_forward_hook(arrive)  # the tiny model has two layers
    try:
        batched.step()
    finally:
        hook.remove()
    assert len(late.tokens) == 1 and len(running.tokens) == 2  # its first token, from the same step
    _run(batched, [running, late])
    requests = [Request(PROMPTS[3], max_new_tokens=8), Request(PROMPTS[1], max_new_tokens=5)]
    assert [running.tokens, late.tokens] == _alone(model, requests)


def test_a_long_prompt_is_prefilled_in_chunks_while_the_running_stream_keeps_its_pace(model: Any) -> None:
    batched = scheduler(model, max_num_tokens=8)
    running, long = Client(), Client()
    running.submit(batched, Request(PROMPTS[1], max_new_tokens=30))
    batched.step()
    long_prompt = [1, *range(3, 20)] * 3  # 54 tokens: 7 chunks of at most 8 beside the running token
    long.submit(batched, Request(long_prompt, max_new_tokens=3))
    for step in range(8):
        before = len(running.tokens)
        batched.step()
        assert len(running.tokens) == before + 1, f"the running stream stalled at step {step}"
        if long.tokens:
            break
    assert long.tokens and step == 6  # the 7th chunk completes the prompt and gives its first token
    _run(batched, [running, long])
    assert long.tokens == _alone(model, [Request(long_prompt, max_new_tokens=3)])[0]


def test_a_prompt_that_fits_a_step_is_prefilled_at_once_and_a_longer_one_a_chunk_per_step(model: Any) -> None:
    batched = scheduler(model, max_num_tokens=12, context_chunk_tokens=4)
    first, second, long = Client(), Client(), Client()
    first.submit(batched, Request(PROMPTS[3], max_new_tokens=12))  # 10 tokens: all in one step
    second.submit(batched, Request([1, 6, 2, 8, 7, 7, 7, 7, 7], max_new_tokens=12))  # 9: not in the 2 left
    batched.step()
    assert len(first.tokens) == 1 and not second.tokens  # the second waits for a step it fits whole
    batched.step()
    assert len(first.tokens) == 2 and len(second.tokens) == 1
    long_prompt = [1, *range(3, 20)] * 2  # 36 tokens, more than a step's 12: 9 chunks of 4
    long.submit(batched, Request(long_prompt, max_new_tokens=3))
    steps = 0
    while not long.tokens:
        batched.step()
        steps += 1
    assert steps == 9 and len(first.tokens) == 11  # the streams got a token at every one of them
    _run(batched, [first, second, long])
    requests = [Request(PROMPTS[3], max_new_tokens=12), Request(long_prompt, max_new_tokens=3)]
    assert [first.tokens, long.tokens] == _alone(model, requests)


def test_without_chunked_context_a_prompt_longer_than_a_step_is_refused(model: Any) -> None:
    client = Client()
    assert client.submit(scheduler(model, max_num_tokens=8, enable_chunked_context=False), Request([1] * 9)) is None
    assert client.error and "max_num_tokens=8" in client.error


def test_prompts_sharing_a_prefix_reuse_its_cached_blocks(model: Any) -> None:
    system = [1, *range(3, 20)]  # 18 tokens: 4 full blocks of 4
    requests = [Request(system + tail, max_new_tokens=3) for tail in ([5, 6], [7, 8, 9], [5, 6])]
    alone = _alone(model, requests)
    batched = scheduler(model)
    clients = [Client() for _ in requests]
    for client, request in zip(clients, requests, strict=True):
        client.submit(batched, request)
        _run(batched, [client])  # one after the other: each finds what the earlier ones left
    assert [c.tokens for c in clients] == alone
    reused = [c.result.metrics["kv_cache_reused_blocks"] for c in clients if c.result]
    # the third prompt equals the first: its 20 tokens hold 5 full blocks, the last token is recomputed
    assert reused == [0, 4, 4]
    total = [c.result.metrics["kv_cache_alloc_total_blocks"] for c in clients if c.result]
    assert total == [6, 6, 6]  # 20 or 21 prompt tokens + 3 generated, in blocks of 4


def test_reuse_can_be_turned_off(model: Any) -> None:
    batched = scheduler(model, enable_kv_cache_reuse=False)
    clients = [Client(), Client()]
    for client in clients:
        client.submit(batched, Request([1, *range(3, 20)], max_new_tokens=2))
        _run(batched, [client])
    assert [c.result.metrics["kv_cache_reused_blocks"] for c in clients if c.result] == [0, 0]


def test_a_bad_request_fails_alone(model: Any) -> None:
    batched = scheduler(model, max_seq_len=64)
    good, bad, nan = Client(), Client(), Client()
    good.submit(batched, Request(PROMPTS[1], max_new_tokens=4))
    assert bad.submit(batched, Request([1, 10**6], max_new_tokens=4)) is None
    assert nan.submit(batched, Request([1, 2], max_new_tokens=4, temperature=float("nan"))) is None
    _run(batched, [good])
    assert bad.error and "outside the vocabulary" in bad.error
    assert nan.error and "finite" in nan.error
    assert good.result is not None and len(good.result.output_ids) == 4


def test_the_cache_budget_is_never_exceeded_and_a_request_that_does_not_fit_waits(model: Any) -> None:
    requests = [Request([1, 5, 9, 3, 7], max_new_tokens=10) for _ in range(4)]  # 15 tokens: 4 blocks each
    batched = scheduler(model, kv_cache_tokens=32, enable_kv_cache_reuse=False)  # 8 blocks
    clients = [Client() for _ in requests]
    for client, request in zip(clients, requests, strict=True):
        client.submit(batched, request)
    most = 0
    while batched.running or batched.waiting:
        batched.step()
        most = max(most, len(batched.running))
    assert most == 2 and batched.peak_blocks <= 8
    assert all(c.result and len(c.result.output_ids) == 10 for c in clients)
    too_big = Client()
    assert too_big.submit(batched, Request([1] * 25, max_new_tokens=10)) is None
    assert too_big.error and "KV cache of 32 tokens" in too_big.error


def test_max_utilization_pauses_the_latest_sequence_and_it_resumes_where_it_was(model: Any) -> None:
    requests = [Request(p, max_new_tokens=12) for p in (PROMPTS[3], PROMPTS[1], PROMPTS[5])]
    alone = _alone(model, requests)
    # 6 blocks of 4: all three prompts fit, their 12 new tokens each do not
    batched = scheduler(model, kv_cache_tokens=24, batch_scheduler_policy="max_utilization")
    clients = [Client() for _ in requests]
    for client, request in zip(clients, requests, strict=True):
        client.submit(batched, request)
    batched.step()
    assert len(batched.running) == 3  # admitted on their prompts alone
    sequences = list(batched.running)
    _run(batched, clients)
    assert sum(s.paused for s in sequences) >= 1 and batched.peak_blocks <= 6
    assert [c.tokens for c in clients] == alone


def test_a_cancelled_request_leaves_at_the_next_step_and_frees_its_room(model: Any) -> None:
    batched = scheduler(model, max_batch_size=1)
    first, second = Client(), Client()
    handle = first.submit(batched, Request(PROMPTS[3], max_new_tokens=50))
    second.submit(batched, Request(PROMPTS[1], max_new_tokens=3))
    batched.step()
    batched.step()
    assert batched.running and batched.waiting  # one slot: the second waits
    assert handle is not None
    batched.cancel(handle)
    batched.step()
    assert first.result is None and len(first.tokens) < 50  # cancelled: no final answer ...
    assert first.error and first.error.startswith("request cancelled: after 2 tokens")  # ... but an error
    _run(batched, [second])
    assert second.result is not None and len(second.result.output_ids) == 3


@pytest.mark.slow  # the thread path also serves every Triton test
def test_the_scheduler_thread_serves_concurrent_submitters(model: Any) -> None:
    requests = [Request(p, max_new_tokens=6) for p in PROMPTS]
    alone = _alone(model, requests)
    threaded = scheduler(model)
    threaded.start()
    try:
        clients = [Client() for _ in requests]
        threads = [
            threading.Thread(target=c.submit, args=(threaded, r)) for c, r in zip(clients, requests, strict=True)
        ]
        for thread in threads:
            thread.start()
        assert all(c.done.wait(60) for c in clients)
    finally:
        threaded.stop()
    assert [c.tokens for c in clients] == alone


def test_a_full_queue_refuses_at_once_and_the_queued_still_answer(model: Any) -> None:
    """Beyond max_queue_size waiting requests, a request is refused with Triton's words for a full
    queue (the OpenAI gateway makes it a 429); the queue drains and takes requests again."""
    bounded = scheduler(model, max_batch_size=1, max_queue_size=2)
    clients = [Client() for _ in range(4)]
    for client in clients:
        client.submit(bounded, Request([1, 5, 9], max_new_tokens=3))
    refused = [c for c in clients if c.error]
    assert len(refused) == 2 and all(c.error.startswith(QUEUE_FULL) for c in refused if c.error)
    _run(bounded, clients[:2])
    assert all(c.result is not None and len(c.tokens) == 3 for c in clients[:2])
    again = Client()
    again.submit(bounded, Request([1, 5, 9], max_new_tokens=3))
    _run(bounded, [again])
    assert again.error is None and len(again.tokens) == 3


def test_a_request_waiting_past_the_queue_timeout_is_refused_and_a_running_one_is_not(model: Any) -> None:
    """With queue_timeout_ms, a request that could not be admitted in time gets Triton's words for
    an expired queue timeout (503 through the OpenAI gateway); the one running finishes."""
    timed = scheduler(model, max_batch_size=1, queue_timeout_ms=200)
    running, waiting = Client(), Client()
    running.submit(timed, Request([1, 5, 9], max_new_tokens=6))
    timed.step()  # the first is admitted and holds the only slot
    waiting.submit(timed, Request([1, 7, 9], max_new_tokens=3))
    time.sleep(0.3)
    _run(timed, [running, waiting])
    assert running.error is None and len(running.tokens) == 6
    assert waiting.error is not None and waiting.error.startswith(QUEUE_TIMEOUT), waiting.error


def test_generating_sequences_of_unlike_length_attend_in_separate_gathers() -> None:
    """One long sequence must not pad every short one's gather to its length (a step after a
    1500-token prompt took 387 ms instead of 120 ms on SmolLM2): like widths share a gather.
    (That such a mix still answers as alone is test_a_prompt_that_fits_a_step_..., whose long
    prompt has 10 blocks beside 3-5.)"""
    from pipeline.runtime.packed import by_length

    assert by_length([3, 47, 5, 9, 20, 2]) == [[5, 0, 2], [3], [4], [1]]
    assert by_length([3, 5, 2]) == [[2, 0, 1]]  # alike: one gather, as before
    assert by_length([]) == []


class Raising(Client):
    """A client whose token callback raises (a response the backend cannot send)."""

    def submit(self, scheduler: Scheduler, request: Request) -> Any:
        def boom(_token: int, _result: Result) -> None:
            raise RuntimeError("the response could not be sent")

        return scheduler.submit(request, boom, self._finish, self._error)


def test_no_request_stops_the_scheduler_thread(model: Any) -> None:
    """Overflowing sampling is greedy or refused by name, a callback that raises fails its own
    request, and the loop serves the next request (it used to die on temperature=1e-40)."""
    live = scheduler(model)
    live.start()
    try:
        prompt = PROMPTS[1]
        greedy = generate(model, [Request(prompt, max_new_tokens=4, temperature=0)])[0].output_ids
        tiny, raising, good = Client(), Raising(), Client()
        tiny.submit(live, Request(prompt, max_new_tokens=4, temperature=1e-40, top_p=1.0, seed=2**64 - 1))
        raising.submit(live, Request(prompt, max_new_tokens=4))
        good.submit(live, Request(prompt, max_new_tokens=4, temperature=0))
        for client in (tiny, raising, good):
            assert client.done.wait(60)
        assert tiny.error is None and tiny.tokens == greedy  # a tiny temperature is greedy
        assert raising.error is not None and "could not be sent" in raising.error
        assert good.error is None and good.tokens == greedy
        refused = {
            "repetition_penalty": Request(prompt, repetition_penalty=1e-40),
            "frequency_penalty": Request(prompt, frequency_penalty=-1e38, temperature=0.5),
            "embedding_bias": Request(prompt, embedding_bias=torch.full((model.config.vocab_size,), 3e38)),
            "seed": Request(prompt, seed=2**64),
            "stop_words_list": Request(prompt, stop_words=[[3]] * 1000),
        }
        for name, request in refused.items():
            client = Client()
            client.submit(live, request)
            assert client.done.wait(10) and client.error is not None and name in client.error, (name, client.error)
        after = Client()
        after.submit(live, Request(prompt, max_new_tokens=4, temperature=0))
        assert after.done.wait(60) and after.tokens == greedy
        assert live.alive() and live.faults >= 1 and live.cache.used == 0
    finally:
        live.stop()
    refused_after_stop = Client()
    refused_after_stop.submit(live, Request(PROMPTS[0]))
    assert not live.alive() and refused_after_stop.error and "not running" in refused_after_stop.error


def test_a_failing_step_fails_the_running_requests_and_the_loop_goes_on(model: Any, monkeypatch: Any) -> None:
    live = scheduler(model)
    real = live._schedule
    calls = {"n": 0}

    def flaky() -> Any:
        calls["n"] += 1
        if calls["n"] == 2:  # the second step breaks, after the first request is running
            raise RuntimeError("injected")
        return real()

    monkeypatch.setattr(live, "_schedule", flaky)
    live.start()
    try:
        first = Client()
        first.submit(live, Request(PROMPTS[1], max_new_tokens=6))
        assert first.done.wait(60) and first.error and "injected" in first.error
        second = Client()
        second.submit(live, Request(PROMPTS[1], max_new_tokens=3))
        assert second.done.wait(60) and second.error is None and len(second.tokens) == 3
        assert live.alive() and live.cache.used == 0
    finally:
        live.stop()


def test_returned_logits_count_against_a_budget(model: Any) -> None:
    vocab_bytes = model.config.vocab_size * 4
    budgeted = scheduler(model, max_logits_bytes=10 * vocab_bytes)
    alone, first, second = Client(), Client(), Client()
    alone.submit(budgeted, Request(PROMPTS[1], max_new_tokens=11, return_generation_logits=True))
    assert alone.error and "cpu_max_logits_mb" in alone.error  # could never fit: refused by name
    first.submit(budgeted, Request(PROMPTS[0], max_new_tokens=6, return_generation_logits=True))
    second.submit(budgeted, Request(PROMPTS[0], max_new_tokens=6, return_generation_logits=True))
    assert second.error and second.error.startswith(QUEUE_FULL)  # fits alone, not beside the first: 429
    _run(budgeted, [first])
    assert first.result is not None and len(first.result.generation_logits) == 6
    assert budgeted.logits_reserved == 0


def test_a_stalled_loop_is_not_alive_and_refuses_new_requests(model: Any, monkeypatch: Any) -> None:
    from pipeline.runtime import scheduler as module

    live = scheduler(model)
    live.start()
    try:
        assert live.alive()
        monkeypatch.setattr(module, "STALL_S", -1.0)  # every beat is now older than the stall limit
        client = Client()
        client.submit(live, Request(PROMPTS[0]))
        assert not live.alive() and client.error and "not running" in client.error
    finally:
        live.stop()
