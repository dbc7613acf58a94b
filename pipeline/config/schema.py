"""The configuration schema: dataclasses that Hydra's ConfigStore holds and the YAML groups under
``conf/`` extend, and the facts derived from them (world size, head size, format families). A leaf:
it imports nothing from the pipeline, so every other module can depend on it.

Schema lives here; values live in YAML (``pipeline.config.compose`` composes them, and
``pipeline.validate`` checks them). Closed choices are StrEnums so OmegaConf rejects unknown values
with the allowed list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf


# Member names equal their values: OmegaConf matches a YAML string against enum *names*.
class Source(StrEnum):
    hf = "hf"  # a Hugging Face Hub repository
    local = "local"  # a folder holding a Hugging Face checkpoint
    gguf = "gguf"  # a GGUF file (or one shipped inside an installed Python package)


class Endpoint(StrEnum):
    triton = "triton"  # KServe v2 gRPC streaming to the repository's entry model
    openai = "openai"  # any OpenAI-compatible server: /v1/completions with SSE streaming
    # Triton's LLM-API model (backend=pytorch): sampling_param_* inputs over gRPC streaming; a
    # build's own benchmark of such a repository uses it whenever endpoint=triton
    llmapi = "llmapi"


class BenchTool(StrEnum):
    pipeline = "pipeline"  # the pipeline's own load generator
    aiperf = "aiperf"  # the same, then NVIDIA AIPerf at every load point, as a cross-check


class Backend(StrEnum):
    # TensorRT-LLM 1.1/1.2: trtllm-build compiles engines from a TensorRT-LLM checkpoint; Triton
    # serves them with its tensorrtllm backend (preprocessing, engine, postprocessing models)
    tensorrt = "tensorrt"
    # TensorRT-LLM >= 1.3 (the only backend left there): the PyTorch backend loads ModelOpt's
    # unified Hugging Face checkpoint, no build; served by Triton's LLM-API python model or trtllm-serve
    pytorch = "pytorch"


class DType(StrEnum):
    float16 = "float16"
    bfloat16 = "bfloat16"


@dataclass
class Architecture:
    """Architecture numbers, named as in the checkpoint's ``config.json`` so that planning works
    without a download and the fetched checkpoint can be checked against them."""

    architectures: list[str] | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    vocab_size: int | None = None
    max_position_embeddings: int | None = None
    head_dim: int | None = None  # when not hidden_size / num_attention_heads

    @property
    def head_size(self) -> int | None:
        if self.head_dim:
            return self.head_dim
        if self.hidden_size and self.num_attention_heads:
            return self.hidden_size // self.num_attention_heads
        return None

    @property
    def linear_params_per_layer(self) -> int | None:
        """Weights of one decoder layer's linear layers: q, k, v, o and gate, up, down."""
        h, inter, heads, head = self.hidden_size, self.intermediate_size, self.num_attention_heads, self.head_size
        if not (h and inter and heads and head):
            return None
        kv = self.num_key_value_heads or heads
        return h * head * (2 * heads + 2 * kv) + 3 * h * inter

    @property
    def approx_params(self) -> float | None:
        """Parameter count: linear layers of every decoder layer, embedding and lm_head."""
        linear = self.linear_params_per_layer
        if linear is None or not (self.num_hidden_layers and self.vocab_size and self.hidden_size):
            return None
        return float(self.num_hidden_layers * linear + 2 * self.vocab_size * self.hidden_size)


@dataclass
class ModelConfig:
    name: str = MISSING
    source: Source = Source.hf
    repo_id: str | None = None  # hf: "org/name"
    revision: str = "main"  # hf: branch, tag or commit; the resolved commit sha is recorded
    path: str | None = None  # local: checkpoint folder; gguf: a .gguf file
    package: str | None = None  # gguf: an installed Python package that ships `file`
    file: str | None = None  # gguf: file name inside `package`
    dtype: DType = DType.bfloat16  # dtype of unquantized weights (and of a GGUF conversion)
    allow_pickle: bool = False  # accept *.bin (pickle) weights, which can run code when loaded
    trust_remote_code: bool = False  # allow the checkpoint's own Python code
    calib_dataset: str = "cnn_dailymail"  # calibration text when quant.calib.dataset is null
    # sampling defaults of the model card (e.g. temperature, top_p): the OpenAI API uses them for
    # fields a request leaves out; they travel in the repository's repository.json
    sampling_defaults: dict[str, float] = field(default_factory=dict)
    arch: Architecture = field(default_factory=Architecture)


