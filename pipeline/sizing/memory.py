"""Memory plan: will this model, format and parallelism fit the target GPUs, and with how much
room for the KV cache? Pure arithmetic on architecture numbers, so it answers before anything is
downloaded or rented.

Weights: every linear layer at the format's bits (plus its scales), embedding, lm_head and norms
at 16 bits (ModelOpt leaves lm_head unquantized); linear layers split by tp, decoder layers by pp,
embedding on the first and lm_head on the last pipeline rank, both split by tp. The heaviest rank
decides. KV cache per token (upstream's rule): all ranks 2 x layers x max(tp, kv_heads) x head_dim
x bytes; per rank 2 x layers/pp x max(1, kv_heads/tp) x head_dim x bytes. Activations are an
estimate from max_num_tokens (hidden states, attention and MLP intermediates at 16 bits, logits of
one token per sequence at 32 bits) plus a fixed runtime reserve; the KV cache gets
``kv_cache_free_gpu_mem_fraction`` of what is left, as the TensorRT-LLM backend does.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from pipeline.config.schema import Architecture, Backend, KVCacheDType, PipelineConfig, QuantFormat
from pipeline.sizing import adapters, rules
from pipeline.tables import aligned

GIB = 2**30
RUNTIME_RESERVE_GIB = 1.5  # CUDA context, TensorRT workspace, NCCL buffers (an estimate)
# bytes per weight of quantized linear layers, scales included
WEIGHT_BYTES = {
    QuantFormat.none: 2.0,
    QuantFormat.fp8: 1.0,
    QuantFormat.int8_sq: 1.0,
    QuantFormat.int4_awq: 0.5 + 2 / 128,  # 16-bit scale per group of 128
    QuantFormat.w4a8_awq: 0.5 + 2 / 128,
    QuantFormat.nvfp4: 0.5 + 1 / 16,  # FP8 scale per block of 16
}
KV_BYTES = {None: 2, KVCacheDType.fp8: 1, KVCacheDType.int8: 1}
# Left free on every GPU while ModelOpt calibrates (stages/quantize/placement.py): calibration
# activations, the CUDA context and ModelOpt's statistics.
CALIBRATION_HEADROOM = 0.15


@dataclass(frozen=True)
class MemoryPlan:
    tp: int
    pp: int
    gpus: int
    gpu_memory_gib: float
    weights_gib_per_gpu: float
    adapters_gib_per_gpu: float  # the LoRA cache: lora.cache_adapters of the largest adapters, split by tp
    activations_gib_per_gpu: float
    kv_bytes_per_token_total: int
    kv_bytes_per_token_per_gpu: int
    kv_cache_gib_per_gpu: float
    kv_tokens: int
    full_sequences: int
    max_seq_len: int
    fits: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# what the size of the weights follows (the context length and the architecture name stay as the
# config gives them: the fetch stage checks those against the checkpoint)
SIZE_FIELDS = (
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_size",
    "intermediate_size",
    "vocab_size",
    "head_dim",
)


def fill_sizes(arch: Architecture, found: dict[str, Any]) -> None:
    """The size numbers of a checkpoint's ``config.json`` that ``arch`` leaves out."""
    for name in SIZE_FIELDS:
        value = found.get(name)
        if getattr(arch, name) is None and isinstance(value, int) and not isinstance(value, bool):
            setattr(arch, name, value)


