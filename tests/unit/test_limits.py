"""Engine limits sized for the workload (pipeline/sizing/limits.py) against hand-computed cases,
trtllm-bench's published choices, and what ``plan`` prints."""

from __future__ import annotations

import pytest

from pipeline import validate
from pipeline.sizing import limits, memory
from tests.conftest import cli

LLAMA70B_FP8_TP2_H100 = ["model=llama70b", "quant=fp8", "parallel.tp=2", "target=h100"]


@pytest.mark.parametrize(
    ("requests", "batch"),
    [(1, 64), (63.9, 64), (65, 96), (255.5, 256), (256, 256), (267.8, 384), (1000, 1024), (2101, 2304), (5000, 5120)],
)
def test_batch_rounding_by_hand(requests: float, batch: int) -> None:
    # at least 64; below 256 steps of 32, below 1024 steps of 128, then steps of 256
    assert limits.round_batch(requests) == batch


@pytest.mark.parametrize(("tokens", "rounded"), [(100, 2048), (2049, 2304), (4096, 4096), (4097, 4608), (9000, 9216)])
def test_token_rounding_by_hand(tokens: float, rounded: int) -> None:
    assert limits.round_tokens(tokens) == rounded


def test_from_capacity_by_hand() -> None:
    # 100,000 tokens of KV cache at 128/128: 390.6 requests -> batch 512; tokens 390.6 x 2 -> 1024 -> floor 2048
    assert limits.from_capacity(100_000, 128, 128, pp=1)[:2] == (512, 2048)
    # the same at pp=2: each stage has half the requests in flight: 195.3 -> 224
    assert limits.from_capacity(100_000, 128, 128, pp=2)[:2] == (224, 2048)
    # 2048/128: 45.96 requests -> batch 64 (the floor); tokens 45.96 x (1 + 16) = 781 -> 2048
    batch, tokens, requests = limits.from_capacity(100_000, 2048, 128, pp=1)
    assert requests == pytest.approx(100_000 / 2176) and (batch, tokens) == (64, 2048)
    # capped as trtllm-bench caps them
    assert limits.from_capacity(10**9, 16, 16, pp=1)[:2] == (4096, 8192)
    assert limits.from_capacity(10**9, 2048, 16, pp=1)[1] == 32768


@pytest.mark.parametrize(
    ("isl", "osl", "batch", "tokens"),
    # trtllm-bench's own choice for these (shared/reference/facts.md): 2304/4608 and 256/2048
    [(128, 128, 2304, 4608), (128, 2048, 256, 2048), (2048, 128, 256, 4608)],
)
def test_default_preset_sizes_llama70b_fp8_tp2_h100_like_trtllm_bench(
    isl: int, osl: int, batch: int, tokens: int
) -> None:
    cfg = validate.load([*LLAMA70B_FP8_TP2_H100, f"workload.input_tokens={isl}", f"workload.output_tokens={osl}"])
    assert (cfg.build.max_batch_size, cfg.build.max_num_tokens) == (batch, tokens)
    assert cfg.build.sized_because and f"workload {isl}/{osl}" in cfg.build.sized_because
    # the plan with the chosen limits fits, and their own activations are accounted for: the KV
    # cache left beside them gives the same batch again
    plan = memory.plan_for(cfg)
    assert plan.fits
    assert limits.round_batch(min(plan.kv_tokens / (isl + osl), limits.MAX_BATCH)) == batch


def test_an_explicit_limit_is_kept_and_presets_stay_explicit() -> None:
    cfg = validate.load([*LLAMA70B_FP8_TP2_H100, "build.max_batch_size=32"])
    assert cfg.build.max_batch_size == 32 and cfg.build.max_num_tokens is not None
    assert cfg.build.sized_because is not None and cfg.build.sized_because.startswith("max_num_tokens:")
    throughput = validate.load([*LLAMA70B_FP8_TP2_H100, "build=throughput"])
    assert (throughput.build.max_batch_size, throughput.build.max_num_tokens, throughput.build.sized_because) == (
        256,
        16384,
        None,
    )


def test_cpu_target_keeps_the_reference_runtimes_defaults() -> None:
    cfg = validate.load(["target=cpu"])
    assert (cfg.build.max_batch_size, cfg.build.max_num_tokens) == (limits.FALLBACK_BATCH, limits.FALLBACK_TOKENS)
    assert "CPU target" in (cfg.build.sized_because or "")


def test_plan_prints_the_limits_and_why() -> None:
    result = cli("plan", *LLAMA70B_FP8_TP2_H100, "workload.input_tokens=128", "workload.output_tokens=2048")
    assert result.returncode == 0, result.stderr
    section = result.stdout.split("# engine limits", 1)[1].split("# memory plan", 1)[0]
    assert "max_batch_size 256, max_num_tokens 2048" in section
    assert "requests of 2176 tokens" in section


def test_a_workload_longer_than_the_engine_is_refused_in_one_line() -> None:
    result = cli("plan", "workload.input_tokens=3000", "workload.output_tokens=2000", "build.max_input_len=4096")
    assert result.returncode == 1
    assert "workload.input_tokens + output_tokens = 5000 exceeds build.max_seq_len=4096" in result.stderr


def test_the_benchmarks_old_length_and_slo_keys_name_their_new_place() -> None:
    moved = cli("plan", "benchmark.input_tokens=8")
    assert moved.returncode == 1 and "'benchmark.input_tokens': it is workload.input_tokens now" in moved.stderr
    slo = cli("plan", "benchmark.slo.ttft_ms=500")
    assert slo.returncode == 1 and "it is slo.ttft_ms_p99 now" in slo.stderr