class QuantFormat(StrEnum):
    none = "none"  # unquantized, exported in model.dtype
    fp8 = "fp8"  # FP8 weights and activations, per-tensor scales
    int4_awq = "int4_awq"  # INT4 weights (AWQ, per-group scales), 16-bit activations
    w4a8_awq = "w4a8_awq"  # INT4 weights (AWQ), FP8 activations
    int8_sq = "int8_sq"  # INT8 weights and activations with SmoothQuant
    nvfp4 = "nvfp4"  # FP4 (E2M1) weights and activations, FP8 block scales: Blackwell

    @property
    def is_awq(self) -> bool:
        """INT4 weights with AWQ's per-group scales (group size quant.awq_block_size)."""
        return self in (QuantFormat.int4_awq, QuantFormat.w4a8_awq)

    @property
    def fp8_activations(self) -> bool:
        """Activations in FP8: needs SM >= 89."""
        return self in (QuantFormat.fp8, QuantFormat.w4a8_awq)


class KVCacheDType(StrEnum):
    fp8 = "fp8"
    int8 = "int8"


@dataclass
class CalibConfig:
    """Calibration data. A null value means "automatic" (see pipeline/sizing/calibration.py): small
    models get CPU-friendly sizes, others NVIDIA's defaults (512 samples of 512 tokens; AWQ 32)."""

    dataset: str | None = None  # builtin | cnn_dailymail | /path/to/file.txt|.jsonl; null: the model's
    num_samples: int | None = None
    max_length: int | None = None
    batch_size: int = 4


@dataclass
class QuantConfig:
    format: QuantFormat = QuantFormat.none
    kv_cache_dtype: KVCacheDType | None = None
    awq_block_size: int = 128  # AWQ group size: 64 or 128
    calib: CalibConfig = field(default_factory=CalibConfig)
    eval_tokens: int = 1024  # held-out tokens scored for the quality report (0 turns it off)


class TargetKind(StrEnum):
    auto = "auto"  # the GPUs nvidia-smi finds, else cpu
    cpu = "cpu"  # reference runtime (PyTorch) instead of TensorRT engines
    gpu = "gpu"


@dataclass
class TargetConfig:
    name: str = MISSING
    kind: TargetKind = TargetKind.cpu
    gpu: str | None = None  # marketing name, e.g. "NVIDIA H100 80GB HBM3"
    sm: int | None = None  # compute capability x 10, e.g. 90 for Hopper
    memory_gib: float | None = None  # per GPU
    count: int = 0  # GPUs per node
    nodes: int = 1  # only 1 for now: multi-node serving needs one mpirun across hosts (refused)
    price_per_gpu_hour: float | None = None  # USD, for cost per token

    @property
    def is_gpu(self) -> bool:
        return self.kind is TargetKind.gpu


