"""What a LoRA adapter costs the CPU target in a mixed batch (``python -m benchmarks lora``): the
embedded model's engine in the in-flight scheduler, 8 requests at once (64-token prompts, 32 new
tokens each, greedy, no early end), first with no adapter, then half of them with one of two
adapters and half without, then all with one of the two. Adapters are rank 8 on all seven
projections (the most a request can ask of the runtime); their values do not change the cost.
One torch thread, as the served engine model has on two cores; each case is run three times,
interleaved, and the best is kept (the machine is noisy).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from pipeline import runner, validate
from pipeline.runtime import lora
from pipeline.runtime.checkpoint import load_model
from pipeline.runtime.generate import Request
from pipeline.runtime.scheduler import Scheduler, SchedulerConfig
from pipeline.stages import STAGES

CONCURRENCY, PROMPT, NEW, RANK = 8, 64, 32, 8


def _engine(workdir: Path) -> Path:
    overrides = [f"workdir={workdir}", "target=cpu", "until=engine", "tracking=none"]
    subprocess.run([sys.executable, "-m", "pipeline", "build", *overrides], check=True)
    step = next(s for s in runner.plan(validate.load(overrides), STAGES) if s.name == "engine")
    return step.dirs.final / "engine"


def _adapter(model: Any, name: str, seed: int) -> lora.Adapter:
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for index, layer in enumerate(model.model.layers):
        for module in lora.MODULES:
            linear = getattr(layer.self_attn if module in lora.ATTENTION else layer.mlp, module)
            a = torch.randn(RANK, linear.in_features, generator=generator) * 0.01
            weights[(index, module)] = (a, torch.randn(linear.out_features, RANK, generator=generator) * 0.01)
    return lora.Adapter(name, RANK, frozenset(lora.MODULES), weights)


def _run(model: Any, adapters: list[lora.Adapter | None]) -> float:
    """Output tokens per second of one batch of requests, each with its adapter (or none)."""
    scheduler = Scheduler(model, SchedulerConfig(max_batch_size=CONCURRENCY, max_num_tokens=1024,
                                                 kv_cache_tokens=CONCURRENCY * (PROMPT + NEW + 16),
                                                 enable_kv_cache_reuse=False))  # fmt: skip
    done = threading.Semaphore(0)
    for number, adapter in enumerate(adapters):
        prompt = [(7 * number + 13 * i) % 1000 + 100 for i in range(PROMPT)]
        request = Request(prompt, NEW, end_id=None, adapter=adapter)
        scheduler.submit(request, lambda _token, _i: None, lambda _result: done.release(), print)
    started = time.perf_counter()
    while scheduler.running or scheduler.waiting:
        scheduler.step()
    seconds = time.perf_counter() - started
    for _ in adapters:
        done.acquire(timeout=1)
    return len(adapters) * NEW / seconds


def bench_lora(workdir: Path) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    model = load_model(_engine(workdir))
    a, b = _adapter(model, "a", 1), _adapter(model, "b", 2)
    half = CONCURRENCY // 2
    cases: dict[str, list[lora.Adapter | None]] = {
        "no adapter": [None] * CONCURRENCY,
        "half with adapters (2 kinds)": [None] * half + [a, b] * (half // 2),
        "all with adapters (2 kinds)": [a, b] * half,
    }
    best = {name: 0.0 for name in cases}
    _run(model, cases["no adapter"])  # warm-up
    for _ in range(3):
        for name, adapters in cases.items():
            best[name] = max(best[name], _run(model, adapters))
    base = best["no adapter"]
    rows = [
        {"case": name, "output_tok_s": round(value, 1), "vs_no_adapter": round(value / base, 3)}
        for name, value in best.items()
    ]
    for row in rows:
        print(row, flush=True)
    return rows
