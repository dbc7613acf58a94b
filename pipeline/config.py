"""Configuration: dataclass schemas registered in Hydra's ConfigStore, YAML groups under ``conf/``
that extend them, ``load()`` that turns command-line overrides into a typed config (one clear line
for any bad override), and ``validate()`` that collects every cross-field problem at once.

Schema lives here; values live in YAML. Closed choices are StrEnums so OmegaConf rejects unknown
values with the allowed list.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from pipeline import rules
from pipeline.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
SCHEMA_SUFFIX = "_schema"  # ConfigStore entries that YAML files extend; never a user choice


# Member names equal their values: OmegaConf matches a YAML string against enum *names*.
class Source(StrEnum):
    hf = "hf"  # a Hugging Face Hub repository
    local = "local"  # a folder holding a Hugging Face checkpoint
    gguf = "gguf"  # a GGUF file (or one shipped inside an installed Python package)


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
    arch: Architecture = field(default_factory=Architecture)


class QuantFormat(StrEnum):
    none = "none"  # unquantized, exported in model.dtype
    fp8 = "fp8"  # FP8 weights and activations, per-tensor scales
    int4_awq = "int4_awq"  # INT4 weights (AWQ, per-group scales), 16-bit activations
    w4a8_awq = "w4a8_awq"  # INT4 weights (AWQ), FP8 activations
    int8_sq = "int8_sq"  # INT8 weights and activations with SmoothQuant
    nvfp4 = "nvfp4"  # FP4 (E2M1) weights and activations, FP8 block scales: Blackwell


class KVCacheDType(StrEnum):
    fp8 = "fp8"
    int8 = "int8"


@dataclass
class CalibConfig:
    """Calibration data. A null value means "automatic" (see pipeline/calibration.py): small
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


@dataclass
class BuildConfig:
    """Engine limits and trtllm-build options. A null switch means "follow NVIDIA's advice for this
    model, format and GPU" (see pipeline/trtllm.py); true/false forces it."""

    name: str = MISSING
    max_batch_size: int = 64
    max_input_len: int = 2048
    max_seq_len: int = 4096
    max_num_tokens: int = 8192
    kv_cache_type: str = "paged"  # paged | continuous
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
    extra_args: list[str] = field(default_factory=list)  # any other trtllm-build flag, e.g. [--strip_plan]
    timeout_s: int = 7200


class Expose(StrEnum):
    ensemble = "ensemble"  # preprocessing -> tensorrt_llm -> postprocessing as a Triton ensemble
    bls = "bls"  # the same chain driven by the tensorrt_llm_bls python model
    both = "both"


class BatchingStrategy(StrEnum):
    inflight_fused_batching = "inflight_fused_batching"
    inflight_batching = "inflight_batching"
    V1 = "V1"  # static batching


class SchedulerPolicy(StrEnum):
    max_utilization = "max_utilization"
    guaranteed_no_evict = "guaranteed_no_evict"


@dataclass
class TritonConfig:
    """The Triton model repository and the server that serves it."""

    name: str = MISSING
    max_batch_size: int | None = None  # null: the engine's build.max_batch_size (must be equal)
    preferred_batch_sizes: list[int] = field(default_factory=list)  # empty: [max_batch_size]
    # How long the engine model's batcher waits to fill a batch. null: 0 on GPU targets (in-flight
    # batching admits requests at every step anyway), 50 ms on the CPU target, whose python model
    # batches only the requests that arrive together.
    max_queue_delay_microseconds: int | None = None
    max_queue_size: int = 0  # requests waiting beyond this are rejected; 0: unbounded
    preprocessing_instances: int = 1
    postprocessing_instances: int = 1
    bls_instances: int = 1
    streaming: bool = True  # decoupled engine model: token streaming over gRPC and generate_stream
    expose: Expose = Expose.ensemble
    chat_template: bool = True  # wrap text_input in the model's chat template (chat models)
    add_special_tokens: bool = False  # when chat_template is off: let the tokenizer add BOS
    # engine (GPU) settings of Triton's TensorRT-LLM backend
    batching_strategy: BatchingStrategy = BatchingStrategy.inflight_fused_batching
    batch_scheduler_policy: SchedulerPolicy = SchedulerPolicy.guaranteed_no_evict
    kv_cache_free_gpu_mem_fraction: float = 0.9
    enable_chunked_context: bool = True
    enable_kv_cache_reuse: bool | None = None  # null: on when chat prompts share a template prefix
    exclude_input_in_output: bool = True
    # server
    host: str = "127.0.0.1"  # bind address; 0.0.0.0 serves other hosts
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    ready_timeout_s: int = 600  # large engines take minutes to load


@dataclass
class SLOConfig:
    """Service-level objectives for goodput; null: no limit on that latency."""

    ttft_ms: float | None = None
    itl_ms: float | None = None
    e2e_ms: float | None = None