@dataclass
class BuildConfig:
    """Engine limits and trtllm-build options. A null switch means "follow NVIDIA's advice for this
    model, format and GPU" (see pipeline/stages/engine/trtllm.py); true/false forces it."""

    name: str = MISSING
    # null: sized from the memory plan's KV cache capacity and the workload's lengths, the way
    # trtllm-bench sizes its engines (pipeline/sizing/limits.py; `plan` shows what and why)
    max_batch_size: int | None = None
    max_input_len: int = 2048
    max_seq_len: int = 4096
    max_num_tokens: int | None = None
    max_beam_width: int = 1  # beams a request may ask for (beam_width); wider engines take more memory
    kv_cache_type: str = "paged"  # paged | continuous
    tokens_per_block: int = 32  # positions per KV cache block (pages of the paged cache, units of reuse)
    gemm_plugin: str | None = None  # null: auto for 16-bit weights, off for FP8/NVFP4
    use_paged_context_fmha: bool = True
    use_fp8_context_fmha: bool | None = None  # null: on with FP8 on SM >= 89
    multiple_profiles: bool = True  # NVIDIA's tuning guide: "always enable" (costs build time only)
    reduce_fusion: bool | None = None  # null: on for tp > 1
    user_buffer: bool | None = None  # null: on for FP8 Llama at tp > 1 on Hopper (needs reduce_fusion)
    norm_quant_fusion: bool | None = None  # null: on for NVFP4 Llama (RMSNorm + FP4 quantize in one kernel)
    fp8_low_latency_gemm: bool = False  # FP8 on Hopper: low-latency GEMM and GEMM+SwiGLU plugins (latency preset)
    workers: int | None = None  # ranks built in parallel; null: every rank the target's GPUs allow
    timing_cache: bool = True  # reuse <workdir>/timing-sm<SM>.cache across builds
    cuda_graphs: bool = True  # backend=pytorch: decode steps as CUDA graphs, batches padded up to max_batch_size
    extra_args: list[str] = field(default_factory=list)  # any other trtllm-build flag, e.g. [--strip_plan]
    timeout_s: int = 7200
    # why the limits are what they are (set by pipeline/sizing/limits.py when it sizes them)
    sized_because: str | None = None

    @property
    def batch(self) -> int:
        """max_batch_size, once ``validate.load`` has sized a null one."""
        assert self.max_batch_size is not None, "build.max_batch_size is sized by validate.load"
        return self.max_batch_size

    @property
    def tokens(self) -> int:
        """max_num_tokens, once ``validate.load`` has sized a null one."""
        assert self.max_num_tokens is not None, "build.max_num_tokens is sized by validate.load"
        return self.max_num_tokens


class Expose(StrEnum):
    ensemble = "ensemble"  # preprocessing -> tensorrt_llm -> postprocessing as a Triton ensemble
    bls = "bls"  # the same chain driven by the tensorrt_llm_bls python model
    both = "both"


class BatchingStrategy(StrEnum):
    inflight_fused_batching = "inflight_fused_batching"
    inflight_batching = "inflight_batching"
    V1 = "V1"  # static batching


class CpuBatching(StrEnum):
    inflight = "inflight"  # requests join and leave the running batch at every step (pipeline.runtime.scheduler)
    run_to_completion = "run_to_completion"  # each dynamic batch runs until its last request ends


class SchedulerPolicy(StrEnum):
    max_utilization = "max_utilization"
    guaranteed_no_evict = "guaranteed_no_evict"


