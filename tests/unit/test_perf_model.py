"""The performance model (pipeline/sizing/perf.py) against the published figures it can be checked
with, its arithmetic by hand, and its calibration."""

from __future__ import annotations

import pytest

from pipeline import validate
from pipeline.config.schema import SLOConfig, WorkloadConfig
from pipeline.sizing import perf

# NVIDIA's trtllm-bench figures for Llama-3.x-70B FP8 (FP8 KV) TP2 on H100 at trtllm-bench's own
# limits: about 6.2-6.7k output tokens/s (shared/reference/facts.md, from NVIDIA's perf overview)
PUBLISHED_LOW, PUBLISHED_HIGH = 6200, 6700
TOLERANCE = 0.25  # the error the model is allowed against them


def _deployment(isl: int, osl: int) -> tuple[perf.Deployment, WorkloadConfig]:
    cfg = validate.load(
        ["model=llama70b", "quant=fp8", "parallel.tp=2", "target=h100", f"workload.input_tokens={isl}",
         f"workload.output_tokens={osl}"]
    )  # fmt: skip
    hw = perf.hardware_for(cfg.target)
    assert hw is perf.GPUS["h100"]
    d = perf.Deployment(cfg.model.arch, cfg.quant.format, cfg.quant.kv_cache_dtype, 2, 1, hw, cfg.build.batch,
                        cfg.build.tokens)  # fmt: skip
    return d, cfg.workload


@pytest.mark.parametrize(("isl", "osl"), [(128, 128), (128, 2048)])
def test_llama70b_fp8_tp2_h100_throughput_near_published(isl: int, osl: int) -> None:
    d, work = _deployment(isl, osl)
    full = perf.predict(d, work, d.max_batch_size)
    assert PUBLISHED_LOW * (1 - TOLERANCE) < full.output_tokens_per_s < PUBLISHED_HIGH * (1 + TOLERANCE)
    assert full.tokens_per_s_per_gpu == pytest.approx(full.output_tokens_per_s / 2)


def test_decode_at_batch_one_is_a_pass_over_the_weights_by_hand() -> None:
    d, work = _deployment(128, 128)
    # 33.8 GiB of FP8 weights per GPU at half of 3.35 TB/s, plus 2 all-reduces of 80 layers at 8 us, plus 1 ms
    one = perf.step_ms(d, sequences=1, context=0, tokens=1)
    weights_ms = 36.3e9 / (3350e9 * perf.GPU_BANDWIDTH_EFFICIENCY) * 1000
    assert one == pytest.approx(weights_ms + 160 * 0.008 + 1.0, rel=0.02)
    # ITL grows with the batch, throughput more than ITL
    low, high = perf.predict(d, work, 1), perf.predict(d, work, 256)
    assert high.itl_ms_p50 > low.itl_ms_p50 and high.output_tokens_per_s > 50 * low.output_tokens_per_s


def test_more_users_than_the_batch_queue_for_their_first_token() -> None:
    d, work = _deployment(128, 128)
    small = perf.Deployment(**{**d.__dict__, "max_batch_size": 8})
    at_batch, over = perf.predict(small, work, 8), perf.predict(small, work, 16)
    assert over.itl_ms_p50 == pytest.approx(at_batch.itl_ms_p50)
    assert over.ttft_ms_p50 > 10 * at_batch.ttft_ms_p50  # a whole request's lifetime in the queue


def test_best_load_under_an_slo_and_the_closest_miss() -> None:
    d, work = _deployment(128, 2048)
    best, misses = perf.best_under_slo(d, work, SLOConfig(itl_ms_p99=35))
    assert not misses and best.itl_ms_p99 <= 35
    higher = perf.predict(d, work, best.concurrency * 2)
    assert higher.itl_ms_p99 > 35  # the next load would break it
    impossible, missed = perf.best_under_slo(d, work, SLOConfig(itl_ms_p99=1))
    assert impossible.concurrency == 1 and missed["itl_ms_p99"] > 0


def test_calibration_recovers_an_overhead_and_a_scale() -> None:
    pairs = [(x, 5.0 + 2.0 * x) for x in (10.0, 20.0, 40.0)]
    fitted = perf.Calibration.fit(pairs)
    assert fitted.overhead_ms == pytest.approx(5.0) and fitted.scale == pytest.approx(2.0) and fitted.points == 3
    assert perf.Calibration.fit([(10.0, 30.0)]).scale == pytest.approx(3.0)  # one point: the scale alone
    assert perf.Calibration.fit([]).scale == 1.0
    # a fit that would make less work slower falls back to the scale alone
    assert perf.Calibration.fit([(10.0, 50.0), (20.0, 40.0)]).overhead_ms == 0.0


def test_the_gpu_table_is_found_by_target_and_by_name() -> None:
    cfg = validate.load(["target=h200"])
    assert perf.hardware_for(cfg.target) is perf.GPUS["h200"]
    cfg.target.name, cfg.target.gpu = "auto", "NVIDIA B200"
    assert perf.hardware_for(cfg.target) is perf.GPUS["b200"]
    assert perf.hardware_for(validate.load(["target=cpu"]).target) is perf.CPU
    assert perf.math_of(validate.load(["quant=nvfp4", "target=b200"]).quant.format, perf.GPUS["b200"]) == "fp4"


def test_the_slo_rule_judges_model_and_measurement_alike() -> None:
    slo = SLOConfig(ttft_ms_p99=1000, itl_ms_p99=30)
    assert slo.misses({"ttft_ms_p99": 900.0, "itl_ms_p99": 35.0}) == {"itl_ms_p99": 5.0}
    assert slo.misses({"ttft_ms_p99": float("nan"), "itl_ms_p99": 10.0}) == {"ttft_ms_p99": float("inf")}
    assert SLOConfig().misses({"ttft_ms_p99": 1e9}) == {}
