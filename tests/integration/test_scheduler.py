"""In-flight batching in the reference runtime (``pipeline.runtime.scheduler``) on a real exported
checkpoint of the tiny Llama: requests join and leave at every step and still produce what they
produce alone."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from pipeline import runner, validate
from pipeline.runtime.checkpoint import load_model
from pipeline.runtime.generate import Request, Result, generate
from pipeline.runtime.scheduler import Scheduler
from pipeline.stages import STAGES


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    workdir = tmp_path_factory.mktemp("scheduler")
    overrides = [f"workdir={workdir}", "target=cpu", "model=local", f"model.path={tiny_checkpoint}", "quant=none"]
    overrides.append("quant.eval_tokens=0")  # the export's quality is tested elsewhere
    steps = runner.build(validate.load(overrides), STAGES[:3])  # fetch, quantize, engine
    return load_model(steps[-1].dirs.final / "engine")


class Client:
    """Collects what the scheduler hands one request."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.result: Result | None = None
        self.error: str | None = None
        self.done = threading.Event()

    def submit(self, scheduler: Scheduler, request: Request) -> Any:
        return scheduler.submit(request, self.tokens.append, self._finish, self._error)

    def _finish(self, result: Result) -> None:
        self.result = result
        self.done.set()

    def _error(self, message: str) -> None:
        self.error = message
        self.done.set()


PROMPTS = [[1, 5], [1, 4, 4, 8, 10, 12, 2], [1, 7, 3], [1, 9, 9, 9, 2, 6, 5, 4, 3, 11], [1], [1, 6, 2, 8]]


def _run(scheduler: Scheduler, clients: list[Client]) -> None:
    while scheduler.running or scheduler.waiting:
        scheduler.step()
    assert all(c.done.is_set() for c in clients)


def test_requests_arriving_at_different_steps_answer_as_they_do_alone(model: Any) -> None:
    requests = [Request(p, max_new_tokens=4 + 2 * (i % 3)) for i, p in enumerate(PROMPTS)]
    alone = [generate(model, [r])[0].output_ids for r in requests]
    scheduler = Scheduler(model, max_batch_size=3, kv_cache_tokens=1000)
    clients = [Client() for _ in requests]
    for index, (client, request) in enumerate(zip(clients, requests, strict=True)):
        client.submit(scheduler, request)
        for _ in range(index % 3):  # the batch moves on between arrivals
            scheduler.step()
    _run(scheduler, clients)
    assert [c.tokens for c in clients] == alone
    assert [c.result.output_ids for c in clients if c.result] == alone


def test_a_request_joining_a_running_batch_gets_its_first_token_within_two_steps(model: Any) -> None:
    scheduler = Scheduler(model, max_batch_size=4, kv_cache_tokens=1000)
    long, late = Client(), Client()
    long.submit(scheduler, Request(PROMPTS[3], max_new_tokens=20))
    for _ in range(3):
        scheduler.step()
    before = len(long.tokens)
    late.submit(scheduler, Request(PROMPTS[1], max_new_tokens=5))
    scheduler.step()
    assert late.tokens  # admitted at the next step: prefilled, first token out
    scheduler.step()
    assert len(late.tokens) >= 2 and len(long.tokens) == before + 2 and not long.done.is_set()
    _run(scheduler, [long, late])


def test_a_bad_request_fails_alone(model: Any) -> None:
    scheduler = Scheduler(model, max_batch_size=4, kv_cache_tokens=1000, max_seq_len=64)
    good, bad, nan = Client(), Client(), Client()
    good.submit(scheduler, Request(PROMPTS[1], max_new_tokens=4))
    assert bad.submit(scheduler, Request([1, 10**6], max_new_tokens=4)) is None
    assert nan.submit(scheduler, Request([1, 2], max_new_tokens=4, temperature=float("nan"))) is None
    _run(scheduler, [good])
    assert bad.error and "outside the vocabulary" in bad.error
    assert nan.error and "finite" in nan.error
    assert good.result is not None and len(good.result.output_ids) == 4


def test_the_kv_cache_budget_is_never_exceeded_and_a_request_that_does_not_fit_waits(model: Any) -> None:
    requests = [Request([1, 5, 9, 3, 7], max_new_tokens=10) for _ in range(4)]  # 15 tokens each
    scheduler = Scheduler(model, max_batch_size=4, kv_cache_tokens=30)
    clients = [Client() for _ in requests]
    for client, request in zip(clients, requests, strict=True):
        client.submit(scheduler, request)
    most = 0
    while scheduler.running or scheduler.waiting:
        scheduler.step()
        most = max(most, len(scheduler.running))
        assert scheduler.reserved_tokens <= 30
    assert most == 2 and all(c.result and len(c.result.output_ids) == 10 for c in clients)
    too_big = Client()
    assert too_big.submit(scheduler, Request([1] * 25, max_new_tokens=10)) is None
    assert too_big.error and "KV cache budget of 30 tokens" in too_big.error


def test_a_cancelled_request_leaves_at_the_next_step_and_frees_its_room(model: Any) -> None:
    scheduler = Scheduler(model, max_batch_size=1, kv_cache_tokens=1000)
    first, second = Client(), Client()
    handle = first.submit(scheduler, Request(PROMPTS[3], max_new_tokens=50))
    second.submit(scheduler, Request(PROMPTS[1], max_new_tokens=3))
    scheduler.step()
    scheduler.step()
    assert scheduler.running and scheduler.waiting  # one slot: the second waits
    scheduler.cancel(handle)
    scheduler.step()
    assert first.result is None and len(first.tokens) < 50  # cancelled: no final answer
    _run(scheduler, [second])
    assert second.result is not None and len(second.result.output_ids) == 3


@pytest.mark.slow  # the thread path also serves every Triton test
def test_the_scheduler_thread_serves_concurrent_submitters(model: Any) -> None:
    requests = [Request(p, max_new_tokens=6) for p in PROMPTS]
    alone = [generate(model, [r])[0].output_ids for r in requests]
    scheduler = Scheduler(model, max_batch_size=4, kv_cache_tokens=1000)
    scheduler.start()
    try:
        clients = [Client() for _ in requests]
        threads = [
            threading.Thread(target=c.submit, args=(scheduler, r)) for c, r in zip(clients, requests, strict=True)
        ]
        for thread in threads:
            thread.start()
        assert all(c.done.wait(60) for c in clients)
    finally:
        scheduler.stop()
    assert [c.tokens for c in clients] == alone