@dataclass
class TritonConfig:
    """The Triton model repository and the server that serves it."""

    name: str = MISSING
    max_batch_size: int | None = None  # null: the engine's build.max_batch_size (must be equal)
    preferred_batch_sizes: list[int] = field(default_factory=list)  # empty: [max_batch_size]
    # How long the engine model's batcher waits to fill a batch. null: 0 with in-flight batching
    # (GPU targets, triton.cpu_batching=inflight: requests are admitted at every step anyway), 50 ms
    # with the CPU target's run_to_completion, which batches only requests that arrive together.
    max_queue_delay_microseconds: int | None = None
    # requests waiting to enter the engine's batch; beyond it a request is refused at once (Triton's
    # "Exceeds maximum queue size", 429 through the OpenAI API). null: 4 x the batch size; 0: no bound
    max_queue_size: int | None = None
    # a request still waiting to enter the engine's batch (or preprocessing) after this long is
    # refused with Triton's "Request timeout expired" (503 through the OpenAI API); 0: no timeout
    queue_timeout_ms: int = 60_000
    preprocessing_instances: int = 1
    postprocessing_instances: int = 1
    bls_instances: int = 1
    # CPU target: torch threads of the engine model; null: every core but one, which is left to
    # Triton's own processes (pre/postprocessing, gRPC) and a client on the host. Measured on 2
    # cores: 1 thread served 35.4 output tok/s at c=8 where 2 threads served 26.5 (busy cores make
    # torch's worker threads wait on each other), and lost nothing at c=1.
    cpu_threads: int | None = None
    # CPU target: how the engine model batches (GPU targets: batching_strategy). inflight: the
    # in-flight scheduler of pipeline/runtime; run_to_completion: dynamic batches run to their end.
    cpu_batching: CpuBatching = CpuBatching.inflight
    # CPU target: prompt tokens per scheduler step, all sequences together, generating sequences'
    # tokens riding along uncounted (GPU targets: the engine's build.max_num_tokens, which is sized
    # for GPU compute; a CPU step of that many tokens would stall every running stream for
    # seconds). A prompt that fits is prefilled in one step. At most build.max_num_tokens.
    cpu_max_num_tokens: int = 128
    # CPU target: a prompt longer than cpu_max_num_tokens is prefilled this many tokens per step, so
    # that running streams keep receiving tokens meanwhile. Measured on 2 cores: 32 keeps their
    # ITL p99 within 2.6x of p50 while a 1500-token prompt is admitted (64: 3.4x).
    cpu_context_chunk_tokens: int = 32
    # CPU target: memory the requests in flight may fill with returned logits (return_context_logits:
    # prompt x vocabulary floats; return_generation_logits: one vocabulary of floats a token): a
    # request that would pass it alone is refused (400), one that would pass it beside the others
    # waits its turn as for a full queue (429). 0: no bound.
    cpu_max_logits_mb: int = 512
    streaming: bool = True  # decoupled engine model: token streaming over gRPC and generate_stream
    # both: the ensemble (entry model of benchmarks, upstream's clients) and the BLS model, which
    # the OpenAI gateway uses: its streamed text is UTF-8 safe and a client that goes away cancels
    # the engine's request (Triton does not pass a cancelled ensemble request on to its steps)
    expose: Expose = Expose.both
    chat_template: bool = True  # wrap text_input in the model's chat template (chat models)
    # guided decoding (guided_decoding_guide_type/guide) through xgrammar: GPU repositories get the
    # xgrammar tokenizer-info file the backend needs, the CPU engine model xgrammar itself
    guided_decoding: bool = True
    add_special_tokens: bool = False  # when chat_template is off: let the tokenizer add BOS
    # backend=pytorch on GPU targets: TensorRT-LLM's triton_backend/all_models/llmapi/tensorrt_llm/1
    # at the installed version, whose model.py and helpers.py the repository copies; null: the
    # PIPELINE_LLMAPI_MODEL_DIR environment variable (set by the Dockerfile)
    llmapi_model_dir: str | None = None
    # engine (GPU) settings of Triton's TensorRT-LLM backend
    batching_strategy: BatchingStrategy = BatchingStrategy.inflight_fused_batching
    batch_scheduler_policy: SchedulerPolicy = SchedulerPolicy.guaranteed_no_evict
    # KV cache size: this fraction of the memory free once the weights are loaded (CPU target:
    # host memory), capped by max_tokens_in_paged_kv_cache when set. null: 0.95 on GPU targets,
    # NVIDIA's own benchmark setting (its perf overview: better than the backend's default 0.9),
    # and 0.9 on the CPU target, whose host also runs Triton's other processes and the clients
    kv_cache_free_gpu_mem_fraction: float | None = None
    max_tokens_in_paged_kv_cache: int | None = None
    cancellation_check_period_ms: int = 100  # how often a request's cancellation is checked
    enable_chunked_context: bool = True
    enable_kv_cache_reuse: bool | None = None  # null: on when chat prompts share a template prefix
    exclude_input_in_output: bool = True
    # server
    host: str = "127.0.0.1"  # bind address; 0.0.0.0 serves other hosts
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    ready_timeout_s: int = 600  # large engines take minutes to load
    # on stop, how long Triton lets in-flight requests finish and models unload before it exits
    # (tritonserver --exit-timeout-secs)
    exit_timeout_s: int = 30