@dataclass
class BenchmarkConfig:
    name: str = MISSING
    enabled: bool = True
    concurrency: list[int] = field(default_factory=lambda: [1, 8])  # closed loop, one point each
    rates: list[float] = field(default_factory=list)  # open loop (Poisson), requests/s, one point each
    requests_per_point: int = 16
    warmup_requests: int = 2
    input_tokens: int = 64
    input_tokens_stddev: float = 0.0
    output_tokens: int = 32
    output_tokens_stddev: float = 0.0
    prompts_file: str | None = None  # JSONL: {"text": ..., "max_tokens": ...} per line
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 0.0
    ignore_eos: bool = True  # generate exactly the asked output length
    seed: int = 0
    model: str | None = None  # null: the repository's entry model (ensemble or tensorrt_llm_bls)
    timeout_s: float = 300.0  # per request; a silent server ends the point
    slo: SLOConfig = field(default_factory=SLOConfig)


@dataclass
class TrackingConfig:
    name: str = MISSING
    enabled: bool = True
    uri: str | None = None  # null: sqlite:///<workdir>/mlflow.db
    experiment: str | None = None  # null: one experiment per model, named after it


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel ranks
    pp: int = 1  # pipeline parallel ranks


@dataclass
class PipelineConfig:
    model: ModelConfig = MISSING
    quant: QuantConfig = MISSING
    target: TargetConfig = MISSING
    build: BuildConfig = MISSING
    triton: TritonConfig = MISSING
    benchmark: BenchmarkConfig = MISSING
    tracking: TrackingConfig = MISSING
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    workdir: str = "./artifacts"
    force: bool = False  # redo every stage even when its artifacts are cached
    redo: list[str] = field(default_factory=list)  # redo these stages only, e.g. redo=[quantize]
    dry_run: bool = False  # print the plan and stop
    until: str | None = None  # run the stages up to and including this one (e.g. until=fetch)


def register() -> None:
    """Put the schemas in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="pipeline" + SCHEMA_SUFFIX, node=PipelineConfig)
    store.store(group="model", name="model" + SCHEMA_SUFFIX, node=ModelConfig)
    store.store(group="quant", name="quant" + SCHEMA_SUFFIX, node=QuantConfig)
    store.store(group="target", name="target" + SCHEMA_SUFFIX, node=TargetConfig)
    store.store(group="build", name="build" + SCHEMA_SUFFIX, node=BuildConfig)
    store.store(group="triton", name="triton" + SCHEMA_SUFFIX, node=TritonConfig)
    store.store(group="benchmark", name="benchmark" + SCHEMA_SUFFIX, node=BenchmarkConfig)
    store.store(group="tracking", name="tracking" + SCHEMA_SUFFIX, node=TrackingConfig)


def group_options(group: str) -> list[str]:
    """The choices a user can type for a config group (the YAML files of ``conf/<group>/``)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def groups() -> list[str]:
    return sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())