def kv_bytes_per_token(arch: Architecture, tp: int, pp: int, kv: KVCacheDType | None) -> tuple[int, int]:
    """(all ranks, one rank) KV cache bytes per token."""
    layers, heads = arch.num_hidden_layers or 0, arch.num_key_value_heads or arch.num_attention_heads or 0
    dim, size = arch.head_size or 0, KV_BYTES[kv]
    total = 2 * layers * max(tp, heads) * dim * size
    per_rank = 2 * math.ceil(layers / pp) * max(1, heads // tp) * dim * size
    return total, per_rank


def weight_bytes_per_gpu(arch: Architecture, fmt: QuantFormat, tp: int, pp: int) -> float:
    hidden, vocab = arch.hidden_size or 0, arch.vocab_size or 0
    linear = arch.linear_params_per_layer or 0
    layer = linear * WEIGHT_BYTES[fmt] / tp + 2 * hidden * 2  # two norms, replicated
    layers_per_rank = math.ceil((arch.num_hidden_layers or 0) / pp)
    edge = vocab * hidden * 2 / tp  # embedding (first rank) or lm_head (last rank), 16-bit
    edges = 2 * edge if pp == 1 else edge
    return layers_per_rank * layer + edges


def activation_bytes_per_gpu(arch: Architecture, tp: int, max_num_tokens: int, max_batch_size: int) -> float:
    hidden, inter, vocab = arch.hidden_size or 0, arch.intermediate_size or 0, arch.vocab_size or 0
    per_token = (4 * hidden + 2 * inter / tp) * 2
    logits = max_batch_size * vocab / tp * 4
    return max_num_tokens * per_token + logits + RUNTIME_RESERVE_GIB * GIB


def plan_for(
    cfg: PipelineConfig,
    tp: int | None = None,
    pp: int | None = None,
    max_num_tokens: int | None = None,
    max_batch_size: int | None = None,
) -> MemoryPlan:
    """The plan at ``cfg``'s parallelism and engine limits, or at the ones given."""
    arch, build, target = cfg.model.arch, cfg.build, cfg.target
    tp, pp = tp or cfg.parallel.tp, pp or cfg.parallel.pp
    memory = (target.memory_gib or 0.0) * GIB
    weights = weight_bytes_per_gpu(arch, cfg.quant.format, tp, pp)
    tokens = build.tokens if max_num_tokens is None else max_num_tokens
    batch = build.batch if max_batch_size is None else max_batch_size
    activations = activation_bytes_per_gpu(arch, tp, tokens, batch)
    lora_cache = adapters.cache_bytes(cfg) / tp
    total_kv, rank_kv = kv_bytes_per_token(arch, tp, pp, cfg.quant.kv_cache_dtype)
    free = memory - weights - activations - lora_cache
    kv_cache = max(0.0, free) * cfg.kv_cache_fraction
    tokens = int(kv_cache // rank_kv) if rank_kv else 0
    sequences = tokens // build.max_seq_len
    if free <= 0:
        reason = (
            f"weights ({weights / GIB:.1f} GiB) and activations ({activations / GIB:.1f} GiB) per GPU exceed "
            f"{target.memory_gib:g} GiB"
        )
    elif sequences < 1:
        reason = f"KV cache room for {tokens} tokens, less than one {build.max_seq_len}-token sequence"
    else:
        reason = f"KV cache room for {tokens:,} tokens ({sequences:,} full {build.max_seq_len}-token sequences)"
    return MemoryPlan(
        tp=tp,
        pp=pp,
        gpus=tp * pp,  # this tp/pp, which need not be the configured one
        gpu_memory_gib=target.memory_gib or 0.0,
        weights_gib_per_gpu=weights / GIB,
        adapters_gib_per_gpu=lora_cache / GIB,
        activations_gib_per_gpu=activations / GIB,
        kv_bytes_per_token_total=total_kv,
        kv_bytes_per_token_per_gpu=rank_kv,
        kv_cache_gib_per_gpu=kv_cache / GIB,
        kv_tokens=tokens,
        full_sequences=sequences,
        max_seq_len=build.max_seq_len,
        fits=free > 0 and sequences >= 1,
        reason=reason,
    )


def applies(cfg: PipelineConfig) -> bool:
    arch = cfg.model.arch
    return (
        cfg.target.is_gpu
        and bool(cfg.target.memory_gib)
        and all((arch.num_hidden_layers, arch.num_attention_heads, arch.hidden_size, arch.intermediate_size))
    )


def alternatives(cfg: PipelineConfig) -> list[MemoryPlan]:
    """The same model and format at every valid tp (pp=1) the target has GPUs for."""
    return [plan_for(cfg, tp, 1) for tp in rules.valid_tp_sizes(cfg.model.arch) if tp <= max(1, cfg.target.count)]


def smallest_fitting(cfg: PipelineConfig) -> str | None:
    """The override that makes an infeasible plan fit: a larger tp first, then a smaller format."""
    for option in alternatives(cfg):
        if option.fits:
            return f"parallel.tp={option.tp}"
    for fmt in (QuantFormat.fp8, QuantFormat.int4_awq):
        smaller = replace(cfg, quant=replace(cfg.quant, format=fmt))
        if rules.gpu_format_problems(smaller):
            continue
        for option in alternatives(smaller):
            if option.fits:
                return f"quant={fmt} parallel.tp={option.tp}"
    return None


def quantize_memory(cfg: PipelineConfig) -> tuple[float, float, str] | None:
    """(GiB needed, GiB available, where) for holding the model while ModelOpt calibrates it. A
    GPU host spreads the 16-bit model over all its GPUs, less the calibration headroom of each
    (``stages/quantize/placement.py``); the CPU target holds it in float32 in host memory."""
    params = cfg.model.arch.approx_params
    if params is None:
        return None
    if cfg.target.is_gpu:
        gpus = max(1, cfg.target.count)
        have = (cfg.target.memory_gib or 0) * gpus * (1 - CALIBRATION_HEADROOM)
        return params * 2 / GIB, have, f"the {gpus} GPU{'s' if gpus > 1 else ''} of target={cfg.target.name}"
    import psutil

    return params * 4 / GIB, psutil.virtual_memory().total / GIB, "this host (the CPU target calibrates in float32)"


def quantize_placement(cfg: PipelineConfig) -> str:
    """One line for ``plan``: where the model sits while it is calibrated."""
    memory = quantize_memory(cfg)
    if not cfg.target.is_gpu:
        size = f" (about {memory[0]:.1f} GiB)" if memory else ""
        return f"loads the model on the CPU in float32{size}, calibrates with ModelOpt, {_export(cfg)}"
    gpus = max(1, cfg.target.count)
    if memory is None:
        spread = f"on the first GPU, or spread over the host's {gpus} GPUs when it does not fit one"
    elif memory[0] <= (cfg.target.memory_gib or 0) * (1 - CALIBRATION_HEADROOM):
        spread = f"on one GPU (about {memory[0]:.0f} GiB fits one {cfg.target.memory_gib:g} GiB GPU)"
    else:
        per_gpu = memory[0] / gpus
        spread = (
            f"spread over the host's {gpus} GPUs (device map over whole decoder layers, about "
            f"{memory[0]:.0f} GiB of {cfg.model.dtype} weights, {per_gpu:.1f} GiB per GPU)"
        )
    return f"loads the model in {cfg.model.dtype} {spread}, calibrates with ModelOpt, {_export(cfg)}"


def _export(cfg: PipelineConfig) -> str:
    parallel = f"tp={cfg.parallel.tp} pp={cfg.parallel.pp}"
    if cfg.backend is Backend.pytorch:  # one checkpoint for any layout: the LLM API shards it as it loads
        return f"exports one unified Hugging Face checkpoint (the LLM API shards it for {parallel} as it loads)"
    return f"exports {parallel}"


def quantize_memory_problem(cfg: PipelineConfig) -> str | None:
    """The quantize stage's preflight: the model must fit where it is calibrated."""
    memory = quantize_memory(cfg)
    if memory is None or memory[0] <= memory[1]:
        return None
    need, have, where = memory
    return (
        f"quantizing {cfg.model.name} needs about {need:.0f} GiB to hold the model, more than the {have:.0f} GiB of "
        f"{where}: run on a GPU host with enough memory (target=h100 with 8 GPUs, for example)"
    )


def problems(cfg: PipelineConfig) -> list[str]:
    """For validate(): an engine that cannot fit is refused before any download (the quantize
    stage's preflight adds ``quantize_memory_problem`` when it is about to run)."""
    if not applies(cfg):
        return []
    current = plan_for(cfg)
    if current.fits:
        return []
    fix = smallest_fitting(cfg)
    advice = f": use {fix}" if fix else f": no tp up to {cfg.target.count} GPUs fits; use a larger target"
    where = f"{cfg.model.name} {cfg.quant.format} at tp={cfg.parallel.tp} pp={cfg.parallel.pp}"
    return [f"{where} does not fit {cfg.target.name} ({current.reason}){advice}"]


def format_table(cfg: PipelineConfig) -> str:
    rows = [("tp", "pp", "weights/GPU", "act./GPU", "KV/token/GPU", "KV cache/GPU", "KV tokens", "sequences", "fits")]
    chosen = plan_for(cfg)
    others = [p for p in alternatives(cfg) if (p.tp, p.pp) != (chosen.tp, chosen.pp)]
    for p in [chosen, *others]:
        rows.append(
            (
                str(p.tp),
                str(p.pp),
                f"{p.weights_gib_per_gpu:.1f} GiB",
                f"{p.activations_gib_per_gpu:.1f} GiB",
                f"{p.kv_bytes_per_token_per_gpu / 1024:g} KiB",
                f"{p.kv_cache_gib_per_gpu:.1f} GiB",
                f"{p.kv_tokens:,}",
                f"{p.full_sequences:,}",
                "yes" if p.fits else "NO",
            )
        )
    lines = aligned(rows, right=True)
    lines.insert(1, f"  (first row: the requested tp={chosen.tp} pp={chosen.pp}; then every valid tp)")
    verdict = "fits" if chosen.fits else "does NOT fit"
    total_kib = chosen.kv_bytes_per_token_total / 1024
    header = (
        f"{cfg.model.name} {cfg.quant.format} (KV cache {cfg.quant.kv_cache_dtype or cfg.model.dtype}) on "
        f"{cfg.target.name} ({cfg.target.memory_gib:g} GiB per GPU): {verdict} at tp={chosen.tp} pp={chosen.pp}: "
        f"{chosen.reason}. KV cache {total_kib:g} KiB per token across all ranks."
    )
    if cfg.lora.adapters:
        header += (
            f" LoRA cache {chosen.adapters_gib_per_gpu * 1024:.3g} MiB per GPU (the {cfg.lora.cache_adapters} "
            f"largest of {len(cfg.lora.adapters)} adapters, lora.cache_adapters)."
        )
    return header + "\n" + "\n".join(lines)


def checkpoint_bytes(cfg: PipelineConfig) -> float | None:
    """About what the quantized checkpoint (or an engine built from it) takes on disk, all ranks;
    None when the architecture numbers are unknown."""
    arch, tp, pp = cfg.model.arch, cfg.parallel.tp, cfg.parallel.pp
    if not (arch.hidden_size and arch.num_hidden_layers and arch.linear_params_per_layer):
        return None
    return weight_bytes_per_gpu(arch, cfg.quant.format, tp, pp) * tp * pp