@dataclass
class WorkloadConfig:
    """The traffic a deployment is sized, measured and tuned for: read by the engine limits'
    sizing (``pipeline/sizing/limits.py``), ``plan``, the benchmark and ``tune`` alike."""

    input_tokens: int = 64  # prompt tokens per request (the mean when input_tokens_stddev > 0)
    input_tokens_stddev: float = 0.0
    output_tokens: int = 32  # generated tokens per request (the mean when output_tokens_stddev > 0)
    output_tokens_stddev: float = 0.0
    prompts_file: str | None = None  # JSONL: {"text": ..., "max_tokens": ...} per line, instead of synthetic prompts


@dataclass
class SLOConfig:
    """Service-level objectives, per load point: a point meets them when its p99 latencies are
    within every limit set; goodput counts the requests whose own latencies are. null: no limit."""

    ttft_ms_p99: float | None = None  # time to first token
    itl_ms_p99: float | None = None  # inter-token latency (each request's mean gap between tokens)
    e2e_ms_p99: float | None = None  # whole request

    def limits(self) -> dict[str, float]:
        """{point statistic: limit} of the limits that are set, e.g. {"ttft_ms_p99": 1000.0}."""
        return {key: float(value) for key, value in vars(self).items() if value is not None}

    def misses(self, values: dict[str, float]) -> dict[str, float]:
        """{limit: by how much ``values`` exceed it} (a missing or NaN value misses by infinity)."""
        found = {}
        for key, limit in self.limits().items():
            value = values.get(key, math.nan)
            if value != value:
                found[key] = math.inf
            elif value > limit:
                found[key] = value - limit
        return found


@dataclass
class BenchmarkConfig:
    name: str = MISSING
    enabled: bool = True
    concurrency: list[int] = field(default_factory=lambda: [1, 8])  # closed loop, one point each
    rates: list[float] = field(default_factory=list)  # open loop (Poisson), requests/s, one point each
    requests_per_point: int = 16
    warmup_requests: int = 2
    # closed loop: the workers start one after another over the first request's output, and each
    # worker's first request is left out of the latencies and the throughput (loadgen._Ramp);
    # requests_per_point are measured after them
    ramp_up: bool = True
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 0.0
    ignore_eos: bool = True  # generate exactly the asked output length
    seed: int = 0
    model: str | None = None  # null: the repository's entry model (ensemble or tensorrt_llm_bls)
    timeout_s: float = 300.0  # per request; a silent server ends the point
    # what the load goes through: Triton's gRPC stream, or the OpenAI API (the gateway `serve`
    # starts, or any OpenAI-compatible server given as url=http://host:port/v1)
    endpoint: Endpoint = Endpoint.triton
    tool: BenchTool = BenchTool.pipeline
    # `bench` against a server this workdir did not build: a local folder holding its tokenizer
    # (prompt lengths are exact token counts); null: the last build's
    tokenizer: str | None = None


class GateMode(StrEnum):
    fail = "fail"  # a build that fails the accuracy gate ends with a non-zero status
    warn = "warn"  # the verdict is reported and recorded, the build goes on


# the accuracy a format may lose on a task before the gate fails it, in points of accuracy (0-1)
DEFAULT_MAX_DROP = {"none": 0.01, "fp8": 0.01, "int4_awq": 0.03, "w4a8_awq": 0.03, "int8_sq": 0.03, "nvfp4": 0.03}


@dataclass
class EvalConfig:
    """Accuracy on tasks through the served OpenAI API (lm-evaluation-harness), paired against the
    unquantized build of the same model, and the gate that keeps a build that lost accuracy from
    being promoted."""

    name: str = MISSING
    enabled: bool = True
    # lm-evaluation-harness task names; empty: the pipeline's own (pipeline_capitals, a
    # log-likelihood task, and pipeline_arithmetic, generated), which need no download
    tasks: list[str] = field(default_factory=list)
    limit: int | None = 60  # items per task (null: all); the gate says when a task is too small to tell
    gate: GateMode = GateMode.fail
    # the most accuracy each format may lose on any task (one-sided test at `confidence`)
    max_drop: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MAX_DROP))
    confidence: float = 0.95
    num_concurrent: int = 4  # requests in flight from the harness (the engine batches them)
    timeout_s: float = 600.0  # per request