def compose(overrides: Sequence[str]) -> DictConfig:
    """Compose ``conf/config.yaml`` with overrides; any Hydra/OmegaConf complaint becomes one line."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pipeline.config_errors import describe

    for override in overrides:
        if override.startswith(("+", "~")):
            raise ConfigError(
                f"'{override}': adding or deleting config keys is not supported; set a known key "
                "(python -m pipeline build --help lists them)"
            )
    register()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides))
    except Exception as error:  # Hydra raises several unrelated types; all mean "bad override"
        raise ConfigError(describe(error, overrides)) from error


def to_typed(cfg: DictConfig) -> PipelineConfig:
    typed = OmegaConf.to_object(cfg)
    assert isinstance(typed, PipelineConfig)
    return typed


def load(overrides: Sequence[str] = ()) -> PipelineConfig:
    """Overrides -> validated, typed config. Raises ConfigError listing every problem."""
    cfg = to_typed(compose(overrides))
    if cfg.target.kind is TargetKind.auto:
        from pipeline.hardware import detect

        cfg.target = detect()
    problems = validate(cfg)
    if problems:
        raise ConfigError("; ".join(problems) if len(problems) > 1 else problems[0])
    return cfg


def to_yaml(cfg: PipelineConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(obj: Any) -> Any:
    """Plain JSON-able data (enums become their string values) of a config node."""
    return OmegaConf.to_container(OmegaConf.structured(obj), enum_to_str=True)


# ---------------------------------------------------------------------------------------------
# Cross-field validation: pure, cheap (no weights, no network), every problem reported together.


def _source_problems(model: ModelConfig) -> list[str]:
    if model.source is Source.hf and not model.repo_id:
        return ["model.source=hf needs model.repo_id=<org/name>"]
    if model.source is Source.local:
        if not model.path:
            return ["model.source=local needs model.path=<folder with config.json and weights>"]
        if not Path(model.path).expanduser().is_dir():
            return [f"model.path={model.path} is not a folder: point it at a Hugging Face checkpoint"]
    if model.source is Source.gguf and not (model.path or (model.package and model.file)):
        return ["model.source=gguf needs model.path=<file.gguf> or model.package=<pkg> model.file=<name>"]
    return []


def validate(cfg: PipelineConfig) -> list[str]:
    """Every cross-field problem, each naming the override that fixes it. Empty means valid."""
    problems = _source_problems(cfg.model)
    for name in (
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "hidden_size",
        "intermediate_size",
        "vocab_size",
        "max_position_embeddings",
    ):
        value = getattr(cfg.model.arch, name)
        if value is not None and value < 1:
            problems.append(f"model.arch.{name}={value} must be positive")
    on_gpu = cfg.target.kind is TargetKind.gpu
    problems += rules.architecture_problems(cfg.model.name, cfg.model.arch.architectures, on_gpu)
    problems += rules.parallel_problems(cfg)
    problems += rules.gpu_format_problems(cfg)
    problems += _quant_problems(cfg)
    problems += _build_problems(cfg)
    problems += _triton_problems(cfg)
    problems += _benchmark_problems(cfg.benchmark)
    if not problems:  # the memory plan needs a configuration that is otherwise sound
        from pipeline import planner

        problems += planner.problems(cfg)
    return problems


def _benchmark_problems(bench: BenchmarkConfig) -> list[str]:
    problems = []
    if any(c < 1 for c in bench.concurrency) or any(r <= 0 for r in bench.rates):
        problems.append("benchmark.concurrency values must be >= 1 and benchmark.rates > 0")
    if bench.enabled and not (bench.concurrency or bench.rates):
        problems.append("benchmark.concurrency and benchmark.rates are both empty: give one, or benchmark=none")
    if bench.enabled and bench.prompts_file and not Path(bench.prompts_file).expanduser().is_file():
        problems.append(
            f"benchmark.prompts_file={bench.prompts_file} does not exist: give a JSONL file with a 'text' per line"
        )
    if bench.requests_per_point < 1 or bench.input_tokens < 1 or bench.output_tokens < 1:
        problems.append("benchmark.requests_per_point, input_tokens and output_tokens must be at least 1")
    return problems


def _triton_problems(cfg: PipelineConfig) -> list[str]:
    triton, engine_batch = cfg.triton, cfg.build.max_batch_size
    problems = []
    if triton.max_batch_size is not None and triton.max_batch_size != engine_batch:
        problems.append(
            f"triton.max_batch_size={triton.max_batch_size} differs from the engine's build.max_batch_size="
            f"{engine_batch}: leave triton.max_batch_size=null or set both"
        )
    wrong = [size for size in triton.preferred_batch_sizes if not 1 <= size <= engine_batch]
    if wrong:
        problems.append(f"triton.preferred_batch_sizes {wrong} must lie in 1..{engine_batch} (build.max_batch_size)")
    ports = [triton.http_port, triton.grpc_port, triton.metrics_port]
    if len(set(ports)) < 3 or not all(0 < p < 65536 for p in ports):
        problems.append(f"triton.http_port, grpc_port and metrics_port must be three distinct ports, not {ports}")
    if not 0 < triton.kv_cache_free_gpu_mem_fraction <= 1:
        problems.append("triton.kv_cache_free_gpu_mem_fraction must lie in (0, 1]")
    if min(triton.preprocessing_instances, triton.postprocessing_instances, triton.bls_instances) < 1:
        problems.append("triton.*_instances must be at least 1")
    return problems


def _build_problems(cfg: PipelineConfig) -> list[str]:
    from pipeline import trtllm

    build, context = cfg.build, cfg.model.arch.max_position_embeddings
    problems = []
    if build.max_input_len > build.max_seq_len:
        problems.append(
            f"build.max_input_len={build.max_input_len} exceeds build.max_seq_len={build.max_seq_len}: "
            "raise build.max_seq_len or lower build.max_input_len"
        )
    if context and build.max_seq_len > context:
        problems.append(
            f"build.max_seq_len={build.max_seq_len} exceeds the {context}-token context of "
            f"{cfg.model.name}: use build.max_seq_len<={context}"
        )
    if build.max_batch_size < 1 or build.max_num_tokens < 1:
        problems.append("build.max_batch_size and build.max_num_tokens must be at least 1")
    problems += trtllm.extra_arg_problems(build.extra_args)
    problems += trtllm.switch_problems(cfg)
    if build.workers is not None and build.workers < 1:
        problems.append("build.workers must be at least 1 (or null: one per rank the target's GPUs allow)")
    return problems


def _quant_problems(cfg: PipelineConfig) -> list[str]:
    from pipeline import calibration

    quant = cfg.quant
    if quant.format is QuantFormat.none:
        return (
            ["quant.kv_cache_dtype needs a quantized format: use quant=fp8 (or another) or quant.kv_cache_dtype=null"]
            if quant.kv_cache_dtype
            else []
        )
    problems = []
    if quant.calib.num_samples is not None and quant.calib.num_samples < 1:
        problems.append("quant.calib.num_samples must be at least 1")
    dataset = calibration.plan(cfg).dataset
    if dataset not in (calibration.BUILTIN, "cnn_dailymail") and not Path(dataset).expanduser().is_file():
        problems.append(
            f"quant.calib.dataset={dataset} is not a file: use builtin, cnn_dailymail or a .txt/.jsonl file"
        )
    return problems
