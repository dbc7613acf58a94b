"""A performance model for ranking deployments before any is built: TTFT, ITL and throughput
against concurrency, from first principles.

One engine step at ``b`` sequences in decode reads every weight of the rank once and the KV cache
of every sequence (memory bound at small batches), does 2 FLOPs per parameter per token (compute
bound at large ones), and, with tensor parallelism, all-reduces the hidden state twice per layer
over NVLink. A step takes ``overhead + max(memory, compute) + all-reduce``. Prefill is compute
bound: ``isl`` tokens at the format's dense peak. In a closed loop of ``c`` users, the prefills of
arriving requests share the engine with the decode steps: the fraction of time they take inflates
the ITL, and a request's TTFT is its prefill plus the step it waits for.

Two efficiencies turn peak numbers into achieved ones (GPU_BANDWIDTH_EFFICIENCY,
GPU_COMPUTE_EFFICIENCY): chosen so that the model lands near NVIDIA's published trtllm-bench
throughput for Llama-3.x-70B FP8 TP2 on H100 (tests/unit/test_perf_model.py says how near). On
the CPU target the reference runtime is far from any roofline, so its two constants (a per-step
overhead and a scale on the roofline) are fitted from the measurements ``tune`` makes
(``Calibration.fit``): the ranking improves as the search runs.

The GPU table (datasheet figures: HBM bandwidth, dense tensor-core peak per data type, NVLink
bandwidth per direction) lives here and nowhere else.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.config.schema import Architecture, KVCacheDType, QuantFormat, SLOConfig, TargetConfig, WorkloadConfig
from pipeline.sizing import memory

GB = 1e9


@dataclass(frozen=True)
class Hardware:
    """One accelerator (or the CPU target's host): what a step's arithmetic is divided by."""

    name: str
    bandwidth_gbs: float  # memory bandwidth, GB/s
    tflops: dict[str, float]  # dense peak by the math the format runs in: bf16, fp8, int8, fp4
    interconnect_gbs: float  # per direction, per GPU (NVLink); 0: no tensor parallelism across it
    allreduce_latency_us: float = 8.0  # one all-reduce's fixed cost
    step_overhead_ms: float = 1.0  # scheduling and kernel launches per engine step


# datasheet figures (dense, no sparsity); a target's `gpu` or `name` finds its row
GPUS: dict[str, Hardware] = {
    "h100": Hardware("H100 SXM", 3350, {"bf16": 989, "fp8": 1979, "int8": 1979}, 450),
    "h200": Hardware("H200 SXM", 4800, {"bf16": 989, "fp8": 1979, "int8": 1979}, 450),
    "a100": Hardware("A100 SXM 80GB", 2039, {"bf16": 312, "int8": 624}, 300),
    "l40s": Hardware("L40S", 864, {"bf16": 362, "fp8": 733, "int8": 733}, 32),  # PCIe Gen4 x16
    "b200": Hardware("B200", 8000, {"bf16": 2250, "fp8": 4500, "int8": 4500, "fp4": 9000}, 900),
}
# the CPU target: a rough host (fp32 math, the reference runtime's); tune fits it to what it measures
CPU = Hardware("CPU (reference runtime)", 10, {"bf16": 0.05}, 0, 0.0, 20.0)

# achieved fractions of the peaks on GPUs (see the module's docstring)
GPU_BANDWIDTH_EFFICIENCY = 0.5
GPU_COMPUTE_EFFICIENCY = 0.45
# p99 over the p50 the model predicts: queueing spreads TTFT much more than the steady ITL
TTFT_TAIL = 1.5
ITL_TAIL = 1.1


def hardware_for(target: TargetConfig) -> Hardware | None:
    if not target.is_gpu:
        return CPU
    if target.name in GPUS:
        return GPUS[target.name]
    label = (target.gpu or "").lower()
    return next((hw for key, hw in GPUS.items() if key in label), None)


def math_of(fmt: QuantFormat, hw: Hardware) -> str:
    """The data type a format's matrix multiplies run in (the peak it is divided by)."""
    wanted = {
        QuantFormat.fp8: "fp8",
        QuantFormat.w4a8_awq: "fp8",
        QuantFormat.int8_sq: "int8",
        QuantFormat.nvfp4: "fp4",
    }.get(fmt, "bf16")
    return wanted if wanted in hw.tflops else "bf16"


@dataclass
class Calibration:
    """``measured step = overhead_ms + scale x the model's step``: 0 and 1 until fitted."""

    overhead_ms: float = 0.0
    scale: float = 1.0
    points: int = 0

    @classmethod
    def fit(cls, pairs: list[tuple[float, float]]) -> Calibration:
        """Least squares over (the model's ITL in ms, the measured ITL in ms); one pair fits the
        scale alone, none keeps the defaults."""
        pairs = [(x, y) for x, y in pairs if x > 0 and y > 0 and math.isfinite(x) and math.isfinite(y)]
        if not pairs:
            return cls()
        if len(pairs) == 1 or len({round(x, 6) for x, _ in pairs}) == 1:
            x, y = pairs[0]
            return cls(0.0, y / x, len(pairs))
        n = len(pairs)
        mean_x, mean_y = sum(x for x, _ in pairs) / n, sum(y for _, y in pairs) / n
        var = sum((x - mean_x) ** 2 for x, _ in pairs)
        scale = sum((x - mean_x) * (y - mean_y) for x, y in pairs) / var
        overhead = mean_y - scale * mean_x
        if scale <= 0 or overhead < 0:  # a fit that says "slower with less work": scale alone
            return cls(0.0, sum(y for _, y in pairs) / sum(x for x, _ in pairs), n)
        return cls(overhead, scale, n)


@dataclass(frozen=True)
class Deployment:
    """What the model needs of a candidate."""

    arch: Architecture
    fmt: QuantFormat
    kv_dtype: KVCacheDType | None
    tp: int
    pp: int
    hw: Hardware
    max_batch_size: int
    max_num_tokens: int


@dataclass(frozen=True)
class Prediction:
    concurrency: int
    ttft_ms_p50: float
    ttft_ms_p99: float
    itl_ms_p50: float
    itl_ms_p99: float
    output_tokens_per_s: float  # the whole deployment (one engine)
    tokens_per_s_per_gpu: float
    tokens_per_s_per_user: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _efficiencies(hw: Hardware) -> tuple[float, float]:
    return (1.0, 1.0) if hw is CPU else (GPU_BANDWIDTH_EFFICIENCY, GPU_COMPUTE_EFFICIENCY)


@dataclass(frozen=True)
class _Rates:
    """What a step costs, per unit, for one deployment (worked out once per prediction)."""

    fixed_ms: float  # the step's overhead and reading the rank's weights
    kv_ms_per_token_read: float
    compute_ms_per_token: float
    comm_ms_per_token: float
    comm_fixed_ms: float
    weights_ms: float


def _rates(d: Deployment) -> _Rates:
    bw_eff, flop_eff = _efficiencies(d.hw)
    if d.hw is CPU:  # the reference runtime computes in float32 whatever the format simulates
        weights = (d.arch.approx_params or 0.0) * 4
    else:
        weights = memory.weight_bytes_per_gpu(d.arch, d.fmt, d.tp, d.pp)
    _, kv_per_token = memory.kv_bytes_per_token(d.arch, d.tp, d.pp, d.kv_dtype)
    per_byte_ms = 1000 / (d.hw.bandwidth_gbs * GB * bw_eff)
    params = (d.arch.approx_params or 0.0) / d.tp / d.pp
    compute = 2 * params / (d.hw.tflops[math_of(d.fmt, d.hw)] * 1e12 * flop_eff) * 1000
    comm_per_token = comm_fixed = 0.0
    if d.tp > 1 and d.hw.interconnect_gbs:
        layers = math.ceil((d.arch.num_hidden_layers or 0) / d.pp)
        ring_per_token = 2 * (d.tp - 1) / d.tp * (d.arch.hidden_size or 0) * 2 / (d.hw.interconnect_gbs * GB) * 1000
        comm_per_token = 2 * layers * ring_per_token  # 16-bit hidden states, two all-reduces a layer
        comm_fixed = 2 * layers * d.hw.allreduce_latency_us / 1000
    return _Rates(d.hw.step_overhead_ms, kv_per_token * per_byte_ms, compute, comm_per_token, comm_fixed,
                  weights * per_byte_ms)  # fmt: skip


def step_ms(d: Deployment, sequences: float, context: float, tokens: float, rates: _Rates | None = None) -> float:
    """One engine step: ``tokens`` processed (decode and prefill together), ``sequences`` whose
    KV cache of ``context`` tokens each is read. The slowest pipeline stage's share, times pp."""
    r = rates or _rates(d)
    memory_ms = r.weights_ms + sequences * context * r.kv_ms_per_token_read
    compute_ms = tokens * r.compute_ms_per_token
    comm_ms = r.comm_fixed_ms + tokens * r.comm_ms_per_token if r.comm_fixed_ms else 0.0
    return d.pp * (r.fixed_ms + max(memory_ms, compute_ms) + comm_ms)


def predict(
    d: Deployment, work: WorkloadConfig, concurrency: int, calibration: Calibration | None = None
) -> Prediction:
    """The steady state of ``concurrency`` closed-loop users sending the workload's requests.
    In-flight batching puts the prompts of arriving requests into the same steps as the running
    sequences' next tokens: a step processes ``running`` decode tokens plus the prompt tokens that
    arrive per step, so prefill costs compute, not another pass over the weights."""
    cal = calibration or Calibration()
    isl, osl = work.input_tokens, work.output_tokens
    running = min(concurrency, d.max_batch_size)  # more users than the batch wait in the queue
    context = isl + osl / 2  # a decoding sequence's average KV length

    rates = _rates(d)

    def step(tokens: float) -> float:
        return cal.overhead_ms + cal.scale * step_ms(d, running, context, tokens, rates)

    chunk = min(isl, max(1, d.max_num_tokens))
    chunks = math.ceil(isl / chunk)
    itl = step(running)
    ttft = chunks * step(running + chunk)
    for _ in range(50):  # fixed point: the prompt tokens per step follow the request rate
        lifetime = ttft + osl * itl
        prompt_tokens_per_step = running / lifetime * isl * itl
        previous, itl = itl, step(running + prompt_tokens_per_step)
        if abs(itl - previous) < 1e-4 * previous:
            break
    lifetime = ttft + osl * itl
    tokens_per_s = running / (lifetime / 1000) * osl
    waiting = max(0, concurrency - running)  # queued users wait for a slot: a lifetime per batch ahead
    ttft += waiting / running * lifetime
    gpus = d.tp * d.pp
    return Prediction(
        concurrency=concurrency,
        ttft_ms_p50=ttft,
        ttft_ms_p99=ttft * TTFT_TAIL,
        itl_ms_p50=itl,
        itl_ms_p99=itl * ITL_TAIL,
        output_tokens_per_s=tokens_per_s,
        tokens_per_s_per_gpu=tokens_per_s / gpus,
        tokens_per_s_per_user=1000 / itl,
    )


def concurrency_levels(max_batch_size: int, count: int = 0) -> list[int]:
    """Powers of two up to the batch limit (and the limit itself): the loads a sweep tries."""
    levels, c = [], 1
    while c < max_batch_size:
        levels.append(c)
        c *= 2
    levels.append(max_batch_size)
    return levels[-count:] if count else levels


def best_under_slo(
    d: Deployment, work: WorkloadConfig, slo: SLOConfig, calibration: Calibration | None = None
) -> tuple[Prediction, dict[str, float]]:
    """The highest-throughput load that meets the SLO, with no misses; else the load closest to
    it (the lowest) with what it misses."""
    points = [predict(d, work, c, calibration) for c in concurrency_levels(d.max_batch_size)]
    good = [p for p in points if not slo.misses(_values(p, work))]
    if good:
        return max(good, key=lambda p: p.output_tokens_per_s), {}
    return points[0], slo.misses(_values(points[0], work))


def _values(p: Prediction, work: WorkloadConfig) -> dict[str, float]:
    return {
        "ttft_ms_p99": p.ttft_ms_p99,
        "itl_ms_p99": p.itl_ms_p99,
        "e2e_ms_p99": p.ttft_ms_p99 + work.output_tokens * p.itl_ms_p99,
    }
