"""Property-based tests (Hypothesis) of the in-flight scheduler and its sampler on the tiny Llama:
arbitrary mixes of requests, with parameters inside and far beyond their ranges, cancellations
and exceptions injected into callbacks at any step. Invariants: no exception escapes a step,
every request ends exactly once (a result or an error), the KV cache returns to empty, and the
scheduler then serves a normal request. ``make fuzz`` runs many more scenarios (FUZZ_EXAMPLES)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.runtime.checkpoint import load_model
from pipeline.runtime.generate import Request, Result
from pipeline.runtime.scheduler import Scheduler, SchedulerConfig

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
TALLY = {"scenarios": 0, "requests": 0, "violations": 0}


@pytest.fixture(scope="module")
def model(tiny_engine: Path) -> Any:
    return load_model(tiny_engine)


EXTREME = [0.0, 1e-40, 1e-6, 0.7, 1.0, 2.0, 1e30, -1.0, math.nan, math.inf, -1e38, 1e38]
floats = st.sampled_from(EXTREME) | st.floats(allow_nan=True, allow_infinity=True, width=32)


@dataclass
class Spec:
    request: dict[str, Any]
    arrive_at: int  # the step before which it is submitted
    cancel_at: int | None  # the step after which its client leaves
    raise_at_token: int | None  # its token callback raises at this token
    cancel_check_raises: bool = False
    ends: list[str] = field(default_factory=list)


@st.composite
def specs(draw: Any, vocab: int) -> Spec:
    ids = st.integers(min_value=-3, max_value=vocab + 3) if draw(st.booleans()) else st.integers(0, vocab - 1)
    request: dict[str, Any] = {
        "input_ids": draw(st.lists(ids, min_size=0, max_size=40)),
        "max_new_tokens": draw(st.integers(-2, 12)),
        "temperature": draw(floats),
        "top_k": draw(st.integers(-1, vocab + 5)),
        "top_p": draw(floats),
        "seed": draw(st.none() | st.integers(-(2**63) - 2, 2**64 + 2)),
        "repetition_penalty": draw(st.sampled_from([1.0, 1e-40, 0.5, 2.0, 1e4, math.nan])),
        "presence_penalty": draw(floats),
        "frequency_penalty": draw(floats),
        "min_tokens": draw(st.integers(-1, 20)),
        "end_id": draw(st.none() | st.integers(-2, vocab + 2)),
        "stop_words": draw(st.lists(st.lists(st.integers(-1, vocab), min_size=0, max_size=3), max_size=3)),
        "bad_words": draw(st.lists(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=2), max_size=3)),
        "return_log_probs": draw(st.booleans()),
        "return_generation_logits": draw(st.booleans()),
        "return_context_logits": draw(st.booleans()),
    }
    if draw(st.booleans()):
        bias = torch.zeros(vocab if draw(st.booleans()) else vocab + 1)
        bias[draw(st.integers(0, vocab - 1))] = draw(floats)
        request["embedding_bias"] = bias
    return Spec(
        request,
        arrive_at=draw(st.integers(0, 6)),
        cancel_at=draw(st.none() | st.integers(0, 10)),
        raise_at_token=draw(st.none() | st.integers(0, 6)),
        cancel_check_raises=draw(st.booleans()),
    )


configs = st.fixed_dictionaries(
    {
        "max_batch_size": st.integers(1, 4),
        "max_num_tokens": st.integers(1, 48),
        "kv_cache_tokens": st.sampled_from([64, 128, 1024]),
        "tokens_per_block": st.sampled_from([4, 8]),
        "batch_scheduler_policy": st.sampled_from(["guaranteed_no_evict", "max_utilization"]),
        "enable_chunked_context": st.booleans(),
        "context_chunk_tokens": st.none() | st.integers(1, 16),
        "enable_kv_cache_reuse": st.booleans(),
        "max_queue_size": st.integers(0, 3),
        "max_seq_len": st.sampled_from([None, 32, 256]),
        "cancellation_check_period_ms": st.just(0),
        "max_logits_bytes": st.sampled_from([0, 50_000, 10**7]),
    }
)


def _submit(scheduler: Scheduler, spec: Spec, step: list[int]) -> None:
    tokens = {"n": 0}

    def on_token(_token: int, _result: Result) -> None:
        tokens["n"] += 1
        if spec.raise_at_token is not None and tokens["n"] > spec.raise_at_token:
            raise RuntimeError("injected: the response could not be sent")

    def is_cancelled() -> bool:
        gone = spec.cancel_at is not None and step[0] >= spec.cancel_at
        if gone and spec.cancel_check_raises:
            raise RuntimeError("injected: the request is gone")
        return gone

    scheduler.submit(
        Request(**spec.request),
        on_token,
        lambda _result: spec.ends.append("finish"),
        lambda _message: spec.ends.append("error"),
        is_cancelled=is_cancelled,
    )


@pytest.fixture(scope="module")
def vocab(model: Any) -> int:
    return int(model.config.vocab_size)


def test_arbitrary_requests_and_faults_keep_every_invariant(model: Any, vocab: int) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(config=configs, scenario=st.lists(specs(vocab), min_size=1, max_size=6))
    def run(config: dict[str, Any], scenario: list[Spec]) -> None:
        scheduler = Scheduler(model, SchedulerConfig(**config))
        step = [0]
        pending = sorted(scenario, key=lambda s: s.arrive_at)
        while pending or scheduler.running or scheduler.waiting:
            while pending and pending[0].arrive_at <= step[0]:
                _submit(scheduler, pending.pop(0), step)
            scheduler.step()  # no exception may escape a step
            step[0] += 1
            assert step[0] < 2000, "the scheduler stopped making progress"
            assert scheduler.cache.used <= scheduler.cache.num_blocks
        TALLY["scenarios"] += 1
        TALLY["requests"] += len(scenario)
        ended_wrong = [s.ends for s in scenario if len(s.ends) != 1]
        TALLY["violations"] += len(ended_wrong) + (scheduler.cache.used != 0)
        assert not ended_wrong, f"requests that did not end exactly once: {ended_wrong}"
        assert scheduler.cache.used == 0, "KV cache blocks leaked"
        assert scheduler.logits_reserved == 0, "logits budget leaked"
        normal = Spec({"input_ids": [1], "max_new_tokens": 3, "temperature": 0}, 0, None, None)
        _submit(scheduler, normal, step)
        while scheduler.running or scheduler.waiting:
            scheduler.step()
        assert normal.ends == ["finish"], "the scheduler no longer serves a normal request"

    run()
    print(f"scheduler fuzz: {TALLY['scenarios']} scenarios, {TALLY['requests']} requests, "
          f"{TALLY['violations']} invariant violations")  # fmt: skip