@dataclass
class TuneConfig:
    """``tune``: the search for the deployment that meets ``slo`` on ``workload`` at the lowest cost."""

    max_trials: int = 4  # candidates built and measured (the best predicted first)
    # with hydra/launcher=<name> (SLURM, Ray, local processes): trials launched together, a job each
    parallel_trials: int = 1
    time_budget_min: float = 60.0  # no new trial starts after this long
    alias: str = "tuned"  # the registry alias the winner gets
    # the load sweep of each trial (closed loop): the highest concurrency meeting the SLO is the
    # candidate's operating point; null: sized from the candidate's batch limit
    concurrency: list[int] | None = None
    requests_per_point: int = 16
    # the search space; empty: every choice the target allows
    formats: list[str] = field(default_factory=list)
    kv_cache_dtypes: list[str] = field(default_factory=list)  # "none" | "fp8" | "int8"
    # multipliers of the sized max_batch_size / max_num_tokens tried around them
    batch_scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    # CPU target: the reference runtime's knobs
    cpu_max_num_tokens: list[int] = field(default_factory=lambda: [64, 128])
    cpu_threads: list[int] = field(default_factory=lambda: [1])
    cpu_max_batch_size: list[int] = field(default_factory=lambda: [4, 8])
    cpu_context_chunk_tokens: list[int] = field(default_factory=lambda: [32])
    seed: int = 0  # the sampler's seed (Optuna TPE after the ranked candidates)


@dataclass
class TrackingConfig:
    name: str = MISSING
    enabled: bool = True
    uri: str | None = None  # null: sqlite:///<workdir>/mlflow.db
    experiment: str | None = None  # null: one experiment per model, named after it
    parent_run: str | None = None  # a sweep's MLflow run this build is a child of (launchers set it)
    # build registers the rendered Triton repository as a version of this registered model (null:
    # the model config's name), the hand-off to `promote` and `serve model_uri=models:/<name>@<alias>`
    register: bool = True
    registered_model: str | None = None


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel ranks
    pp: int = 1  # pipeline parallel ranks

    @property
    def world_size(self) -> int:
        """Ranks of the engine: one GPU each."""
        return self.tp * self.pp


@dataclass
class OpenAIConfig:
    """The OpenAI-compatible API that ``serve`` starts next to Triton (pipeline/deploy/openai)."""

    enabled: bool = True
    host: str | None = None  # null: triton.host (127.0.0.1 unless configured)
    port: int = 9000
    # the API key clients must send, read from this environment variable (never from the config,
    # which is logged); unset or empty: no key needed
    api_key_env: str = "PIPELINE_OPENAI_API_KEY"
    default_max_tokens: int = 256  # chat requests without max_tokens (completions: 16, as OpenAI)
    served_model_name: str | None = None  # what clients put in "model"; null: the model config's name
    # each request's deadline toward Triton, queueing and streaming included (504 past it)
    request_timeout_s: float = 600.0
    # manifests: without an API key Secret the gateway (and a Triton port, if published) is open to
    # anyone who can reach the Service; refused unless this says it is meant
    allow_unauthenticated: bool = False
    # manifests: publish Triton's HTTP and gRPC ports beside the gateway (they take no API key and serve
    # every model); by default Triton listens on the pod's loopback only and the gateway is the way in
    expose_triton: bool = False
    # request bodies larger than this are refused with 413 before they are read (0: sized from the
    # engine's max_seq_len, 64 bytes a token, plus 1 MiB for the rest of the request)
    max_body_bytes: int = 0


@dataclass
class ServeConfig:
    """What `serve` starts on GPU targets."""

    # triton: tritonserver with the rendered repository (and the OpenAI gateway beside it);
    # trtllm-serve (backend=pytorch, GPU targets): trtllm-serve's own OpenAI server on the checkpoint.
    # A string, not an enum: OmegaConf matches enum names, and "trtllm-serve" is not a Python name.
    frontend: str = "triton"
    trtllm_serve_port: int = 8000  # frontend=trtllm-serve: its HTTP port (OpenAI API, /health, /metrics)


@dataclass
class AdapterConfig:
    """One LoRA adapter served beside the base model: PEFT's ``save_pretrained`` folder."""

    name: str = MISSING  # what requests ask for (the OpenAI API's model name)
    path: str | None = None  # a local folder: adapter_config.json and adapter_model.safetensors
    source: str | None = None  # or a Hub repository (org/name) holding those two files
    revision: str = "main"  # the Hub revision: resolved to a commit sha, which the repository records


@dataclass
class LoraConfig:
    """LoRA adapters served per request on one base model (multi-LoRA), e.g.
    ``lora.adapters='[{name: sql, path: /adapters/sql}, {name: support, source: org/support-lora}]'``."""

    adapters: list[AdapterConfig] = field(default_factory=list)
    max_rank: int = 64  # the largest adapter rank the deployment takes (the engine's max_lora_rank)
    cache_adapters: int = 8  # adapters held loaded at once; others are loaded again when asked for


GPU_KV_FRACTION = 0.95  # kv_cache_free_gpu_mem_fraction's default on GPU targets (TritonConfig says why)
CPU_KV_FRACTION = 0.9


@dataclass
class PipelineConfig:
    model: ModelConfig = MISSING
    quant: QuantConfig = MISSING
    target: TargetConfig = MISSING
    build: BuildConfig = MISSING
    triton: TritonConfig = MISSING
    benchmark: BenchmarkConfig = MISSING
    tracking: TrackingConfig = MISSING
    eval: EvalConfig = MISSING
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    openai: OpenAIConfig = field(default_factory=OpenAIConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    slo: SLOConfig = field(default_factory=SLOConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    # tensorrt: engines built by trtllm-build; pytorch: TensorRT-LLM's PyTorch backend (>= 1.3), which
    # serves ModelOpt's unified checkpoint without a build step
    backend: Backend = Backend.tensorrt
    serve: ServeConfig = field(default_factory=ServeConfig)
    workdir: str = "./artifacts"  # every stage's folders, serve logs and the default MLflow store
    force: bool = False  # redo every stage even when its artifacts are cached
    redo: list[str] = field(default_factory=list)  # redo these stages only, e.g. redo=[quantize]
    dry_run: bool = False  # print the plan and stop
    until: str | None = None  # run the stages up to and including this one (e.g. until=fetch)

    @property
    def kv_cache_fraction(self) -> float:
        """triton.kv_cache_free_gpu_mem_fraction, or its default for the target (see TritonConfig)."""
        chosen = self.triton.kv_cache_free_gpu_mem_fraction
        if chosen is not None:
            return chosen
        return GPU_KV_FRACTION if self.target.is_gpu else CPU_KV_FRACTION

    @property
    def prefix_reuse(self) -> bool:
        """triton.enable_kv_cache_reuse; null: on when prompts are wrapped in the chat template,
        whose system prefix they then share (both backends follow this rule)."""
        wanted = self.triton.enable_kv_cache_reuse
        return self.triton.chat_template if wanted is None else wanted

    @property
    def workdir_path(self) -> Path:
        return Path(self.workdir).expanduser().resolve()


def served_model_name(cfg: PipelineConfig) -> str:
    """The model's name on the OpenAI API."""
    return cfg.openai.served_model_name or cfg.model.name


def to_yaml(cfg: PipelineConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(obj: Any) -> Any:
    """Plain JSON-able data (enums become their string values) of a config node."""
    return OmegaConf.to_container(OmegaConf.structured(obj), enum_to_str=True)
